"""Coarse-to-fine image-text retrieval (MVPTR.md section 4).

1. **Cache.** Every image is encoded once by the visual encoder and every caption once by the textual
   encoder (:func:`encode_set`); their contrastive embeddings and their real (unpadded) states are kept.
2. **Coarse.** ``S = g_t g_v^T`` ``[C, I]`` ranks all captions for each image and all images for each caption.
3. **Fine.** The top ``k_captions`` captions of each image and the top ``k_images`` images of each caption
   are re-scored by the ITM head on the cross-modal encoder, which reads the cached states: only the
   cross-modal encoder and the pooler run per pair, in batches. The union of both candidate sets is
   scored once. With several ranks (``torch.distributed`` initialised), rank r scores pairs r, r+W, ... and
   the scores are all-gathered, so every rank ends with the same matrices (the uni-modal pass, one
   encoder layer stack per image and per caption, is cheap next to the pairs and runs on every rank).
4. **Rank.** Re-ranked candidates come first, in ITM order (score = logit(match) - logit(no match), plus
   ``itm_prior_scale * S`` for a model trained with ``--itm_prior``: :func:`mvptr_ds.objectives.itm.prior_scale`);
   the others follow in coarse order. Recalls: :func:`mvptr_ds.evaluation.metrics.retrieval_recalls`
   (pessimistic ties and duplicated images, documented there).

The candidate selection is deterministic: a stable descending sort of ``S`` (ties keep index order).
Without an ITM head (a model trained without ITM) the coarse ranking is the result.

The authors' evaluation instead re-encodes the image and the caption of every scored pair through all
three encoders (:func:`reencode_pair_scores`, kept as the reference for tests and the benchmark).

Inputs are :class:`~mvptr_ds.data.types.Example` image-caption pairs, e.g. a split of the built-in world;
the collator must not corrupt (``Collator(vocab, objectives=())``, see :func:`eval_collator`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from mvptr_ds.data.types import Example
from mvptr_ds.evaluation.metrics import chance_recall, retrieval_recalls, retrieval_truth


def eval_collator(data_cfg, vocab):
    """A collator with the run's length limits and no corruption (evaluation inputs are clean)."""
    from mvptr_ds.data.batching import Collator

    return Collator.from_config(data_cfg, vocab, objectives=())


