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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor],
                query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``[N, H]`` real tokens; mask: ``[B, L]`` bool (True = real); index: ``[N]`` flat positions
        of the real tokens in ``B*L`` (None: x holds all ``B*L`` positions). Returns ``[N, H]``; with
        ``query_rows`` ``[B]`` (row of x of one query per sequence, in sequence order): those rows only, ``[B, H]``.
        """
        b, l = mask.shape
        if query_rows is not None:
            return self._one_query_per_sequence(x, mask, index, query_rows)
        qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)  # (N, 3H)
        padded = qkv if index is None else qkv.new_zeros(b * l, qkv.shape[-1]).index_copy(0, index, qkv)  # (B*L, 3H)
        # unbind, not qkv[0..2]: each index's backward would zero-fill a whole (3, B, nh, L, hd) gradient.
        q, k, v = padded.view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout_p if self.training else 0.0
        ctx = kernels.attention(q, k, v, mask, p, impl=self.impl)  # (B, nh, L, hd)
        ctx = ctx.transpose(1, 2).reshape(b * l, self.num_heads * self.head_dim)  # (B*L, H)
        return ctx if index is None else ctx.index_select(0, index)  # (N, H)

    def _one_query_per_sequence(self, x, mask, index, query_rows) -> torch.Tensor:
        """Keys and values of every token, the query of ``query_rows`` only: ``[B, H]``. Through the PyTorch
        attention (the fused kernels take square attention only)."""
        b, l = mask.shape
        kv = torch.cat([self.key(x), self.value(x)], dim=-1)  # (N, 2H)
        padded = kv if index is None else kv.new_zeros(b * l, kv.shape[-1]).index_copy(0, index, kv)  # (B*L, 2H)
        k, v = padded.view(b, l, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.query(x[query_rows]).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
        p = self.dropout_p if self.training else 0.0
        impl = "eager" if self.impl == "eager" else "torch"
        ctx = kernels.attention(q, k, v, mask, p, impl=impl)  # (B, nh, 1, hd)
        return ctx.reshape(b, self.num_heads * self.head_dim)  # (B, H)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor],
                query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = x if query_rows is None else x[query_rows]
        return self.output(self.self(x, mask, index, query_rows), residual)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, index: Optional[torch.Tensor],
                query_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: ``[N, H]`` real tokens of a ``[B, L]`` batch (see ``BertSelfAttention``). Returns ``[N, H]``, or
        with ``query_rows`` the ``[B, H]`` outputs of those rows only (every token still serves as key/value)."""
        a = self.attention(x, mask, index, query_rows)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    """A stack of ``num_layers`` BERT layers; optionally recomputes each layer in backward."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(num_layers))
        self.activation_checkpointing = cfg.activation_checkpointing
        self.padded = not cfg.skip_padding  # the authors' way: every position through every layer

    def forward(self, h: torch.Tensor, mask: torch.Tensor, keep_layer: Optional[int] = None,
                first_only: bool = False):
        """h: ``[B, L, H]``; mask: ``[B, L]`` bool (True = real). Returns ``[B, L, H]``, zeros at padding; with
        ``keep_layer`` k, also the states after the first k layers: ``(states after layer k, output)``.
        ``first_only``: the output at position 0 only, ``[B, H]`` (what a pooler reads; position 0 must be real):
        the last layer then computes queries, feed-forward and outputs for those B rows alone (with
        ``skip_padding`` off, the authors' way, every layer still runs at every position)."""
        if first_only and keep_layer is not None:
            raise ValueError("first_only and keep_layer cannot be combined")
        b, l, hidden = h.shape
        mask = mask.bool()
        if self.padded:
            index, x = None, h.reshape(b * l, hidden)  # (B*L, H)
        else:
            index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of real tokens; a host sync
            x = h.reshape(b * l, hidden).index_select(0, index)  # (N, H)
        # The authors' way (padded) computes the whole last layer and reads position 0 after it.
        first_rows = self._first_rows(mask, index) if first_only and not self.padded else None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        kept = None
        for k, layer in enumerate(self.layer):
            rows = first_rows if k + 1 == len(self.layer) else None
            if recompute:
                x = checkpoint(layer, x, mask, index, rows, use_reentrant=False)
            else:
                x = layer(x, mask, index, rows)
            if k + 1 == keep_layer:
                kept = x
        if first_only:
            return x.view(b, l, hidden)[:, 0] if self.padded else x  # (B, H)

        def padded(t: torch.Tensor) -> torch.Tensor:
            if index is None:
                return t.view(b, l, hidden)
            return t.new_zeros(b * l, hidden).index_copy(0, index, t).view(b, l, hidden)  # (B, L, H)

        return padded(x) if keep_layer is None else (padded(kept), padded(x))

    @staticmethod
    def _first_rows(mask: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of the layer input holding each sequence's position 0: ``[B]``."""
        b, l = mask.shape
        if not bool(mask[:, 0].all()):
            raise ValueError("first_only: position 0 is padding in some sequence (the pooler reads position 0)")
        starts = torch.arange(b, device=mask.device) * l  # flat positions of position 0
        return starts if index is None else torch.searchsorted(index, starts)


class BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the cross-modal summary used by ITM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: ``[B, L, H]`` (or its ``[B, H]`` position-0 rows); returns ``[B, H]``."""
        return torch.tanh(self.dense(h[:, 0] if h.dim() == 3 else h))
