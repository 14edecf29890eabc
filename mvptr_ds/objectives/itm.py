"""ITM, image-text matching with in-batch negatives, hardest by default (MVPTR.md section 3; stage 2).

Mining follows the release: from the contrastive similarity ``S`` (no gradient through the choice) each
text's hardest image and each image's hardest text are taken. The release excludes only the pair itself
(``S - 2I``); with ``exclude_same_image`` (a correction, on by default) every pair sharing the row's image
is excluded, so another caption of the same image is never called a mismatch. The rows of
``batch.itm_text_side`` (``B // 2`` of them, drawn by the data pipeline as the release's ``randperm``
split) pair their text with its hardest image, the other rows their image with its hardest text: B
negatives. The uni-modal outputs of the forward pass are reused; only the cross-modal encoder and the
pooler run again, on the negatives. Positives use ``outputs.pooled``. The 2-way head scores 2B examples,
label 1 = matched.

Other choices of the negative (``ObjectiveConfig.itm_negatives``): ``"sampled"`` draws it with probability
``softmax(scale * S)`` over the allowed candidates (``scale`` VSC's temperature), as ALBEF does; ``"random"``
uniformly over them. The draws are inverse-CDF lookups of ``batch.itm_negative_draw`` (uniform numbers drawn
by the data pipeline), so the objective stays a deterministic function of its inputs. On the built-in world
(tiny model trained from scratch, VSC + ITM, 400 steps, lr 3e-4) the hardest and the sampled negatives
leave the ITM loss near ln 2 (0.691 and 0.683 averaged over the run; re-ranked R@1 at most 5.5%); random
ones bring it to 0.474 (accuracy 0.73) and re-ranked R@1 to 14.1% / 9.4% (chance 1.6%); see
the learnability section of ``BENCHMARKS.md``.

With ``prior`` (``ObjectiveConfig.itm_prior``, beyond the release) every example's match logit gets
``e^tau S`` added, ``S`` the contrastive similarity of its text and image and ``e^tau`` VSC's temperature, both
without gradient: the head learns a correction of the contrastive score, and re-ranking with the same score
(:func:`prior_scale`, used by the evaluation) starts from the coarse ranking. On the built-in world a head
trained alone fits the training images and ranks held-out near misses below the contrastive similarity
(re-ranking 3-27 points below the coarse ranking); with the prior and the quick start's recipe, re-ranking stays
within about 3 points of it (BENCHMARKS.md, learnability section).

A row without any allowed negative (every pair of the batch shows its image, or a batch of one) still runs
through the cross-modal encoder, paired with its own image, with weight 0: shapes and code path never
depend on the data, so every rank does the same work. The loss is the mean over weighted examples.

Global mining (``gather`` given, off by default): the similarity is taken against the contrastive
embeddings of all ranks and negatives may come from any rank. Their uni-modal states (text states and
masks, region states and masks) are all-gathered with gradient, padded first to the longest text and
region length over the ranks (one small all-gather plus a host sync); this costs ``world_size`` times
the local states' memory. Gradients reaching another rank's states return to it through the gather's
backward. With one rank this is exactly the local computation.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.data.types import Batch
from mvptr_ds.objectives.base import Gather, LossOutput
from mvptr_ds.objectives.vsc import gathered, temperature

if TYPE_CHECKING:
    from mvptr_ds.config import ObjectiveConfig
    from mvptr_ds.model.mvptr import EncoderOutputs, MVPTRModel


def blocked_candidates(image_ids: torch.Tensor, candidate_image_ids: torch.Tensor, own: torch.Tensor,
                       exclude_same_image: bool = True) -> torch.Tensor:
    """``[B, N]`` bool: candidates row i may not take as its negative. Every candidate showing row i's image
    with ``exclude_same_image``, else only row i's own pair ``own[i]`` (the release's ``S - 2I``)."""
    if exclude_same_image:
        return image_ids[:, None] == candidate_image_ids[None, :]
    return torch.arange(candidate_image_ids.shape[0], device=own.device)[None, :] == own[:, None]


@torch.no_grad()
def hardest_negatives(sim: torch.Tensor, blocked: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index of the most similar allowed candidate, per row.

    sim ``[B, N]`` (row i's query vs N candidates), blocked ``[B, N]`` (:func:`blocked_candidates`). Returns
    (index ``[B]`` long, valid ``[B]`` bool); where every candidate is blocked, valid is False and the index
    is meaningless.
    """
    return sim.float().masked_fill(blocked, float("-inf")).argmax(dim=1), ~blocked.all(dim=1)


