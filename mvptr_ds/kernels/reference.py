"""Plain PyTorch reference paths: always available, and the numerical oracle for the fused kernels."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mvptr_ds.kernels.dropout import dropout


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Masked self-attention.

    q, k, v: ``[B, heads, L, head_dim]``; key_padding_mask: ``[B, L]`` bool, True = real key.
    Returns ``[B, heads, L, head_dim]``. Rows of padded queries are computed but meaningless.
    """
    mask = key_padding_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, L]
    if dropout_p > 0 and q.device.type == "cpu":
        return _attention_with_cpu_dropout(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _attention_with_cpu_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                dropout_p: float) -> torch.Tensor:
    """What ``scaled_dot_product_attention`` computes with dropout on the CPU (its math path), with the cheaper
    dropout mask of :mod:`mvptr_ds.kernels.dropout`. ``mask`` ``[B, 1, 1, L]`` bool, True = real key; a
    masked key gets the dtype's lowest value (a row without any real key would average all, not give NaN)."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    scores = torch.add(bias, q @ k.transpose(-1, -2), alpha=1.0 / math.sqrt(q.shape[-1]))  # (B, nh, L, L)
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p)
    return probs @ v  # (B, nh, L, hd)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """The authors' (Hugging Face BERT's) attention: scores + additive -10000 mask, softmax, dropout, @ v.

    Same shapes as ``attention``. Kept for the authors-style baseline of ``benchmarks/throughput.py``.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, L, L)
    additive = (1.0 - key_padding_mask[:, None, None, :].to(scores.dtype)) * -10000.0  # (B, 1, 1, L)
    probs = F.dropout(torch.softmax(scores + additive, dim=-1), dropout_p, training=dropout_p > 0)
    return probs @ v  # (B, nh, L, hd)


def concept_embedding(input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      word_weight: torch.Tensor, position_weight: torch.Tensor, type_weight: torch.Tensor,
                      ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                      dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """BERT-style embedding of words, concepts and tags: gather + position + type, LayerNorm, dropout.

    ids: ``[..., L]`` long; returns ``[..., L, hidden]``.
    """
    x = F.embedding(input_ids, word_weight) + F.embedding(position_ids, position_weight) \
        + F.embedding(token_type_ids, type_weight)
    x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return dropout(x, dropout_p, training)
