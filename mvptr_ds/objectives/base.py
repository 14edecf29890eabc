"""What every objective shares: the ``LossOutput`` record, the exact-zero loss, the masked-token loss, and the
``ModuleOutput`` a training module returns.

Objectives are deterministic functions of (backbone outputs, batch): the randomness MVPTR needs (token
corruption, WPG negatives and top-k picks, ITM's text/image split and sampled negatives) is drawn by the data
pipeline with a seeded generator and travels in the batch.

Every objective keeps one code path whatever the batch holds. A batch with nothing to score (no masked
token, no phrase, no valid negative) gives an exact 0 that is still connected to the tensors the loss
would have used, so every parameter receives a (zero) gradient on every rank: ZeRO's gradient hooks fire
identically everywhere and no rank waits on a collective the others skip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LossOutput:
    """One objective's result. ``loss`` is a scalar with a graph; ``metrics`` are detached scalar tensors
    (kept on the device: reading them is the logger's business, not the step's)."""

    name: str
    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


class ModuleOutput(dict):
    """What a training module's ``forward`` returns (pre-training and every fine-tuning task): ``loss`` (scalar
    with a graph, what is trained), ``losses`` (each objective's or term's unweighted loss, with a graph) and
    ``metrics`` (detached scalars, ``"<objective>/<name>"``), read as attributes.

    A dict, as Hugging Face's ``ModelOutput`` is: DeepSpeed's engine starts its backward pass (the
    ``wall_clock_breakdown`` timers, the ZeRO optimizer's backward prologue) from hooks on the tensors of a
    module output that is a tensor, tuple, list or dict, and finds none in anything else. The attributes read
    the dict, so a tensor DeepSpeed replaces inside it (ZeRO-3 wraps module outputs) is the one used.
    """

    def __init__(self, loss: torch.Tensor, losses: Dict[str, torch.Tensor],
                 metrics: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__(loss=loss, losses=losses, metrics={} if metrics is None else metrics)

    @property
    def loss(self) -> torch.Tensor:
        return self["loss"]

    @property
    def losses(self) -> Dict[str, torch.Tensor]:
        return self["losses"]

    @property
    def metrics(self) -> Dict[str, torch.Tensor]:
        return self["metrics"]


class Gather(Protocol):
    """Cross-rank all-gather with gradient, injected by ``mvptr_ds.training.gather``.

    ``gather(t)`` concatenates ``t`` (``[B, ...]``, the same shape on every rank) over ranks along dim 0:
    ``[world_size * B, ...]``, rank r's rows at ``[r * B, (r + 1) * B)``. Its backward sums the incoming
    gradient over ranks and returns this rank's slice.
    """

    rank: int
    world_size: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact scalar 0 whose graph reaches every given tensor (their gradients are exact zeros).

    Built from empty slices (``t.flatten()[:0].sum()``), not ``0 * t.sum()``, so a NaN or inf inside a
    tensor can never turn the zero into NaN. ``None`` and tensors without a graph are skipped; with none
    left the result is a plain 0 on the first tensor's device.
    """
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        raise ValueError("zero_loss needs at least one tensor to take its device from")
    out = torch.zeros((), device=first.device, dtype=torch.float32)
    for t in tensors:
        if t is not None and t.requires_grad:
            out = out + t.flatten()[:0].sum().float()
    return out


def masked_token_loss(name: str, states: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> LossOutput:
    """Cross-entropy of ``head`` over the scored positions (label >= 0) of ``states``.

    states ``[B, L, H]``, labels ``[B, L]`` long (-1 = not scored), head ``[N, H] -> [N, V]``.
    Only the scored positions are gathered and sent through the head (the decoder over the word vocabulary
    dominates the cost). The loss is the mean over scored positions; with none it is an exact 0 that still
    passes through the head, so the head's parameters get (zero) gradients.
    Metrics: ``acc`` (top-1 accuracy on scored positions) and ``count`` (their number).
    """
    if states.shape[:2] != labels.shape:
        raise ValueError(f"{name}: states {tuple(states.shape)} and labels {tuple(labels.shape)} disagree on [B, L]")
    scored = labels >= 0  # (B, L)
    picked = states[scored]  # (N, H); N may be 0
    target = labels[scored]  # (N,)
    logits = head(picked).float()  # (N, V)
    count = scored.sum()
    denom = count.clamp(min=1).to(logits.dtype)
    # Summed then divided: an empty selection gives exactly 0 instead of CE's NaN mean over nothing.
    loss = F.cross_entropy(logits, target, reduction="sum") / denom
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).sum().to(logits.dtype)
    return LossOutput(name, loss, {"acc": correct / denom, "count": count.to(logits.dtype)})