@torch.no_grad()
def sampled_negatives(sim: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor,
                      draw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An allowed candidate per row with probability ``softmax(scale * sim)``: the inverse CDF at ``draw``.

    sim and blocked ``[B, N]``, scale a scalar tensor (0: uniform), draw ``[B]`` uniform in [0, 1). Same
    ``valid`` as :func:`hardest_negatives`; a row without an allowed candidate gets index 0 (meaningless).
    """
    valid = ~blocked.all(dim=1)
    logits = (sim.float() * scale.float()).masked_fill(blocked, float("-inf"))
    logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))  # no all -inf row
    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)  # (B, N)
    target = draw.float()[:, None] * cdf[:, -1:]  # (B, 1)
    index = (cdf <= target).sum(dim=1).clamp(max=sim.shape[1] - 1)  # first candidate whose cdf passes the draw
    return index, valid


def negative_pairs(t2v: torch.Tensor, v2t: torch.Tensor, image_ids: torch.Tensor, all_image_ids: torch.Tensor,
                   offset: int, text_side: torch.Tensor, mode: str = "hardest",
                   scale: Optional[torch.Tensor] = None, draw: Optional[torch.Tensor] = None,
                   exclude_same_image: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which (text, image) forms each row's negative, as indices into the (gathered) batch.

    t2v ``[B, N]`` = this rank's texts vs all images, v2t ``[B, N]`` = its images vs all texts; this rank's
    pairs are rows ``offset .. offset+B-1`` of the gathered batch. ``text_side`` ``[B]`` bool: rows whose
    text gets a negative image. Returns text index ``[B]``, image index ``[B]`` and valid ``[B]`` bool. An
    invalid row is paired with its own image (weight 0 later). ``mode`` "hardest" (the release), "sampled"
    (:func:`sampled_negatives` at ``scale``) or "random" (uniform over the allowed candidates); the last two
    read ``draw`` ``[B, 2]`` (column 0 for the text side, 1 for the image side).
    """
    b = t2v.shape[0]
    own = offset + torch.arange(b, device=t2v.device)  # (B,)
    blocked = blocked_candidates(image_ids, all_image_ids, own, exclude_same_image)  # (B, N)
    if mode == "hardest":
        neg_image, valid_t = hardest_negatives(t2v, blocked)
        neg_text, valid_v = hardest_negatives(v2t, blocked)
    elif mode in ("sampled", "random"):
        if draw is None or (mode == "sampled" and scale is None):
            raise ValueError(f"itm: {mode!r} negatives need the batch's draws (and a scale when sampled)")
        scale = t2v.new_zeros(()) if mode == "random" else scale  # scale 0: uniform over the allowed candidates
        neg_image, valid_t = sampled_negatives(t2v, blocked, scale, draw[:, 0])
        neg_text, valid_v = sampled_negatives(v2t, blocked, scale, draw[:, 1])
    else:
        raise ValueError(f"itm: negatives mode {mode!r} is not 'hardest', 'sampled' or 'random'")
    text_side = text_side.bool()
    valid = torch.where(text_side, valid_t, valid_v)
    text_idx = torch.where(text_side | ~valid, own, neg_text)
    image_idx = torch.where(~text_side | ~valid, own, neg_image)
    return text_idx, image_idx, valid


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 of ``x`` (``[B, L, ...]``) with zeros/False up to ``length``."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad)


def _gather_states(text_h, text_mask, region_h, region_mask, gather: Optional[Gather]):
    """Uni-modal states of every pair of the (gathered) batch, padded to common lengths across ranks."""
    if gather is None:
        return text_h, text_mask, region_h, region_mask
    lengths = gather(torch.tensor([[text_h.shape[1], region_h.shape[1]]], device=text_h.device))  # (W, 2)
    lt, lr = (int(v) for v in lengths.max(dim=0).values.tolist())  # host sync: lengths are shapes
    # Masks travel as uint8: not every backend all-gathers bool tensors.
    return (gather(_pad_to(text_h, lt)), gather(_pad_to(text_mask, lt).to(torch.uint8)).bool(),
            gather(_pad_to(region_h, lr)), gather(_pad_to(region_mask, lr).to(torch.uint8)).bool())


def prior_scale(logit_scale: torch.Tensor, objectives: "ObjectiveConfig") -> float:
    """The weight of the contrastive similarity in an ITM score at evaluation: VSC's temperature ``e^tau`` (the
    one :func:`itm_loss` adds, as a tensor there: no host sync per step; capped as ``objectives.cap_logit_scale``
    says) with ``objectives.itm_prior``, else 0."""
    return float(temperature(logit_scale.detach(), objectives.cap_logit_scale)) if objectives.itm_prior else 0.0


def itm_loss(outputs: "EncoderOutputs", batch: Batch, model: "MVPTRModel", head: nn.Module,
             gather: Optional[Gather] = None, negatives: str = "hardest", exclude_same_image: bool = True,
             cap_scale: bool = True, prior: bool = False) -> LossOutput:
    """Cross-entropy of the ITM head over B positives and B negatives (label 1 = matched); ``negatives``
    "hardest" (the release), "sampled" or "random" (module docstring); ``cap_scale``: VSC's cap on the
    temperature, which "sampled" and ``prior`` use; ``prior``: ``e^tau S`` added to the match logit.

    Reads ``outputs.text`` ``[B, Lt, H]``, the regions ``outputs.visual[:, num_tags:]`` ``[B, Lr, H]``,
    ``outputs.text_embed``/``visual_embed`` ``[B, D]`` (for mining), ``outputs.pooled`` ``[B, H]``,
    ``batch.itm_text_side`` and (sampled, random) ``batch.itm_negative_draw``;
    runs ``model.pooled_cross`` on the B negatives; ``head`` maps ``[2B, H] -> [2B, 2]``.
    Metrics: ``acc`` (over weighted examples) and ``neg_valid`` (fraction of rows with a negative).
    """
    if outputs.pooled is None:
        raise ValueError("itm: the cross-modal encoder did not run (outputs.pooled is None)")
    b = outputs.text.shape[0]
    regions = outputs.visual[:, outputs.num_tags:]  # (B, Lr, H)
    if regions.shape[1] != batch.region_mask.shape[1] or outputs.text.shape[1] != batch.text_mask.shape[1]:
        raise ValueError(f"itm: encoder outputs (text {outputs.text.shape[1]}, regions {regions.shape[1]} positions) "
                         f"do not match the batch masks (text {batch.text_mask.shape[1]}, regions "
                         f"{batch.region_mask.shape[1]})")
    with torch.no_grad():
        (all_text_e, all_visual_e, all_ids), offset = gathered(
            (outputs.text_embed.detach(), outputs.visual_embed.detach(), batch.image_ids), gather)
        t2v = outputs.text_embed.detach().float() @ all_visual_e.float().t()  # (B, N)
        v2t = outputs.visual_embed.detach().float() @ all_text_e.float().t()  # (B, N)
        scale = temperature(outputs.logit_scale.detach(), cap_scale).reshape(()) if negatives == "sampled" else None
        text_idx, image_idx, valid = negative_pairs(t2v, v2t, batch.image_ids, all_ids, offset, batch.itm_text_side,
                                                    negatives, scale, batch.itm_negative_draw, exclude_same_image)
    text_h, text_mask, region_h, region_mask = _gather_states(
        outputs.text, batch.text_mask.bool(), regions, batch.region_mask.bool(), gather)
    neg_pooled = model.pooled_cross(text_h[text_idx], text_mask[text_idx],
                                    region_h[image_idx], region_mask[image_idx])  # (B, H)
    pooled = torch.cat([outputs.pooled, neg_pooled], dim=0)  # (2B, H)
    logits = head(pooled).float()  # (2B, 2)
    if prior:
        with torch.no_grad():
            s_pos = (outputs.text_embed.float() * outputs.visual_embed.float()).sum(-1)  # (B,)
            s_neg = (all_text_e[text_idx].float() * all_visual_e[image_idx].float()).sum(-1)  # (B,)
            shift = temperature(outputs.logit_scale.detach(), cap_scale) * torch.cat([s_pos, s_neg])  # (2B,)
        logits = torch.stack([logits[:, 0], logits[:, 1] + shift], dim=1)
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=logits.device),
                        torch.zeros(b, dtype=torch.long, device=logits.device)])  # (2B,)
    weight = torch.cat([torch.ones(b, device=logits.device), valid.float()])  # (2B,)
    denom = weight.sum().clamp(min=1)
    loss = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / denom
    with torch.no_grad():
        acc = ((logits.argmax(1) == labels).float() * weight).sum() / denom
        neg_valid = valid.float().mean() if b else logits.new_zeros(())
    return LossOutput("itm", loss, {"acc": acc, "neg_valid": neg_valid})


def cold_start_note(objective_names, itm_negatives: str) -> str:
    """The log line for a run that mines ITM's hardest negatives on weights nobody trained (no ``--init_from``,
    no resume), else "": the contrastive similarity that picks them is noise then, and the ITM loss stays near
    ln 2 until it is not (the learnability section of ``BENCHMARKS.md``)."""
    if "itm" not in objective_names or itm_negatives != "hardest":
        return ""
    return ("note: ITM's hardest negatives are mined from the contrastive similarity, which a randomly initialised "
            "model does not have yet (the ITM loss stays near ln 2): start from trained weights (--init_from a "
            "pre-trained checkpoint or a Hugging Face BERT folder) or mine --itm_negatives random (or sampled)")
