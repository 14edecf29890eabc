"""Standard metrics of the downstream tasks (MVPTR.md section 4), as plain functions of tensors.

* VQA: soft accuracy (Antol et al. 2015; Goyal et al. 2017). An answer given by ``m`` of ``n`` annotators
  scores the mean, over the ``n`` leave-one-annotator-out subsets, of ``min(1, matches / 3)``; with the
  usual 10 annotators that is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4 (:func:`vqa_answer_score`).
  A question's accuracy is the score of the predicted answer (:func:`vqa_soft_accuracy`).
* SNLI-VE: accuracy over the three labels (:func:`accuracy`).
* Referring expressions: a prediction (one detected region) is right when its box has IoU >= 0.5 with the
  target box (:func:`box_iou`, :func:`iou_accuracy`).

The percentages (0-100, Python floats) are means of per-example scores, which are also exposed
(:func:`task_scores`: each example's score and its chance, the expected score of a uniformly random
prediction) for callers that sum them over ranks (``finetune.runner.evaluate_task``); nothing here reduces
across ranks.
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


def vqa_scores(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft score of each predicted answer: predicted ``[N]`` long answer indices, targets ``[N, A]`` soft scores
    in [0, 1] -> ``[N]`` float64."""
    if predicted.dim() != 1 or targets.dim() != 2 or targets.shape[0] != predicted.shape[0]:
        raise ValueError(f"vqa_soft_accuracy: predicted {tuple(predicted.shape)} must be [N] and targets "
                         f"{tuple(targets.shape)} [N, A]")
    if predicted.numel() and (int(predicted.min()) < 0 or int(predicted.max()) >= targets.shape[1]):
        raise ValueError(f"vqa_soft_accuracy: predicted answers must be in [0, {targets.shape[1]})")
    return targets.gather(1, predicted.long()[:, None]).squeeze(1).double()


def vqa_soft_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean soft score of the predicted answers, in percent (shapes: :func:`vqa_scores`)."""
    scores = vqa_scores(predicted, targets)
    return 100.0 * float(scores.mean()) if scores.numel() else 0.0


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


def task_scores(task: str, predicted: torch.Tensor, answer_scores=None, labels=None, region_iou=None,
                region_mask=None):
    """Per-example ``(score, chance)``, each ``[N]`` float64 in [0, 1], of a task's predictions: the metric's
    score (VQA: the predicted answer's soft score; SNLI-VE: correct; RefCOCO: the predicted region's IoU with the
    target >= 0.5) and the expected score of a uniformly random prediction (over the answers; 1/3; over the
    image's real regions). ``predicted`` ``[N]`` long; the task's targets as in ``finetune.batching.TaskBatch``."""
    if task == "vqa":
        return vqa_scores(predicted, answer_scores.float()), answer_scores.double().mean(dim=1)
    if task == "snli_ve":
        return (predicted == labels).double(), torch.full(predicted.shape, 1 / 3, dtype=torch.float64,
                                                           device=predicted.device)
    if task == "refcoco":
        hit = region_iou >= IOU_THRESHOLD  # (N, Lr)
        real = region_mask.bool()
        chance = (hit & real).sum(1).double() / real.sum(1).clamp(min=1).double()
        return hit.gather(1, predicted[:, None]).squeeze(1).double(), chance
    raise ValueError(f"task_scores: no metric for task {task!r}")


def iou_accuracy(predicted_iou: torch.Tensor, threshold: float = IOU_THRESHOLD) -> float:
    """Percentage of predictions whose IoU with the target is >= ``threshold``; predicted_iou ``[N]``."""
    if predicted_iou.numel() == 0:
        return 0.0
    return 100.0 * float((predicted_iou >= threshold).double().mean())