def progress(iterable, desc: str, enabled: bool, total: Optional[int] = None):
    """A tqdm bar on stderr when ``enabled`` (the main rank), else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


@dataclass
class RetrievalSet:
    """Images and captions of an evaluation split, each once.

    ``images[i]``: an Example carrying image i's tags and regions (its caption fields are empty);
    ``captions[c]``: an Example carrying caption c's words and concepts (a one-region dummy image);
    ``caption_image`` ``[C]`` long: index of caption c's image; ``image_ids``: the data's image ids;
    ``image_key`` ``[I]`` long: equal for entries whose regions and tags are identical (duplicated images).
    """

    images: List[Example]
    captions: List[Example]
    caption_image: torch.Tensor
    image_ids: List[int]
    image_key: torch.Tensor

    def pair(self, caption: int, image: int) -> Example:
        """The full Example of caption ``caption`` shown with image ``image`` (for re-encoding a pair)."""
        c, i = self.captions[caption], self.images[image]
        return Example(sample_id=c.sample_id, image_id=i.image_id, caption_ids=c.caption_ids,
                       concept_ids=c.concept_ids, concept_word_links=c.concept_word_links, tag_ids=i.tag_ids,
                       regions=i.regions)


def _content_key(ex: Example) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(ex.regions).tobytes())
    h.update(np.asarray(ex.tag_ids, dtype=np.int64).tobytes())
    return h.digest()


def retrieval_set(dataset, max_images: Optional[int] = None) -> RetrievalSet:
    """Group an indexable dataset of image-caption Examples by image id (in order of first appearance).

    ``max_images`` keeps only the first images (and their captions).
    """
    images: List[Example] = []
    captions: List[Example] = []
    index: Dict[int, int] = {}
    owner: List[int] = []
    for i in range(len(dataset)):
        ex = dataset[i]
        if ex.image_id not in index:
            if max_images is not None and len(images) >= max_images:
                continue
            index[ex.image_id] = len(images)
            images.append(Example(sample_id=ex.sample_id, image_id=ex.image_id, caption_ids=[], concept_ids=[],
                                  concept_word_links=[], tag_ids=list(ex.tag_ids), regions=ex.regions))
        dummy = np.zeros((1, ex.regions.shape[1]), dtype=np.float32)
        captions.append(Example(sample_id=ex.sample_id, image_id=ex.image_id, caption_ids=list(ex.caption_ids),
                                concept_ids=list(ex.concept_ids),
                                concept_word_links=[list(w) for w in ex.concept_word_links], tag_ids=[],
                                regions=dummy))
        owner.append(index[ex.image_id])
    if not images:
        raise ValueError("retrieval: the evaluation split holds no image-caption pairs")
    keys: Dict[bytes, int] = {}
    image_key = [keys.setdefault(_content_key(ex), len(keys)) for ex in images]
    return RetrievalSet(images, captions, torch.tensor(owner, dtype=torch.long), [ex.image_id for ex in images],
                        torch.tensor(image_key, dtype=torch.long))


@dataclass
class EncodedSet:
    """Uni-modal outputs cached once per caption and once per image.

    ``text_states[c]`` ``[Lt_c, H]`` (real positions only), ``region_states[i]`` ``[R_i, H]``,
    ``text_embed`` ``[C, D]``, ``visual_embed`` ``[I, D]`` (unit norm).
    """

    text_states: List[torch.Tensor]
    region_states: List[torch.Tensor]
    text_embed: torch.Tensor
    visual_embed: torch.Tensor


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _check_collator(collator) -> None:
    if getattr(collator, "mlm", False) or getattr(collator, "mcr", False):
        raise ValueError("retrieval: the collator corrupts its inputs (built with mlm/mcr objectives); "
                         "evaluate with eval_collator(data_cfg, vocab)")


@torch.no_grad()
def encode_set(backbone, rset: RetrievalSet, collator, batch_size: int, device, show_progress: bool = False
               ) -> EncodedSet:
    """Run the textual encoder once per caption and the visual encoder once per image (eval mode)."""
    _check_collator(collator)
    text_states, region_states, text_embed, visual_embed = [], [], [], []
    chunks = list(_chunks(len(rset.captions), batch_size))
    for lo, hi in progress(chunks, "encode captions", show_progress):
        b = collator(rset.captions[lo:hi]).to(device)
        h = backbone.encode_text(b.text_ids, b.text_mask)  # (B, Lt, H)
        text_embed.append(backbone.embed_text(h))
        lengths = b.text_mask.sum(dim=1).tolist()
        text_states += [h[j, :n] for j, n in enumerate(lengths)]
    chunks = list(_chunks(len(rset.images), batch_size))
    for lo, hi in progress(chunks, "encode images", show_progress):
        b = collator(rset.images[lo:hi]).to(device)
        v = backbone.encode_visual(b.tag_ids, b.tag_mask, b.region_feats, b.region_mask)  # (B, Lg+Lr, H)
        visual_embed.append(backbone.embed_visual(v))
        regions = v[:, b.tag_ids.shape[1]:]  # (B, Lr, H)
        lengths = b.region_mask.sum(dim=1).tolist()
        region_states += [regions[j, :n] for j, n in enumerate(lengths)]
    return EncodedSet(text_states, region_states, torch.cat(text_embed), torch.cat(visual_embed))


def _padded(states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """List of ``[L_i, H]`` -> (``[N, max L, H]`` zero-padded, ``[N, max L]`` bool mask)."""
    lengths = torch.tensor([s.shape[0] for s in states], device=states[0].device)
    h = pad_sequence(list(states), batch_first=True)  # (N, L, H)
    mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]  # (N, L)
    return h, mask


def itm_score(itm_head, pooled: torch.Tensor) -> torch.Tensor:
    """``logit(match) - logit(no match)`` ``[B]`` float32 from pooled outputs ``[B, H]`` (label 1 = match)."""
    logits = itm_head(pooled).float()  # (B, 2)
    return logits[:, 1] - logits[:, 0]


@torch.no_grad()
def itm_pair_scores(backbone, itm_head, enc: EncodedSet, pairs: torch.Tensor, batch_size: int,
                    show_progress: bool = False) -> torch.Tensor:
    """ITM score of each (caption, image) pair from the cached states (cross-modal encoder only).

    pairs ``[P, 2]`` long (caption index, image index). Returns ``[P]`` float32 on the cache's device.
    """
    out = []
    chunks = list(_chunks(pairs.shape[0], batch_size))
    for lo, hi in progress(chunks, "ITM re-ranking", show_progress):
        caps, imgs = pairs[lo:hi, 0].tolist(), pairs[lo:hi, 1].tolist()
        text_h, text_mask = _padded([enc.text_states[c] for c in caps])
        region_h, region_mask = _padded([enc.region_states[i] for i in imgs])
        out.append(itm_score(itm_head, backbone.pooled_cross(text_h, text_mask, region_h, region_mask)))
    if not out:
        return enc.text_embed.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


@torch.no_grad()
def reencode_pair_scores(backbone, itm_head, rset: RetrievalSet, collator, pairs: torch.Tensor, batch_size: int,
                         device, show_progress: bool = False) -> torch.Tensor:
    """The authors' way: each (caption, image) pair runs through all three encoders again. ``[P]`` float32."""
    _check_collator(collator)
    out = []
    chunks = list(_chunks(pairs.shape[0], batch_size))
    for lo, hi in progress(chunks, "re-encode pairs", show_progress):
        b = collator([rset.pair(c, i) for c, i in pairs[lo:hi].tolist()]).to(device)
        out.append(itm_score(itm_head, backbone(b, run_cross=True).pooled))
    if not out:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat(out)


