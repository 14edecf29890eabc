"""Task heads on the MVPTR backbone, as the release's fine-tuning models build them (MVPTR.md section 4).

* :class:`VQAHead` (``BiImageBertForVQA``'s ``cls.predictions``): dropout on the cross-modal text ``[CLS]``
  state, then dense (H -> H), GELU, LayerNorm (the MLM head's transform, named ``transform`` so that
  ``--init_from`` a pre-training run starts it from ``heads.mlm.transform``), a bias-free decoder over the
  answer vocabulary plus a bias; trained with binary cross-entropy against soft scores.
* :class:`EntailmentHead`: SNLI-VE, dropout and one linear layer from the pooled output to 3 labels.
* :class:`RetrievalHead` (``BiImageBertForRetrieval``'s ``classifier``): a new 2-way classifier (label 1 =
  matched) on ``dropout(pooled)``, trained with VSC and ITM; the same parameter names as the ITM head, so
  ``evaluate`` re-ranks with it.
* :func:`region_scores`: referring expressions, cosine of the text ``[CLS]`` state and each region state
  after cross-modal layer ``ref_layer`` (3 in the release; the model's last layer if it has fewer);
  trained with MSE to each region's IoU with the target box.

Dropout is the model's hidden dropout, as in the release (``config.hidden_dropout_prob``, which its
fine-tuning scripts set per task: 0.3 for VQA, 0.1 otherwise; ``config.TASK_MODEL_DEFAULTS``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.config import ModelConfig
from mvptr_ds.model.heads import PredictionTransform


def _init(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VQAHead(nn.Module):
    """``[B, H] -> [B, num_answers]`` logits: dropout, transform (dense H -> H, GELU, LayerNorm), decoder + bias."""

    def __init__(self, cfg: ModelConfig, num_answers: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, num_answers, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_answers))
        _init(self, cfg.initializer_range)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(self.dropout(cls_state))) + self.bias


class EntailmentHead(nn.Module):
    """``[B, H] -> [B, 3]`` logits (entailment, neutral, contradiction) from the pooled output."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 3)
        _init(self, cfg.initializer_range)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class RetrievalHead(nn.Module):
    """``[B, H] -> [B, 2]`` matching logits (index 1 = matched) from ``dropout(pooled)``."""

    def __init__(self, cfg: ModelConfig, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 2)
        _init(self, cfg.initializer_range)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


def region_scores(cross_h: torch.Tensor, num_text: int) -> torch.Tensor:
    """Cosine of the text ``[CLS]`` state with every region state: ``[B, Lt+Lr, H] -> [B, Lr]``."""
    cls = F.normalize(cross_h[:, 0].float(), dim=-1)  # (B, H)
    regions = F.normalize(cross_h[:, num_text:].float(), dim=-1)  # (B, Lr, H)
    return torch.einsum("bh,brh->br", cls, regions)
