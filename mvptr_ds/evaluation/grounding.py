"""Phrase grounding accuracy under the WPG similarity (MVPTR.md section 3).

For every concept of every image-caption pair whose true region is known (the built-in world knows it:
``Example.concept_regions``, ``Batch.phrase_regions``), the pair runs through the whole model (no
corruption); the concept's cross-modal output is compared by cosine with the cross-modal outputs of the
image's regions, as WPG does, and the concept counts as grounded when its most similar region is the true
one. ``accuracy`` is the percentage grounded; ``chance`` the expected percentage of a random pick, the
mean of ``1 / regions`` over the scored concepts. Concepts whose region is unknown or was cut by
truncation (-1) are not scored.

With several ranks (``torch.distributed`` initialised), rank r takes batches r, r+W, ... and the counts
are summed over ranks.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from mvptr_ds.config import ConfigError
from mvptr_ds.evaluation.retrieval import _check_collator, _chunks, progress


@torch.no_grad()
def grounding_counts(backbone, batch) -> torch.Tensor:
    """``[3]`` float64: (concepts grounded, concepts scored, sum of 1/regions) for one clean batch."""
    out = backbone(batch, run_cross=True)
    lt = batch.text_mask.shape[1]
    phrases = F.normalize(out.cross[:, :lt].float(), dim=-1)  # (B, Lt, H)
    regions = F.normalize(out.cross[:, lt:].float(), dim=-1)  # (B, Lr, H)
    region_mask = batch.region_mask.bool()  # (B, Lr)
    cos = torch.bmm(phrases, regions.transpose(1, 2)).masked_fill(~region_mask[:, None, :], float("-inf"))
    best = cos.argmax(dim=-1)  # (B, Lt)
    truth = batch.phrase_regions  # (B, Lt), -1 unknown
    scored = batch.phrase_mask.bool() & (truth >= 0)  # (B, Lt)
    hits = (best == truth) & scored
    n_regions = region_mask.sum(dim=1, keepdim=True).double().expand_as(truth)  # (B, Lt)
    return torch.stack([hits.sum().double(), scored.sum().double(), (1.0 / n_regions)[scored].sum()])


@torch.no_grad()
def evaluate_grounding(backbone, dataset, collator, batch_size: int = 64, device="cpu", rank: int = 0,
                       world_size: int = 1, show_progress: bool = False) -> Dict[str, float]:
    """``{"accuracy", "chance", "n"}`` (percentages; ``n`` concepts scored) over an indexable dataset of Examples.

    Raises ConfigError when the model has no cross-modal encoder (a stage-1 model) or the data carries no
    concept regions.
    """
    if not backbone.with_cross:
        raise ConfigError("grounding needs the cross-modal encoder, and this model has none (a stage-1 "
                          "checkpoint); evaluate a stage-2 model or drop 'grounding' from --tasks")
    _check_collator(collator)
    was_training = backbone.training
    backbone.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    try:
        chunks = list(_chunks(len(dataset), batch_size))[rank::world_size]
        for lo, hi in progress(chunks, "grounding", show_progress):
            batch = collator([dataset[i] for i in range(lo, hi)])
            if batch.phrase_regions is None:
                raise ConfigError("grounding needs the true region of each concept, and the data carries none "
                                  "(only the built-in world has them); drop 'grounding' from --tasks")
            totals += grounding_counts(backbone, batch.to(device)).cpu()
    finally:
        backbone.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        t = totals.to(device)
        dist.all_reduce(t)
        totals = t.cpu()
    hits, n, inv = totals.tolist()
    if n == 0:
        raise ConfigError("grounding: no concept with a known region in the evaluation data")
    return {"accuracy": 100.0 * hits / n, "chance": 100.0 * inv / n, "n": int(n)}
