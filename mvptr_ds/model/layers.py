"""The post-LN BERT layer shared by MVPTR's three encoders, the encoder stack and the pooler.

Parameter names follow Hugging Face BERT (``layer.{i}.attention.self.query`` ... ``output.LayerNorm``) so
BERT weights and the authors' checkpoints map onto them by name. Attention goes through the kernel seam
``mvptr_ds.kernels.attention``; which implementation runs is chosen by ``ModelConfig.kernels``.

Unpadded compute: ``BertEncoder`` gathers the real tokens of a padded ``[B, L, H]`` batch into one
``[N, H]`` matrix (N = number of real tokens) and every position-wise part of a layer (Q/K/V and output
projections, residuals, LayerNorms, the feed-forward block) runs on those N rows only. Only attention
sees the ``[B, heads, L, head_dim]`` layout, scattered just for the kernel call and gathered back after.
Padded positions of the encoder's output are zeros. Real positions are computed exactly as in a padded
layer (everything but attention is position-wise, and attention masks padded keys).
With ``ModelConfig.skip_padding`` off (the authors-style baseline of ``benchmarks/throughput.py``) the encoder
computes the way the authors' code does instead: every position, padding included, goes through every layer
(``index=None``: no gather/scatter), and padded positions of the output hold whatever the layers computed.
Reference: Devlin et al., BERT (2019); MVPTR (Li et al., ACM MM 2022) section 3.1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mvptr_ds import kernels
from mvptr_ds.config import ModelConfig


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask (every real position sees every real position)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout
        self.impl = cfg.kernels

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """x: ``[N, H]`` real tokens; mask: ``[B, L]`` bool (True = real); index: ``[N]`` flat positions
        of the real tokens in ``B*L`` (None: x holds all ``B*L`` positions). Returns ``[N, H]``.
        """
        b, l = mask.shape
        qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)  # (N, 3H)
        padded = qkv if index is None else qkv.new_zeros(b * l, qkv.shape[-1]).index_copy(0, index, qkv)  # (B*L, 3H)
        # unbind, not qkv[0..2]: each index's backward would zero-fill a whole (3, B, nh, L, hd) gradient.
        q, k, v = padded.view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout_p if self.training else 0.0
        ctx = kernels.attention(q, k, v, mask, p, impl=self.impl)  # (B, nh, L, hd)
        ctx = ctx.transpose(1, 2).reshape(b * l, self.num_heads * self.head_dim)  # (B*L, H)
        return ctx if index is None else ctx.index_select(0, index)  # (N, H)


class BertSelfOutput(nn.Module):
    """Output projection, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout
        self.impl = cfg.kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(kernels.dropout_add(self.dense(x), residual, self.dropout_p, self.training, self.impl))


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, mask, index), x)


class BertIntermediate(nn.Module):
    """First FFN projection with the exact (erf) GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(h))


class BertOutput(nn.Module):
    """Second FFN projection, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout
        self.impl = cfg.kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(kernels.dropout_add(self.dense(x), residual, self.dropout_p, self.training, self.impl))


class BertLayer(nn.Module):
    """One post-LN transformer layer: attention block then feed-forward block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """x: ``[N, H]`` real tokens of a ``[B, L]`` batch (see ``BertSelfAttention``). Returns ``[N, H]``."""
        a = self.attention(x, mask, index)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    """A stack of ``num_layers`` BERT layers; optionally recomputes each layer in backward."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(num_layers))
        self.activation_checkpointing = cfg.activation_checkpointing
        self.padded = not cfg.skip_padding  # the authors' way: every position through every layer

    def forward(self, h: torch.Tensor, mask: torch.Tensor, keep_layer: Optional[int] = None):
        """h: ``[B, L, H]``; mask: ``[B, L]`` bool (True = real). Returns ``[B, L, H]``, zeros at padding; with
        ``keep_layer`` k, also the states after the first k layers: ``(states after layer k, output)``."""
        b, l, hidden = h.shape
        mask = mask.bool()
        if self.padded:
            index, x = None, h.reshape(b * l, hidden)  # (B*L, H)
        else:
            index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of real tokens; a host sync
            x = h.reshape(b * l, hidden).index_select(0, index)  # (N, H)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        kept = None
        for k, layer in enumerate(self.layer):
            if recompute:
                x = checkpoint(layer, x, mask, index, use_reentrant=False)
            else:
                x = layer(x, mask, index)
            if k + 1 == keep_layer:
                kept = x

        def padded(t: torch.Tensor) -> torch.Tensor:
            if index is None:
                return t.view(b, l, hidden)
            return t.new_zeros(b * l, hidden).index_copy(0, index, t).view(b, l, hidden)  # (B, L, H)

        return padded(x) if keep_layer is None else (padded(kept), padded(x))


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the cross-modal summary used by ITM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]``; returns ``[B, H]``."""
        return torch.tanh(self.dense(h[:, 0]))
