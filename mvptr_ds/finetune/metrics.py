"""Standard metrics of the downstream tasks (MVPTR.md section 4), as plain functions of tensors.

* VQA: soft accuracy (Antol et al. 2015; Goyal et al. 2017). An answer given by ``m`` of ``n`` annotators
  scores the mean, over the ``n`` leave-one-annotator-out subsets, of ``min(1, matches / 3)``; with the
  usual 10 annotators that is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4 (:func:`vqa_answer_score`).
  A question's accuracy is the score of the predicted answer (:func:`vqa_soft_accuracy`).
* SNLI-VE: accuracy over the three labels (:func:`accuracy`).
* Referring expressions: a prediction (one detected region) is right when its box has IoU >= 0.5 with the
  target box (:func:`box_iou`, :func:`iou_accuracy`).

All return percentages (0-100) as Python floats; nothing here reduces across ranks (callers sum counts).
"""
from __future__ import annotations

import torch

IOU_THRESHOLD = 0.5


def vqa_answer_score(matches: int, annotators: int) -> float:
    """Soft score of an answer given by ``matches`` of ``annotators`` people (official VQA formula)."""
    if annotators < 1 or not 0 <= matches <= annotators:
        raise ValueError(f"vqa_answer_score: need 0 <= matches ({matches}) <= annotators ({annotators}), "
                         f"annotators >= 1")
    if annotators == 1:
        return min(1.0, matches / 3)
    # Leaving out one of the `matches` agreeing annotators leaves matches-1, else matches.
    left_out_agreeing = matches * min(1.0, (matches - 1) / 3)
    left_out_other = (annotators - matches) * min(1.0, matches / 3)
    return (left_out_agreeing + left_out_other) / annotators


def vqa_soft_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean soft score of the predicted answers, in percent.

    predicted ``[N]`` long answer indices; targets ``[N, A]`` soft scores in [0, 1].
    """
    if predicted.dim() != 1 or targets.dim() != 2 or targets.shape[0] != predicted.shape[0]:
        raise ValueError(f"vqa_soft_accuracy: predicted {tuple(predicted.shape)} must be [N] and targets "
                         f"{tuple(targets.shape)} [N, A]")
    if predicted.numel() == 0:
        return 0.0
    if int(predicted.min()) < 0 or int(predicted.max()) >= targets.shape[1]:
        raise ValueError(f"vqa_soft_accuracy: predicted answers must be in [0, {targets.shape[1]})")
    return 100.0 * float(targets.gather(1, predicted.long()[:, None]).double().mean())


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of ``predicted == labels`` (both ``[N]``)."""
    if predicted.shape != labels.shape:
        raise ValueError(f"accuracy: predicted {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ")
    if predicted.numel() == 0:
        return 0.0
    return 100.0 * float((predicted == labels).double().mean())


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of matching boxes ``x1, y1, x2, y2``: a, b ``[..., 4]`` -> ``[...]``.

    Any unit works as long as both use it (IoU is unchanged by scaling x and y). Boxes with no area have
    IoU 0 with everything.
    """
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"box_iou: boxes must be [..., 4], got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = torch.broadcast_tensors(a.double(), b.double())
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def iou_accuracy(predicted_iou: torch.Tensor, threshold: float = IOU_THRESHOLD) -> float:
    """Percentage of predictions whose IoU with the target is >= ``threshold``; predicted_iou ``[N]``."""
    if predicted_iou.numel() == 0:
        return 0.0
    return 100.0 * float((predicted_iou >= threshold).double().mean())
