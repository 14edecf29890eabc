"""Retrieval metrics: recall@K both ways and the chance level (the task metrics live in ``finetune.metrics``).

Retrieval ranks are **pessimistic under ties**: the rank of a query's answer is the number of *wrong*
candidates whose score is greater than **or equal to** the best score of a right candidate. A candidate
tied with the right one is counted ahead of it, whatever the candidate order, so the result never depends
on the order of the images or captions, and a model that scores everything alike gets recall 0 rather
than the luck of index order. With several right candidates (the captions of one image), only the best
one counts (ties among right candidates do not matter).

Duplicated images: ``image_key`` (optional, ``[I]``) says which image entries show the same picture (equal
keys). A caption is then right for every entry of its picture and each such entry counts as right for it,
so a duplicate is never counted as a wrong candidate tied with (or beating) the true image. Without keys
every entry is its own picture.

Recalls are returned in percent. Nothing here reduces across ranks: callers gather first.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch


class MetricError(ValueError):
    """Inputs of a metric disagree in shape or hold non-finite scores; the message says which."""


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if scores.dim() != 2:
        raise MetricError(f"{name}: expected a 2-d score matrix, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise MetricError(f"{name}: the score matrix holds NaN or infinite values")


def ranks_of_truth(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Pessimistic rank (0 = first) of each query's best right candidate.

    scores ``[Q, C]`` (higher = better), truth ``[Q, C]`` bool (at least one True per row).
    Returns ``[Q]`` long: the number of wrong candidates scoring >= the best right candidate.
    """
    _check_scores(scores, "ranks_of_truth")
    if truth.shape != scores.shape:
        raise MetricError(f"ranks_of_truth: truth {tuple(truth.shape)} and scores {tuple(scores.shape)} differ")
    if not truth.any(dim=1).all():
        row = int((~truth.any(dim=1)).nonzero()[0])
        raise MetricError(f"ranks_of_truth: query {row} has no right candidate")
    s = scores.double()
    best = s.masked_fill(~truth, float("-inf")).max(dim=1).values  # (Q,)
    return ((s >= best[:, None]) & ~truth).sum(dim=1)


def recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> Dict[int, float]:
    """Percentage of queries whose rank is below K, for each K."""
    n = max(ranks.numel(), 1)
    return {k: 100.0 * float((ranks < k).sum()) / n for k in ks}


def retrieval_truth(caption_image: torch.Tensor, n_images: int,
                    image_key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[C, I]`` bool: image i is right for caption c (it is c's image, or shows the same picture).

    caption_image ``[C]`` long (index of each caption's image), image_key ``[I]`` (equal keys = same picture;
    None: every image is its own picture).
    """
    caption_image = caption_image.long()
    if caption_image.dim() != 1:
        raise MetricError(f"caption_image must be 1-d, got shape {tuple(caption_image.shape)}")
    if caption_image.numel() and (caption_image.min() < 0 or caption_image.max() >= n_images):
        bad = int(caption_image[(caption_image < 0) | (caption_image >= n_images)][0])
        raise MetricError(f"caption_image holds image index {bad} outside 0..{n_images - 1}")
    if image_key is None:
        image_key = torch.arange(n_images, device=caption_image.device)
    image_key = image_key.to(caption_image.device)
    if image_key.shape != (n_images,):
        raise MetricError(f"image_key has shape {tuple(image_key.shape)}, expected ({n_images},)")
    return image_key[caption_image][:, None] == image_key[None, :]  # (C, I)


def retrieval_recalls(i2t: torch.Tensor, t2i: torch.Tensor, caption_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), image_key: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Text retrieval (image -> captions) and image retrieval (caption -> images) recalls in percent.

    i2t ``[N_img, N_cap]``: row i scores every caption for image i; t2i ``[N_cap, N_img]``: row c scores
    every image for caption c (the two may differ: coarse-to-fine re-ranks each direction separately);
    caption_image ``[N_cap]`` long: index of each caption's image; image_key: see the module docstring.
    Every image needs at least one caption. Returns ``tr_r{k}``, ``ir_r{k}``, ``rsum`` (sum of the six),
    ``r_mean`` (their mean), ``n_images``, ``n_captions``.
    """
    _check_scores(i2t, "retrieval_recalls (i2t)")
    n_img, n_cap = i2t.shape
    if t2i.shape != (n_cap, n_img) or caption_image.shape != (n_cap,):
        raise MetricError(f"retrieval_recalls: i2t {tuple(i2t.shape)}, t2i {tuple(t2i.shape)} and caption_image "
                          f"{tuple(caption_image.shape)} disagree (expected [I, C], [C, I], [C])")
    truth = retrieval_truth(caption_image.to(i2t.device), n_img, image_key)  # (C, I)
    tr = recall_at(ranks_of_truth(i2t, truth.t()), ks)
    ir = recall_at(ranks_of_truth(t2i, truth), ks)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = tr[k]
    for k in ks:
        out[f"ir_r{k}"] = ir[k]
    values = list(tr.values()) + list(ir.values())
    out["rsum"] = sum(values)
    out["r_mean"] = sum(values) / len(values)
    out["n_images"] = int(n_img)
    out["n_captions"] = int(n_cap)
    return out


def chance_recall(truth: torch.Tensor, k: int = 1) -> float:
    """Expected recall@k in percent of a scorer that ranks candidates uniformly at random.

    truth ``[Q, C]`` bool. For a query with m right candidates out of n: P(a right one in the first k) =
    1 - C(n-m, k) / C(n, k).
    """
    n = truth.shape[1]
    probs = []
    for m in truth.sum(dim=1).tolist():
        miss = 1.0
        for j in range(min(k, n)):  # probability that the first k draws all miss
            miss *= max(n - m - j, 0) / (n - j)
        probs.append(1.0 - miss)
    return 100.0 * sum(probs) / max(len(probs), 1)
