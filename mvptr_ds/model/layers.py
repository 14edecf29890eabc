"""The post-LN BERT layer shared by MVPTR's three encoders, the encoder stack and the pooler.

Parameter names follow Hugging Face BERT (``layer.{i}.attention.self.query`` ... ``output.LayerNorm``) so
BERT weights and the authors' checkpoints map onto them by name. Attention goes through the kernel seam
``mvptr_ds.kernels.attention``; which implementation runs is chosen by ``ModelConfig.kernels``.
Reference: Devlin et al., BERT (2019); MVPTR (Li et al., ACM MM 2022) section 3.1.
"""
from __future__ import annotations

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

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]``; mask: ``[B, L]`` bool (True = real key). Returns ``[B, L, H]``."""
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        p = self.dropout_p if self.training else 0.0
        ctx = kernels.attention(q, k, v, mask, p, impl=self.impl)  # (B, nh, L, hd)
        b, _, l, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim)  # (B, L, H)


class BertSelfOutput(nn.Module):
    """Output projection, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h, mask), h)


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
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """One post-LN transformer layer: attention block then feed-forward block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]``; mask: ``[B, L]`` bool. Returns ``[B, L, H]``."""
        a = self.attention(h, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    """A stack of ``num_layers`` BERT layers; optionally recomputes each layer in backward."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(num_layers))
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]``; mask: ``[B, L]`` bool (True = real). Returns ``[B, L, H]``."""
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if recompute:
                h = checkpoint(layer, h, mask, use_reentrant=False)
            else:
                h = layer(h, mask)
        return h


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the cross-modal summary used by ITM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]``; returns ``[B, H]``."""
        return torch.tanh(self.dense(h[:, 0]))
