"""Prediction heads on top of the MVPTR backbone (MVPTR.md section 3).

``MaskedTokenHead`` serves MLM (on cross-modal text states) and MCR (on visual-encoder tag states):
two untied copies in the authors' pre-training model (``cls.predictions`` and ``half_mlm``). Both predict
over the word-piece vocabulary only (``only_word_size`` rows); concept ids are never predicted. Their
decoders start as copies of the first ``only_word_size`` word-embedding rows (:func:`clone_decoder`), as the
release's ``tie_weights`` makes them.

``ITMHead`` is the 2-way image-text matching classifier on the pooled cross-modal output. Convention of
this project: **label 1 = matched pair** (the authors' pre-training head uses 0; ``compat`` swaps rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.config import ConfigError, ModelConfig


class PredictionTransform(nn.Module):
    """dense, GELU (erf), LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class MaskedTokenHead(nn.Module):
    """MLM / MCR head: transform, then a bias-free decoder to ``only_word_size`` logits plus a bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.only_word_size is None:
            raise ConfigError("model.only_word_size is not set: it must come from the data's tokenizer "
                              "before the MLM/MCR heads are built")
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.only_word_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.only_word_size))
        nn.init.normal_(self.transform.dense.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.transform.dense.bias)
        nn.init.normal_(self.decoder.weight, std=cfg.initializer_range)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: ``[..., H]`` -> logits ``[..., only_word_size]``."""
        return self.decoder(self.transform(h)) + self.bias


@torch.no_grad()
def clone_decoder(head: MaskedTokenHead, word_embeddings: torch.Tensor) -> None:
    """Set ``head``'s decoder to a copy of the first ``only_word_size`` rows of ``word_embeddings``
    (``[vocab_size, H]``): the release's ``tie_weights`` with ``torchscript`` set, which it runs when the model is
    built and again whenever ``from_pretrained`` loads weights."""
    rows = head.decoder.weight.shape[0]
    if word_embeddings.shape[0] < rows or word_embeddings.shape[1:] != head.decoder.weight.shape[1:]:
        raise ValueError(f"clone_decoder: word embeddings {tuple(word_embeddings.shape)} cannot fill a decoder of "
                         f"{tuple(head.decoder.weight.shape)}")
    head.decoder.weight.copy_(word_embeddings[:rows])


class ITMHead(nn.Module):
    """Linear(H, 2) on the pooled output; column 1 scores "matched"."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.classifier = nn.Linear(cfg.hidden_size, 2)
        nn.init.normal_(self.classifier.weight, std=cfg.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: ``[B, H]`` -> logits ``[B, 2]`` (index 1 = matched)."""
        return self.classifier(pooled)
