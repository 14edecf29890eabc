"""A trained model for evaluation and embedding: backbone (+ ITM head) from a checkpoint, and its data.

``--checkpoint`` accepts what training leaves behind:

* a portable export: a directory with ``model.safetensors`` + ``config.json`` (``<run>/final``, or what
  ``convert_original`` writes), or a run directory that has a ``final/`` one;
* a DeepSpeed training checkpoint: a ``step<N>`` directory, or a run / ``checkpoints`` directory (its newest
  complete ``step<N>``); the weights are consolidated to fp32 (any ZeRO stage) and the config is the
  ``config.json`` saved with the checkpoint.

The state dict holds ``backbone.*`` and the heads of the objectives it was trained with: the matching head
that re-ranks is ``heads.itm.*`` (pre-training's ITM) or ``heads.retrieval.*`` (retrieval fine-tuning's own
classifier, as the release's); other heads are ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mvptr_ds.config import ConfigError, RunConfig

BACKBONE_PREFIX = "backbone."
MATCH_PREFIXES = ("heads.itm.", "heads.retrieval.")  # pre-training's ITM head, retrieval fine-tuning's


@dataclass
class LoadedModel:
    """``backbone`` (MVPTRModel, eval mode), ``itm_head`` (ITMHead or None), the checkpoint's resolved
    ``config`` and ``source`` (the directory the weights came from)."""

    backbone: torch.nn.Module
    itm_head: Optional[torch.nn.Module]
    config: RunConfig
    source: str
    tokenizer: Optional[object] = None   # from_pretrained: the folder's Hugging Face tokenizer (tokenizer/)
    concepts: Optional[object] = None    # from_pretrained: its concept vocabulary (id2phrase.json, ConceptVocab)

    @property
    def itm_prior_scale(self) -> float:
        """The contrastive similarity's weight in this model's ITM score (``--itm_prior``; 0 without it)."""
        from mvptr_ds.objectives.itm import prior_scale

        if self.config is None:  # weights without a run config (benchmarks' random initialisations)
            return 0.0
        return prior_scale(self.backbone.logit_scale, self.config.objectives)


def _sub_state(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_model(state: Dict[str, torch.Tensor], cfg: RunConfig, source: str, device="cpu") -> LoadedModel:
    """Backbone and matching head (ITM or retrieval's) from a state dict; every backbone parameter must be present
    with its shape."""
    from mvptr_ds.model.heads import ITMHead
    from mvptr_ds.model.mvptr import MVPTRModel

    backbone_state = _sub_state(state, BACKBONE_PREFIX)
    if not backbone_state:
        raise ConfigError(f"{source}: the weights hold no '{BACKBONE_PREFIX}*' tensors; not an MVPTR checkpoint")
    with_cross = any(k.startswith("cross_encoder.") for k in backbone_state)
    backbone = MVPTRModel(cfg.model, with_cross=with_cross)
    _load_strict(backbone, backbone_state, source, BACKBONE_PREFIX)
    prefix = next((p for p in MATCH_PREFIXES if _sub_state(state, p)), None)
    itm_head = None
    if prefix is not None and with_cross:
        itm_head = ITMHead(cfg.model)
        _load_strict(itm_head, _sub_state(state, prefix), source, prefix)
    for m in (backbone, itm_head):
        if m is not None:
            m.to(device).eval()
    return LoadedModel(backbone, itm_head, cfg, source)


def _load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: str, prefix: str) -> None:
    target = module.state_dict()
    missing = [k for k in target if k not in state]
    if missing:
        raise ConfigError(f"{source}: {prefix}{missing[0]} missing from the checkpoint"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k, v in target.items():
        if state[k].shape != v.shape:
            raise ConfigError(f"{source}: {prefix}{k} has shape {tuple(state[k].shape)}, the model built from its "
                              f"config.json expects {tuple(v.shape)}")
    module.load_state_dict({k: state[k] for k in target})


def load_model(path: str, device="cpu") -> LoadedModel:
    """``weights.read_model_weights`` (the project's one reading path) then :func:`build_model`."""
    from mvptr_ds.training.weights import read_model_weights

    state, cfg, source = read_model_weights(path, "--checkpoint")
    return build_model(state, cfg, source, device)


def from_pretrained(path: str, device="cpu") -> LoadedModel:
    """:func:`load_model` plus the tokenizer and concept vocabulary a ``final/`` folder carries (None where the
    folder has none, e.g. a DeepSpeed checkpoint or a converted authors' checkpoint)."""
    import os

    from mvptr_ds.data.caption_files import read_id2phrase
    from mvptr_ds.data.real_dataset import load_tokenizer

    model = load_model(path, device)
    tok_dir, vocab = os.path.join(model.source, "tokenizer"), os.path.join(model.source, "id2phrase.json")
    model.tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    model.concepts = read_id2phrase(vocab) if os.path.isfile(vocab) else None
    return model


def load_eval_data(model: LoadedModel, data: Optional[str] = None):
    """(data bundle, evaluation split, split name) for ``data`` (default: the checkpoint's training source).

    The built-in world evaluates on its held-out images; a data directory is evaluated whole (give the
    directory of the test split). The checkpoint's vocabulary must fit the data's.
    """
    from mvptr_ds.data.pipeline import build_data
    from mvptr_ds.assembly import resolve_model_config

    data_cfg = dataclasses.replace(model.config.data, source=data) if data else model.config.data
    bundle = build_data(data_cfg, objectives=())
    try:
        resolve_model_config(model.config.model, bundle.vocab)
    except ConfigError as e:
        raise ConfigError(f"--data {data_cfg.source} does not fit the checkpoint {model.source}: {e}") from None
    if bundle.world is not None:
        if len(bundle.held_out) == 0:
            raise ConfigError(f"--data {data_cfg.source}: the world holds out no images (held_out=0); "
                              f"evaluation needs held-out images, e.g. {data_cfg.source},held_out=64")
        return bundle, bundle.held_out, "held_out"
    return bundle, bundle.train, "all"
