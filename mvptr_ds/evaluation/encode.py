"""``mvptr_ds.encode``: uni-modal and cross-modal representations of image-text pairs from a checkpoint.

For users who build on the backbone::

    import mvptr_ds
    enc = mvptr_ds.encode("runs/demo_stage2/final")             # the held-out pairs of its built-in world
    enc = mvptr_ds.encode(model, examples=my_examples)          # a LoadedModel and your own Examples
    enc.text_embed @ enc.visual_embed.T                         # contrastive similarities

The ``embed`` command writes the same arrays to an ``.npz`` file.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from mvptr_ds.config import ConfigError

SPLITS = ("held_out", "train")


@dataclass
class PairEncoding:
    """Representations of N image-caption pairs (float32 numpy arrays; H = hidden size, D = embedding size).

    ``text_embed`` / ``visual_embed`` ``[N, D]``: unit-norm contrastive embeddings (the VSC space);
    ``similarity`` ``[N]``: their cosine; ``text_cls`` / ``visual_cls`` ``[N, H]``: uni-modal ``[CLS]`` outputs;
    ``pooled`` ``[N, H]``: pooled cross-modal output and ``itm_score`` ``[N]``: logit(match) - logit(no match),
    plus e^tau ``similarity`` for a model trained with ``--itm_prior`` (the score re-ranking uses; None for a
    stage-1 model or one without an ITM head); ``sample_ids``, ``image_ids`` ``[N]`` int64.
    """

    sample_ids: np.ndarray
    image_ids: np.ndarray
    text_embed: np.ndarray
    visual_embed: np.ndarray
    similarity: np.ndarray
    text_cls: np.ndarray
    visual_cls: np.ndarray
    pooled: Optional[np.ndarray] = None
    itm_score: Optional[np.ndarray] = None

    def arrays(self) -> Dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def save(self, path: str) -> None:
        """Write the arrays to ``path`` (``numpy.savez``; load with ``numpy.load``)."""
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, **self.arrays())


@torch.no_grad()
def encode_pairs(model, examples: Sequence, collator, batch_size: int = 64, device="cpu",
                 show_progress: bool = False) -> PairEncoding:
    """Encode Examples with a :class:`~mvptr_ds.evaluation.loading.LoadedModel` (eval mode, no corruption)."""
    from mvptr_ds.evaluation.retrieval import _check_collator, _chunks, itm_score, progress

    _check_collator(collator)
    if len(examples) == 0:
        raise ConfigError("encode: no image-caption pairs to encode")
    backbone, head = model.backbone, model.itm_head
    prior = model.itm_prior_scale  # the score re-ranking uses: with --itm_prior, plus e^tau S
    backbone.eval()
    cols: Dict[str, list] = {f.name: [] for f in fields(PairEncoding)}
    for lo, hi in progress(list(_chunks(len(examples), batch_size)), "encode", show_progress):
        batch = collator([examples[i] for i in range(lo, hi)]).to(device)
        out = backbone(batch, run_cross=backbone.with_cross)
        cols["sample_ids"].append(batch.sample_ids)
        cols["image_ids"].append(batch.image_ids)
        cols["text_embed"].append(out.text_embed)
        cols["visual_embed"].append(out.visual_embed)
        cols["similarity"].append((out.text_embed * out.visual_embed).sum(-1))
        cols["text_cls"].append(out.text[:, 0])
        cols["visual_cls"].append(out.visual[:, 0])
        if out.pooled is not None:
            cols["pooled"].append(out.pooled)
            if head is not None:
                cols["itm_score"].append(itm_score(head, out.pooled) + prior * cols["similarity"][-1])
    arrays = {}
    for name, parts in cols.items():
        if parts:
            t = torch.cat(parts).cpu()
            arrays[name] = t.numpy() if not t.is_floating_point() else t.float().numpy()
    return PairEncoding(**arrays)


def encode(checkpoint: Union[str, object], examples: Optional[Sequence] = None, data: Optional[str] = None,
           split: str = "held_out", limit: Optional[int] = None, batch_size: int = 64, device="cpu",
           show_progress: bool = False) -> PairEncoding:
    """Representations of image-caption pairs (:class:`PairEncoding`).

    ``checkpoint``: a checkpoint directory (see :mod:`mvptr_ds.evaluation.loading`) or a loaded model.
    ``examples``: your own :class:`~mvptr_ds.data.types.Example` pairs; otherwise the pairs of ``data``
    (default: the checkpoint's training source), ``split`` ``held_out`` or ``train`` of the built-in world
    (a data directory is read whole). ``limit``: only the first pairs.
    """
    from mvptr_ds.evaluation.loading import LoadedModel, load_model
    from mvptr_ds.evaluation.retrieval import eval_collator

    model = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(str(checkpoint), device)
    if examples is None:
        examples, vocab = _split_examples(model, data, split)
    else:
        vocab = _vocab_for(model, data)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: must be >= 1")
        examples = [examples[i] for i in range(min(limit, len(examples)))]
    collator = eval_collator(model.config.data, vocab)
    return encode_pairs(model, examples, collator, batch_size, device, show_progress)


def _split_examples(model, data: Optional[str], split: str):
    from mvptr_ds.evaluation.loading import load_eval_data

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    bundle, held_out, _ = load_eval_data(model, data)
    if bundle.world is not None and split == "train":
        return bundle.train, bundle.vocab
    return held_out, bundle.vocab


def _vocab_for(model, data: Optional[str]):
    """The vocabulary of the checkpoint's data (ids of user Examples are checked against it)."""
    import dataclasses

    from mvptr_ds.data.pipeline import build_data

    data_cfg = dataclasses.replace(model.config.data, source=data) if data else model.config.data
    return build_data(data_cfg, objectives=()).vocab
