"""All-gather with gradient, for contrastive negatives and ITM hard negatives from every rank.

The only place the objectives' cross-rank communication lives: ``objectives/`` never imports
``torch.distributed``; ``assembly.build`` passes ``global_gather_fn()`` into the pre-training module when
``objectives.global_negatives`` is set.

Gradient: rank r's loss uses rank q's rows through the gathered copy, so the backward of the gather sums
the incoming gradient over ranks (all-reduce) and returns this rank's slice. With DeepSpeed averaging
parameter gradients over ranks, the result is the gradient of the mean of the per-rank losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


_MAX_DIMS = 8


class GatherShapeError(ValueError):
    """Ranks tried to all-gather tensors of different shapes (every rank must give the same shape)."""


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        ctx.rank, ctx.rows = rank, t.shape[0]
        return torch.cat(parts, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks of d(loss_r)/d(gathered)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (``[B, ...]``) over all ranks along dim 0: ``[world_size * B, ...]``, rank order.

    Every rank must call it with the same shape; this is checked first (one tiny all-gather and a host
    sync), and a mismatch raises ``GatherShapeError`` on every rank instead of hanging. Backward: this
    rank's slice of the gradient summed over ranks. Integer and bool tensors work too (no gradient then).
    """
    if t.dim() > _MAX_DIMS:
        raise GatherShapeError(f"all_gather_with_grad supports up to {_MAX_DIMS} dimensions, got shape {tuple(t.shape)}")
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=t.device)
    shape[0] = t.dim()
    shape[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):  # same verdict on every rank: no one hangs
        listed = "; ".join(f"rank {r}: {tuple(s[1:1 + int(s[0])].tolist())}" for r, s in enumerate(shapes))
        raise GatherShapeError(f"all_gather_with_grad needs the same shape on every rank, got {listed}")
    if t.dtype == torch.bool:
        return _AllGatherWithGrad.apply(t.to(torch.uint8)).bool()
    return _AllGatherWithGrad.apply(t)


@dataclass(frozen=True)
class RankGather:
    """``all_gather_with_grad`` plus the rank placement the objectives need (``objectives.base.Gather``)."""

    rank: int
    world_size: int

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_with_grad(t)


def global_gather_fn() -> Optional[RankGather]:
    """The gather for global negatives when torch.distributed runs with more than one rank, else None
    (with one rank the objectives' local computation is already the global one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RankGather(rank=dist.get_rank(), world_size=dist.get_world_size())
    return None
