"""Masked attention through ``torch.nn.attention.flex_attention`` with a padding block mask.

An alternative to the own Triton kernel for the GPU comparison (``benchmarks/kernels.py``): the block mask
lets flex skip fully padded (query block, key block) tiles. Same function as ``triton_attention.attention``:
rows of padded queries are 0, a sample with no real key gives zeros. On CUDA the kernel is compiled once
(lazily, on the first call); elsewhere flex runs its unfused eager path. Dropout is not supported by flex:
``dropout_p > 0`` falls back to the reference.
"""
from __future__ import annotations

import functools

import torch

from mvptr_ds.kernels import reference


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def padding_block_mask(key_padding_mask: torch.Tensor, block_size: int = 128):
    """BlockMask for ``mask[b, q] & mask[b, kv]`` over a ``[B, L]`` bool mask (True = real)."""
    from torch.nn.attention.flex_attention import create_block_mask
    mask = key_padding_mask.to(torch.bool)
    bsz, seq_len = mask.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b, q_idx] & mask[b, kv_idx]

    return create_block_mask(mask_mod, bsz, None, seq_len, seq_len, device=mask.device, BLOCK_SIZE=block_size)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
              dropout_p: float = 0.0, block_mask=None) -> torch.Tensor:
    """q, k, v ``[B, heads, L, head_dim]``, mask ``[B, L]`` bool -> ``[B, heads, L, head_dim]``.

    ``block_mask``: a prebuilt ``padding_block_mask(key_padding_mask)`` to reuse across layers.
    """
    if dropout_p > 0:
        return reference.attention(q, k, v, key_padding_mask, dropout_p)
    if block_mask is None:
        block_mask = padding_block_mask(key_padding_mask)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask)
