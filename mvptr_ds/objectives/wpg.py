"""WPG, weakly-supervised phrase grounding (MVPTR.md section 3; stage 2, fine alignment).

For pair i and another pair j, ``s(i, j)`` is the mean over the phrases (concepts) of caption i of one of
each phrase's top-k cosine similarities to the regions of image j, picked at random (index
``floor(pick * k_j)``, ``k_j = min(k, regions of j)``, ``pick`` uniform in [0, 1)). As in the release, the
positive ``s(i, i)`` and the negative ``s(i, j)`` take independent picks (``batch.wpg_pick_positive``,
``batch.wpg_pick_negative``). The loss is the hinge ``max(0, margin + s(i, j) - s(i, i))`` with
``j = batch.wpg_negative_pair[i]``, averaged over the pairs that have a phrase, a negative pair, and regions
on both sides; with ``exclude_same_image`` (a correction, on by default) also an image that differs from
i's (the data pipeline then draws j among such pairs). Phrase states are the cross-modal outputs at the
concept positions; region states the cross-modal outputs at the region positions.

Whose cross-modal states score the negative ``s(i, j)`` (``ObjectiveConfig.wpg_negative_encoding``):

* ``"separate"`` (default, the release): phrases and regions of the positive encodings of pair i and pair
  j, no extra pass. The hinge can then be met by a sequence-level shortcut: every state of one sequence
  shares a component that the other sequence lacks, so ``s(i, i)`` rises for all regions alike.
* ``"joint"`` (beyond the release): those of the pair (caption i, image j) encoded together,
  ``negative_cross``, one extra cross-modal pass over the B negative pairs
  (``PretrainingModule.wpg_negative_cross``). Then ``s(i, i)`` and ``s(i, j)`` are both similarities
  *within* one cross-modal sequence, and the only way to separate them is for phrases to sit closer to the
  regions they name. On the built-in world (tiny model, WPG alone, 400 steps at lr 3e-4, same run
  otherwise) grounding accuracy is 5.0% with ``"separate"`` and 39.6% with ``"joint"`` (chance
  6.7%; the learnability section of ``BENCHMARKS.md``).
* ``"shared"`` (beyond the release; :func:`wpg_shared_loss`): caption i encoded with the regions of image i
  *and* of image j in one cross-modal sequence (``shared_cross``, one extra pass over B sequences of
  ``Lt + 2 Lr`` positions). Each phrase's softmax over all those regions (cosine / ``temperature``) must put
  its mass on image i's: the loss is ``-log`` of that mass, averaged over the phrases of the pairs that can
  be scored (multiple-instance learning: which of image i's regions is not said). Both images sit in the
  same sequence, so nothing a whole sequence shares (e.g. "this caption matches", which ITM teaches the
  cross-modal encoder to carry) can separate them; only phrase-to-region similarity can. With ``"joint"``
  the hinge is still met that way once ITM is trained: on the built-in world (tiny model, VSC + ITM +
  WPG, 600 steps; BENCHMARKS.md) grounding is 19.5% on held-out images and about the same on training
  images with ``"joint"``, 43.9% with ``"shared"`` (chance 6.7%).

Which pair j is (``ObjectiveConfig.wpg_negatives``, :func:`mined_negative_pairs`): ``"random"`` (the release)
keeps the data pipeline's uniform draw among the other images' pairs; ``"sampled"`` draws it with probability
``softmax(scale * S)`` over them (``S`` the contrastive similarity of caption i to the batch's images, ``scale``
VSC's temperature; as ITM's sampled negatives, from ``batch.wpg_negative_draw``), ``"hardest"`` takes the
most similar. A similar image tends to hold the same kinds of objects, so its regions differ from image i's
in attributes and relations, which the phrases must then tell apart. On the built-in world (tiny model,
stage 1 of VSC on joined pairs, then VSC + ITM + WPG ``"shared"`` weight 4, 600 steps; one run each from the
same stage 1) ``"sampled"`` grounds 37.8% of the held-out phrases, ``"random"`` 28.9% (chance 6.7%;
BENCHMARKS.md, learnability section).

``"shared"`` is harsher than the hinge in one way: every phrase is pushed away from all of image j's regions,
also from one that shows the same kind of object. With ``exclude_same_image`` off (``--recipe release``) a
negative of the same image is scored too; its regions are image i's, so such a phrase sits near ln 2 and
teaches nothing.

Fully batched: one ``[B, Lt, Lr]`` cosine matrix per side, masked top-k, a gather for the pick, masked
means. No Python loop over samples and no device-to-host synchronisation. Padded regions get similarity
-2 (below any cosine) before the top-k, so every value stays finite and masked terms are exact zeros. The
shared loss masks padded regions with -inf inside its softmax; the rows it does not score get finite logits
first, so no -inf - -inf (nor a NaN gradient) arises.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from mvptr_ds.data.types import Batch
from mvptr_ds.objectives.base import LossOutput, zero_loss
from mvptr_ds.objectives.itm import blocked_candidates, hardest_negatives, sampled_negatives
from mvptr_ds.objectives.vsc import temperature

if TYPE_CHECKING:
    from mvptr_ds.model.mvptr import EncoderOutputs

_BELOW_COSINE = -2.0  # fill for padded regions: sorts below every cosine, yet finite


def phrase_region_scores(phrases: torch.Tensor, phrase_mask: torch.Tensor, regions: torch.Tensor,
                         region_mask: torch.Tensor, pick: torch.Tensor, topk: int) -> torch.Tensor:
    """``s`` per row: mean over row i's phrases of a picked top-k cosine to the regions in row i of ``regions``.

    phrases ``[B, Lt, H]`` with phrase_mask ``[B, Lt]`` bool; regions ``[B, Lr, H]`` with region_mask
    ``[B, Lr]`` bool; pick ``[B, Lt]`` in [0, 1); topk >= 1. Returns ``[B]`` float; 0 where a row has no
    phrase or no region (the caller masks those rows out).
    """
    k = min(topk, regions.shape[1])
    if k == 0:
        return phrases.new_zeros(phrases.shape[0], dtype=torch.float32)
    p = F.normalize(phrases.float(), dim=-1)  # (B, Lt, H)
    r = F.normalize(regions.float(), dim=-1)  # (B, Lr, H)
    cos = torch.bmm(p, r.transpose(1, 2))  # (B, Lt, Lr)
    cos = cos.masked_fill(~region_mask[:, None, :], _BELOW_COSINE)
    top = cos.topk(k, dim=-1).values  # (B, Lt, k), descending; padded regions last
    k_row = region_mask.sum(dim=1).clamp(max=k)  # (B,) regions available to choose from
    choice = (pick.float() * k_row[:, None]).long()  # (B, Lt) in [0, k_row)
    choice = torch.minimum(choice, (k_row[:, None] - 1).clamp(min=0))  # guards pick == 1.0 and k_row == 0
    picked = top.gather(-1, choice.unsqueeze(-1)).squeeze(-1)  # (B, Lt)
    scored = phrase_mask & (k_row[:, None] > 0)  # (B, Lt)
    picked = torch.where(scored, picked, torch.zeros_like(picked))
    return picked.sum(dim=1) / scored.sum(dim=1).clamp(min=1)


def cold_start_note(objective_names, wpg_negatives: str) -> str:
    """The log line for a run that mines WPG's negatives (``sampled``, ``hardest``) on weights nobody trained,
    else "": until VSC has trained the contrastive similarity the mined image is no nearer than a random one."""
    if "wpg" not in objective_names or wpg_negatives == "random":
        return ""
    return (f"note: --wpg_negatives {wpg_negatives} mines WPG's negative image from the contrastive similarity, "
            "which a randomly initialised model does not have yet: the first negatives are random ones until VSC "
            "has trained it (start from a stage 1 with --objectives vsc, or keep --wpg_negatives random)")


@torch.no_grad()
def mined_negative_pairs(outputs: "EncoderOutputs", batch: Batch, mode: str, exclude_same_image: bool = True,
                         cap_scale: bool = True) -> Batch:
    """``batch`` with ``wpg_negative_pair`` chosen by ``mode`` (module docstring): ``"random"`` returns it as it
    is; ``"sampled"`` and ``"hardest"`` pick, per caption i, another pair of this rank's batch from the
    contrastive similarity of ``outputs.text_embed[i]`` to ``outputs.visual_embed`` (no gradient through the
    choice), never one showing image i with ``exclude_same_image`` (else never pair i itself); -1 where no
    pair qualifies."""
    if mode == "random":
        return batch
    if mode not in ("sampled", "hardest"):
        raise ValueError(f"wpg: negatives mode {mode!r} is not 'random', 'sampled' or 'hardest'")
    b = batch.image_ids.shape[0]
    own = torch.arange(b, device=batch.image_ids.device)
    blocked = blocked_candidates(batch.image_ids, batch.image_ids, own, exclude_same_image)  # (B, B)
    sim = outputs.text_embed.detach().float() @ outputs.visual_embed.detach().float().t()  # (B, B) caption x image
    if mode == "hardest":
        index, valid = hardest_negatives(sim, blocked)
    else:
        if batch.wpg_negative_draw is None:
            raise ValueError("wpg: sampled negatives need the batch's wpg_negative_draw (set by the collator)")
        scale = temperature(outputs.logit_scale.detach(), cap_scale).reshape(())
        index, valid = sampled_negatives(sim, blocked, scale, batch.wpg_negative_draw)
    return dataclasses.replace(batch, wpg_negative_pair=torch.where(valid, index, torch.full_like(index, -1)))


def wpg_loss(outputs: "EncoderOutputs", batch: Batch, margin: float = 0.2, topk: int = 3,
             negative_cross: Optional[torch.Tensor] = None, exclude_same_image: bool = True) -> LossOutput:
    """Hinge ``max(0, margin + s(i, j) - s(i, i))`` averaged over pairs that can be scored.

    ``negative_cross`` ``[B, Lt+Lr, H]``: the cross-modal encoding of (caption i, image
    ``wpg_negative_pair[i]``) per row, regions masked by ``region_mask[wpg_negative_pair]`` (``"joint"``);
    None scores the negative on the positive encodings of pairs i and j (``"separate"``, the release).
    Reads ``outputs.cross`` ``[B, Lt+Lr, H]`` (text positions first; Lt = ``batch.text_mask.shape[1]``),
    ``batch.phrase_mask`` ``[B, Lt]``, ``batch.region_mask`` ``[B, Lr]``, ``batch.wpg_negative_pair`` ``[B]``
    (-1: none), ``batch.wpg_pick_positive``/``wpg_pick_negative`` ``[B, Lt]`` and ``batch.image_ids`` ``[B]``.
    Exact 0 (with graph) when no pair can be scored. Metrics: ``pos``/``neg`` (mean s(i,i)/s(i,j) over scored
    pairs), ``pairs``.
    """
    if outputs.cross is None:
        raise ValueError("wpg: the cross-modal encoder did not run (outputs.cross is None)")
    lt, lr = batch.text_mask.shape[1], batch.region_mask.shape[1]
    if outputs.cross.shape[1] != lt + lr:
        raise ValueError(f"wpg: cross output has {outputs.cross.shape[1]} positions, the batch has {lt} text + "
                         f"{lr} region positions")
    phrases, regions = outputs.cross[:, :lt], outputs.cross[:, lt:]  # (B, Lt, H), (B, Lr, H)
    phrase_mask, region_mask = batch.phrase_mask.bool(), batch.region_mask.bool()
    neg = batch.wpg_negative_pair.clamp(min=0)  # (B,) -1 rows read row 0 and are masked out below
    s_pos = phrase_region_scores(phrases, phrase_mask, regions, region_mask, batch.wpg_pick_positive, topk)  # (B,)
    if negative_cross is None:
        neg_phrases, neg_regions = phrases, regions[neg]
    else:
        if negative_cross.shape[:2] != (outputs.cross.shape[0], lt + lr):
            raise ValueError(f"wpg: negative_cross has shape {tuple(negative_cross.shape)}, expected "
                             f"({outputs.cross.shape[0]}, {lt + lr}, H)")
        neg_phrases, neg_regions = negative_cross[:, :lt], negative_cross[:, lt:]
    s_neg = phrase_region_scores(neg_phrases, phrase_mask, neg_regions, region_mask[neg], batch.wpg_pick_negative,
                                 topk)  # (B,)
    valid = (phrase_mask.any(dim=1) & (batch.wpg_negative_pair >= 0) & region_mask.any(dim=1)
             & region_mask[neg].any(dim=1))  # (B,)
    if exclude_same_image:
        valid = valid & (batch.image_ids[neg] != batch.image_ids)
    hinge = (margin + s_neg - s_pos).clamp(min=0)  # (B,)
    count = valid.sum()
    denom = count.clamp(min=1).float()
    loss = torch.where(valid, hinge, torch.zeros_like(hinge)).sum() / denom + zero_loss(outputs.cross, negative_cross)
    with torch.no_grad():
        metrics = {"pos": torch.where(valid, s_pos, 0.0).sum() / denom,
                   "neg": torch.where(valid, s_neg, 0.0).sum() / denom,
                   "pairs": count.float()}
    return LossOutput("wpg", loss, metrics)


def wpg_shared_loss(outputs: "EncoderOutputs", batch: Batch, shared_cross: torch.Tensor, temperature: float = 0.1,
                    exclude_same_image: bool = True) -> LossOutput:
    """``"shared"``: ``-log`` of the softmax mass a phrase of caption i puts on image i's regions when image j's
    (``j = batch.wpg_negative_pair[i]``) are in the same sequence, averaged over the phrases of scorable pairs.

    ``shared_cross`` ``[B, Lt + 2 Lr, H]``: caption i's positions, then image i's ``Lr`` region positions (mask
    ``batch.region_mask[i]``), then image j's (mask ``batch.region_mask[j]``)
    (``PretrainingModule.wpg_negative_cross``). A pair is scored when it has a phrase, a negative pair,
    regions on both sides and, with ``exclude_same_image``, a different image. Exact 0 (with graph) when
    none is. Metrics: ``pos`` (mean mass on image i's regions over scored phrases), ``pairs``. ``outputs``
    only ties ``outputs.cross`` into the graph.
    """
    lt, lr = batch.text_mask.shape[1], batch.region_mask.shape[1]
    if shared_cross.shape[:2] != (batch.text_mask.shape[0], lt + 2 * lr):
        raise ValueError(f"wpg: shared_cross has shape {tuple(shared_cross.shape)}, expected "
                         f"({batch.text_mask.shape[0]}, {lt + 2 * lr}, H)")
    neg = batch.wpg_negative_pair.clamp(min=0)  # (B,) -1 rows read row 0 and are masked out below
    own_mask, neg_mask = batch.region_mask.bool(), batch.region_mask.bool()[neg]  # (B, Lr) each
    both = torch.cat([own_mask, neg_mask], dim=1)  # (B, 2 Lr)
    phrases = F.normalize(shared_cross[:, :lt].float(), dim=-1)  # (B, Lt, H)
    regions = F.normalize(shared_cross[:, lt:].float(), dim=-1)  # (B, 2 Lr, H)
    logits = torch.bmm(phrases, regions.transpose(1, 2)) / temperature  # (B, Lt, 2 Lr)
    logits = logits.masked_fill(~both[:, None, :], float("-inf"))
    valid = (batch.phrase_mask.bool().any(dim=1) & (batch.wpg_negative_pair >= 0) & own_mask.any(dim=1)
             & neg_mask.any(dim=1))  # (B,)
    if exclude_same_image:
        valid = valid & (batch.image_ids[neg] != batch.image_ids)
    scored = batch.phrase_mask.bool() & valid[:, None]  # (B, Lt)
    # rows without regions would give -inf - -inf; they are not scored, so give them finite logits first
    logits = torch.where(valid[:, None, None], logits, torch.zeros_like(logits))
    nll = logits.logsumexp(dim=-1) - logits[:, :, :lr].logsumexp(dim=-1)  # (B, Lt) >= 0
    nll = torch.where(scored, nll, torch.zeros_like(nll))
    count = scored.sum()
    denom = count.clamp(min=1).float()
    loss = nll.sum() / denom + zero_loss(outputs.cross, shared_cross)
    with torch.no_grad():
        metrics = {"pos": torch.where(scored, torch.exp(-nll), 0.0).sum() / denom,
                   "pairs": valid.float().sum()}
    return LossOutput("wpg", loss, metrics)
