"""Plain PyTorch reference paths: always available, and the numerical oracle for the fused kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Masked self-attention.

    q, k, v: ``[B, heads, L, head_dim]``; key_padding_mask: ``[B, L]`` bool, True = real key.
    Returns ``[B, heads, L, head_dim]``. Rows of padded queries are computed but meaningless.
    """
    mask = key_padding_mask[:, None, None, :].to(torch.bool)  # [B, 1, 1, L]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


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
    return F.dropout(x, dropout_p, training)
