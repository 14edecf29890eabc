"""Dropout: on the CPU with a cheaper random mask than PyTorch's, elsewhere ``F.dropout``.

``F.dropout`` on the CPU draws one Bernoulli variate per element through ``bernoulli_`` (about 15 ns per
element on two AVX2 cores: 4-5% of a base-size training step, most of it on the attention probabilities).
Here one 64-bit draw of torch's generator (``random_`` on int64) gives two 32-bit uniforms, and an element
is dropped when its uniform falls below ``round(p * 2**32)``: probability ``p`` to within ``2**-33``. Kept
values are scaled by ``1 / (1 - p)`` as PyTorch does, and backward applies the same boolean mask (saved: one
byte per element, like PyTorch's native dropout). The draws come from torch's default CPU generator, so
``torch.manual_seed`` makes them reproducible; they are not the draws ``F.dropout`` would make.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TWO_32 = 1 << 32
_INT32_MIN = -(1 << 31)


def drop_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool tensor of ``shape``, True where an element is dropped (probability ``p`` in ``[0, 1)``)."""
    n = 1
    for s in shape:
        n *= int(s)
    threshold = round(p * _TWO_32)
    if not 0 <= threshold < _TWO_32:
        raise ValueError(f"drop probability {p} is outside [0, 1)")
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-(1 << 63), (1 << 63) - 1)
    uniforms = bits.view(torch.int32)[:n].view(shape)  # each uniform over [-2**31, 2**31)
    return uniforms < _INT32_MIN + threshold


class _MaskedScale(torch.autograd.Function):
    """``x`` with the ``drop`` positions zeroed and the rest times ``scale``; the same in backward."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None, None


class _AddMasked(torch.autograd.Function):
    """``residual + scale * x * keep`` in one pass (``keep``: 0 where dropped, 1 elsewhere, in x's dtype; the
    scale stays a Python float, so a bf16 run scales by 1 / (1 - p), not by its bf16 rounding)."""

    @staticmethod
    def forward(ctx, x, residual, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.addcmul(residual, x, keep, value=scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), grad, None, None


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``dropout(x, p, training) + residual`` (the residual branch of a post-LN layer); on CPU tensors of one
    dtype in a single pass, with a mask drawn as :func:`drop_mask` draws it."""
    if (x.device.type != "cpu" or not training or p == 0.0 or x.numel() == 0 or x.dtype != residual.dtype
            or x.shape != residual.shape or round(p * _TWO_32) >= _TWO_32):
        return dropout(x, p, training) + residual
    keep = (~drop_mask(x.shape, p, x.device)).to(x.dtype)
    return _AddMasked.apply(x, residual, keep, 1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``; on CPU tensors with the mask of :func:`drop_mask` (module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if round(p * _TWO_32) >= _TWO_32:  # p = 1 (or within 2**-33 of it): everything dropped
        return x * 0.0
    return _MaskedScale.apply(x, drop_mask(x.shape, p, x.device), 1.0 / (1.0 - p))
