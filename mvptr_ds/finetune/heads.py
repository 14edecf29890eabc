"""Task heads on the MVPTR backbone (MVPTR.md section 4).

* :class:`VQAHead`: dense, GELU, LayerNorm, decoder over the answer vocabulary, on the cross-modal text
  ``[CLS]`` state; trained with binary cross-entropy against soft scores. The hidden width is 2H, as in the
  Oscar/VinVL VQA heads MVPTR's release builds on; dropout (0.3 in the release) on its input.
* :class:`EntailmentHead`: SNLI-VE, one linear layer from the pooled output to 3 labels.
* :func:`region_scores`: referring expressions, cosine of the text ``[CLS]`` state and each region state
  after cross-modal layer ``ref_layer`` (3 in the release; the model's last layer if it has fewer);
  trained with MSE to each region's IoU with the target box.
* Retrieval reuses the pre-training ITM head (:class:`~mvptr_ds.model.heads.ITMHead`, label 1 = matched).
  The release adds a new head for fine-tuning only because its pre-training head uses label 0 for a match;
  this project's heads share one convention, so the pre-trained one is kept.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.config import ModelConfig


def _init(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VQAHead(nn.Module):
    """``[B, H] -> [B, num_answers]`` logits: dropout, dense (H -> 2H), GELU, LayerNorm, decoder."""

    def __init__(self, cfg: ModelConfig, num_answers: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(2 * cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(2 * cfg.hidden_size, num_answers)
        _init(self, cfg.initializer_range)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(self.dropout(cls_state)))))


class EntailmentHead(nn.Module):
    """``[B, H] -> [B, 3]`` logits (entailment, neutral, contradiction) from the pooled output."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 3)
        _init(self, cfg.initializer_range)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


def cross_states(backbone, text_h: torch.Tensor, text_mask: torch.Tensor, region_h: torch.Tensor,
                 region_mask: torch.Tensor, num_layers: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """States after the first ``num_layers`` cross-modal layers and after the last one, each
    ``[B, Lt+Lr, H]`` (text, then regions; zeros at padded positions).

    Runs the layers on the real positions only, as ``BertEncoder`` does. The layers above ``num_layers``
    run too, so every parameter is used inside a module call (ZeRO-3 gathers parameters, and reduces their
    gradients, only through module hooks); the task ties their output into its loss with an exact zero.
    """
    joint = torch.cat([text_h, region_h.to(text_h.dtype)], dim=1)  # (B, L, H), L = Lt+Lr
    mask = torch.cat([text_mask.bool(), region_mask.bool()], dim=1)  # (B, L)
    b, l, h = joint.shape
    index = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions of real tokens
    x = joint.reshape(b * l, h).index_select(0, index)  # (N, H)
    picked = None
    for k, layer in enumerate(backbone.cross_encoder.layer):
        x = layer(x, mask, index)
        if k + 1 == num_layers:
            picked = x
    scatter = lambda t: t.new_zeros(b * l, h).index_copy(0, index, t).view(b, l, h)  # noqa: E731
    return scatter(picked), scatter(x)


def region_scores(cross_h: torch.Tensor, num_text: int) -> torch.Tensor:
    """Cosine of the text ``[CLS]`` state with every region state: ``[B, Lt+Lr, H] -> [B, Lr]``."""
    cls = F.normalize(cross_h[:, 0].float(), dim=-1)  # (B, H)
    regions = F.normalize(cross_h[:, num_text:].float(), dim=-1)  # (B, Lr, H)
    return torch.einsum("bh,brh->br", cls, regions)
