"""Input embeddings of MVPTR (MVPTR.md sections 1-2).

``BertEmbeddings``: the one table shared by word pieces, concepts and object tags, BERT style
(word + position + type, LayerNorm, dropout). The sum and LayerNorm go through the kernel seam
``mvptr_ds.kernels.concept_embedding`` so a fused kernel can replace the PyTorch reference.

``embed_regions``: region features (2048-d ROI feature + 6 box values) projected by
``Linear(img_feature_dim -> H)``, an optional LayerNorm (``use_img_layernorm``) and dropout; regions
get no position or type embedding. The parameters sit directly on the model (``img_embedding``,
``img_layernorm``), the names under which the authors' checkpoints store them.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from mvptr_ds import kernels
from mvptr_ds.config import ModelConfig


class BertEmbeddings(nn.Module):
    """word + position + type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout_p = cfg.hidden_dropout
        self.impl = cfg.kernels

    def forward(self, input_ids: torch.Tensor, token_type: Union[int, torch.Tensor],
                second_ids: Optional[torch.Tensor] = None,
                second_type: Union[int, torch.Tensor, None] = None):
        """input_ids: ``[B, L]`` long; positions ``0..L-1``; types ``token_type``, one for every position or a
        ``[B, L]`` long tensor. Returns ``[B, L, H]``.

        With ``second_ids`` ``[B, L2]`` (and ``second_type``): both streams in one lookup, each with its own
        positions from 0 and its types; returns ``([B, L, H], [B, L2, H])``. The word table's gradient (86,051
        rows at the authors' vocabulary) is then built once, not twice and summed. (One call of this module, so
        that ZeRO-3 gathers its parameters for it as for any module call.)
        """
        if second_ids is None:
            return self._embed(input_ids, self._positions(input_ids), self._types(input_ids, token_type))
        ids = torch.cat([input_ids, second_ids], dim=1)  # (B, L+L2)
        positions = torch.cat([self._positions(input_ids), self._positions(second_ids)], dim=1)
        types = torch.cat([self._types(input_ids, token_type), self._types(second_ids, second_type)], dim=1)
        both = self._embed(ids, positions, types)  # (B, L+L2, H)
        return both[:, :input_ids.shape[1]], both[:, input_ids.shape[1]:]

    def _positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, l = input_ids.shape
        if l > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {l} tokens exceeds model.max_position_embeddings="
                             f"{self.position_embeddings.num_embeddings}")
        return torch.arange(l, device=input_ids.device).expand(b, l)  # (B, L)

    @staticmethod
    def _types(input_ids: torch.Tensor, token_type: Union[int, torch.Tensor]) -> torch.Tensor:
        return token_type if isinstance(token_type, torch.Tensor) else torch.full_like(input_ids, token_type)

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        return kernels.concept_embedding(
            input_ids, position_ids, type_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm.weight, self.LayerNorm.bias,
            self.LayerNorm.eps, self.dropout_p, self.training, impl=self.impl)


def embed_regions(feats: torch.Tensor, projection: nn.Linear, layernorm: Optional[nn.LayerNorm],
                  dropout_p: float, training: bool, impl: str = "auto") -> torch.Tensor:
    """Region features ``[B, Lr, img_feature_dim]`` -> ``[B, Lr, H]``: Linear, optional LayerNorm, dropout."""
    if feats.shape[-1] != projection.in_features:
        raise ValueError(f"region features have {feats.shape[-1]} values per region, the model expects "
                         f"model.img_feature_dim={projection.in_features}")
    x = projection(feats.to(projection.weight.dtype))
    if layernorm is not None:
        x = layernorm(x)
    return kernels.dropout(x, dropout_p, training, impl)