def all_pairs(n_captions: int, n_images: int) -> torch.Tensor:
    """Every (caption, image) pair, caption-major: ``[C * I, 2]``."""
    grid = torch.meshgrid(torch.arange(n_captions), torch.arange(n_images), indexing="ij")
    return torch.stack(grid, -1).reshape(-1, 2)


def _top_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[Q, k]`` of each row's k best columns; ties keep column order (stable sort)."""
    k = min(k, scores.shape[1])
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def candidate_pairs(sim: torch.Tensor, k_captions: int, k_images: int) -> torch.Tensor:
    """The union of each image's top-k captions and each caption's top-k images under ``sim`` ``[C, I]``.

    Returns ``[P, 2]`` (caption, image), sorted by ``caption * I + image`` (deterministic, no duplicates).
    """
    n_img = sim.shape[1]
    keys = torch.unique(torch.cat([_image_side_keys(sim, k_captions).flatten(),
                                   _caption_side_keys(sim, k_images).flatten()]))  # sorted
    return torch.stack([keys // n_img, keys % n_img], dim=1)


def _image_side_keys(sim: torch.Tensor, k: int) -> torch.Tensor:
    """``[I, k]`` pair keys ``caption * I + image`` of each image's top-k captions."""
    n_img = sim.shape[1]
    top_caps = _top_candidates(sim.t(), k)  # (I, k)
    return top_caps * n_img + torch.arange(n_img, device=sim.device)[:, None]


def _caption_side_keys(sim: torch.Tensor, k: int) -> torch.Tensor:
    """``[C, k]`` pair keys of each caption's top-k images."""
    n_cap, n_img = sim.shape
    return torch.arange(n_cap, device=sim.device)[:, None] * n_img + _top_candidates(sim, k)


def shard_and_gather(pairs: torch.Tensor, score_fn: Callable[[torch.Tensor], torch.Tensor], rank: int,
                     world_size: int) -> torch.Tensor:
    """Score pairs ``rank::world_size`` here, all-gather, and return the scores of all pairs in order."""
    if world_size == 1:
        return score_fn(pairs)
    import torch.distributed as dist

    total = pairs.shape[0]
    per = -(-total // world_size)
    local = score_fn(pairs[rank::world_size]).float()
    padded = torch.zeros(per, dtype=torch.float32, device=local.device)
    padded[:local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    # parts[r][j] is pair r + j * world_size: stacking on dim 1 and flattening restores the pair order.
    return torch.stack(parts, dim=1).flatten()[:total]


def coarse_to_fine_scores(sim: torch.Tensor, pairs: torch.Tensor, itm: torch.Tensor, k_captions: int,
                          k_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Final ranking scores i2t ``[I, C]`` and t2i ``[C, I]`` (float64) from the coarse ``sim`` ``[C, I]`` and
    the ITM scores ``itm`` ``[P]`` of ``pairs`` (:func:`candidate_pairs` of the same ``sim`` and k).

    Each query's re-ranked candidates get ``itm + offset``, with an offset that puts them above every
    coarse score; the other candidates keep their coarse score.
    """
    sim = sim.double()
    itm = itm.double().to(sim.device)
    n_img = sim.shape[1]
    keys = pairs[:, 0] * n_img + pairs[:, 1]  # sorted by construction
    offset = (itm.abs().max() if itm.numel() else 0.0) + sim.abs().max() + 1.0

    def fine(query_keys: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(keys, query_keys.flatten()).reshape(query_keys.shape)
        if not torch.equal(keys[pos.clamp(max=keys.numel() - 1)], query_keys):
            raise ValueError("coarse_to_fine_scores: pairs do not cover the top-k candidates of sim")
        return itm[pos] + offset

    i2t = sim.t().clone()  # (I, C)
    img_keys = _image_side_keys(sim, k_captions)  # (I, kc)
    i2t.scatter_(1, img_keys // n_img, fine(img_keys))
    t2i = sim.clone()  # (C, I)
    cap_keys = _caption_side_keys(sim, k_images)  # (C, ki)
    t2i.scatter_(1, cap_keys % n_img, fine(cap_keys))
    return i2t, t2i


@torch.no_grad()
def evaluate_retrieval(backbone, itm_head, rset: RetrievalSet, collator, k_captions: int = 128,
                       k_images: int = 64, batch_size: int = 64, device="cpu", rank: int = 0,
                       world_size: int = 1, show_progress: bool = False, itm_prior_scale: float = 0.0
                       ) -> Dict[str, float]:
    """Coarse-to-fine retrieval metrics (module docstring): ``tr_r1/5/10``, ``ir_r1/5/10``, ``rsum``,
    ``r_mean``, ``n_images``, ``n_captions``, ``itm_pairs`` (pairs the ITM head scored; 0 without a head),
    ``tr_r1_chance``/``ir_r1_chance`` (R@1 of a random ranking), and ``coarse``: the same recalls of the
    contrastive ranking alone (what the re-ranking starts from). ``itm_head`` None: coarse ranking only.
    """
    modules = [m for m in (backbone, itm_head) if m is not None]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        enc = encode_set(backbone, rset, collator, batch_size, device, show_progress)
        sim = enc.text_embed.float() @ enc.visual_embed.float().t()  # (C, I)
        if itm_head is None or not backbone.with_cross:
            i2t, t2i, n_pairs = sim.t().double(), sim.double(), 0
        else:
            pairs = candidate_pairs(sim, k_captions, k_images)
            itm = shard_and_gather(
                pairs, lambda p: itm_pair_scores(backbone, itm_head, enc, p, batch_size, show_progress),
                rank, world_size)
            if itm_prior_scale:  # the score the head was trained with (module docstring, step 4)
                itm = itm + itm_prior_scale * sim[pairs[:, 0], pairs[:, 1]].to(itm)
            i2t, t2i = coarse_to_fine_scores(sim, pairs, itm, k_captions, k_images)
            n_pairs = int(pairs.shape[0])
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    out = retrieval_recalls(i2t.cpu(), t2i.cpu(), rset.caption_image, image_key=rset.image_key)
    coarse = retrieval_recalls(sim.t().double().cpu(), sim.double().cpu(), rset.caption_image,
                               image_key=rset.image_key)
    out["coarse"] = {k: v for k, v in coarse.items() if k not in ("n_images", "n_captions")}
    truth = retrieval_truth(rset.caption_image, len(rset.images), rset.image_key)  # (C, I)
    out["itm_pairs"] = n_pairs
    out["tr_r1_chance"] = chance_recall(truth.t(), 1)
    out["ir_r1_chance"] = chance_recall(truth, 1)
    return out
