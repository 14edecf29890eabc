"""VSC, visual-semantic contrastive loss (MVPTR.md section 3; stage 2, coarse alignment).

``S = g_t g_v^T`` over the L2-normalised projected ``[CLS]`` embeddings, and
``L = (CE(e^tau S, I) + CE(e^tau S^T, I)) / 2`` with in-batch negatives (CLIP's symmetric InfoNCE;
Radford et al. 2021). ``tau`` is the learnable ``logit_scale``.

Two corrections of the authors' code, each behind an option (``ObjectiveConfig``; ``--recipe release``
turns both off): ``cap_scale`` caps ``e^tau`` at 100 as CLIP does (``tau`` clamped at ln 100), so the
temperature cannot collapse; ``exclude_same_image`` removes captions of the same image from each other's
softmax (by ``batch.image_ids``) instead of calling them negatives. Beyond the release, optionally,
negatives come from every rank (``gather``). With a gather, rank r's texts are scored against the images of
all ranks and its images against all texts; labels are offset by ``r * B`` and the same-image exclusion uses
the gathered image ids. The mean of the per-rank losses then equals the loss of one process over the
concatenated batch, and with DeepSpeed's gradient averaging so do the gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from mvptr_ds.objectives.base import Gather, LossOutput

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned temperature


def gathered(tensors: Tuple[torch.Tensor, ...], gather: Optional[Gather]) -> Tuple[Tuple[torch.Tensor, ...], int]:
    """The tensors concatenated over ranks and the offset of this rank's rows (identity and 0 without a gather)."""
    if gather is None:
        return tensors, 0
    return tuple(gather(t) for t in tensors), gather.rank * tensors[0].shape[0]


def same_image_negatives(image_ids: torch.Tensor, all_image_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool: True where column j shares row i's image but is not row i's own pair (label)."""
    same = image_ids[:, None] == all_image_ids[None, :]  # (B, N)
    return same.scatter(1, labels[:, None], False)


def temperature(logit_scale: torch.Tensor, cap_scale: bool = True) -> torch.Tensor:
    """``e^tau`` in float32, capped at 100 when ``cap_scale``."""
    tau = logit_scale.float()
    return (tau.clamp(max=MAX_LOGIT_SCALE) if cap_scale else tau).exp()


def vsc_loss(text_embed: torch.Tensor, visual_embed: torch.Tensor, image_ids: torch.Tensor,
             logit_scale: torch.Tensor, gather: Optional[Gather] = None, exclude_same_image: bool = True,
             cap_scale: bool = True) -> LossOutput:
    """Symmetric contrastive loss (module docstring for the options).

    text_embed, visual_embed ``[B, D]`` (unit norm; row i of each is pair i), image_ids ``[B]`` long,
    logit_scale scalar (``tau``; the logits are ``e^tau * S``, ``min(e^tau, 100) * S`` with ``cap_scale``).
    Metrics: ``t2v_acc``/``v2t_acc`` (in-batch top-1 retrieval) and ``scale`` (``e^tau`` as applied).
    """
    b = text_embed.shape[0]
    if visual_embed.shape[0] != b or image_ids.shape != (b,):
        raise ValueError(f"vsc: text_embed {tuple(text_embed.shape)}, visual_embed {tuple(visual_embed.shape)} "
                         f"and image_ids {tuple(image_ids.shape)} disagree on the batch size")
    (all_text, all_visual, all_ids), offset = gathered((text_embed, visual_embed, image_ids), gather)
    labels = offset + torch.arange(b, device=text_embed.device)  # (B,) column of each row's own pair
    scale = temperature(logit_scale, cap_scale)
    t2v = scale * (text_embed.float() @ all_visual.float().t())  # (B, N)
    v2t = scale * (visual_embed.float() @ all_text.float().t())  # (B, N)
    if exclude_same_image:
        excluded = same_image_negatives(image_ids, all_ids, labels)  # (B, N)
        t2v, v2t = t2v.masked_fill(excluded, float("-inf")), v2t.masked_fill(excluded, float("-inf"))
    denom = 2 * max(b, 1)
    loss = (F.cross_entropy(t2v, labels, reduction="sum") + F.cross_entropy(v2t, labels, reduction="sum")) / denom
    with torch.no_grad():
        metrics = {"t2v_acc": (t2v.argmax(1) == labels).float().mean() if b else t2v.new_zeros(()),
                   "v2t_acc": (v2t.argmax(1) == labels).float().mean() if b else t2v.new_zeros(()),
                   "scale": scale.detach()}
    return LossOutput("vsc", loss, metrics)
