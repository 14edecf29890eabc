"""The pre-training module: the backbone, the heads its objectives need, and the weighted sum of losses.

This is the ``nn.Module`` handed to DeepSpeed. Its state dict is ``backbone.*`` plus
``heads.{mcr,mlm,itm}.*`` (only the heads of the chosen objectives); the checkpoint converter relies on
these names. The cross-modal encoder runs only when an objective reads it (ITM, MLM, WPG); stage 1 (MCR
and/or VSC) builds a backbone without it. Objectives are plain functions of (outputs, batch), called by
``compute`` in the fixed order of ``config.OBJECTIVES``, so every rank runs the same code path.

Every output the backbone computed is tied into the loss with an exact zero (``zero_loss``), so every
parameter of the module receives a gradient on every step whatever the objectives read: exact zeros for
the parts no objective uses (stage 1 with MCR alone: the textual encoder, the contrastive projections and
the logit scale; MLM/WPG without ITM: the pooler). ZeRO then sees the same set of gradients on every rank and every
step. The cost is a backward pass of zeros through those parts.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from mvptr_ds.config import OBJECTIVES, ConfigError, ModelConfig, ObjectiveConfig
from mvptr_ds.data.types import Batch
from mvptr_ds.model.heads import ITMHead, MaskedTokenHead, clone_decoder
from mvptr_ds.model.mvptr import MVPTRModel
from mvptr_ds.objectives.base import Gather, LossOutput, ModuleOutput, zero_loss
from mvptr_ds.objectives.itm import itm_loss
from mvptr_ds.objectives.mcr import mcr_loss
from mvptr_ds.objectives.mlm import mlm_loss
from mvptr_ds.objectives.vsc import vsc_loss
from mvptr_ds.objectives.wpg import mined_negative_pairs, wpg_loss, wpg_shared_loss

NEEDS_CROSS = frozenset({"itm", "mlm", "wpg"})
HEADS = {"mcr": MaskedTokenHead, "mlm": MaskedTokenHead, "itm": ITMHead}


def needs_cross(objectives: Sequence[str]) -> bool:
    """True if any of ``objectives`` reads the cross-modal encoder."""
    return any(name in NEEDS_CROSS for name in objectives)


def check_objectives(objectives: Sequence[str]) -> tuple:
    """Validate and de-duplicate objective names, keeping the canonical order of ``config.OBJECTIVES``."""
    unknown = [n for n in objectives if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"objective {unknown[0]!r} is unknown: expected some of {', '.join(OBJECTIVES)}")
    if not objectives:
        raise ConfigError("no objective selected")
    return tuple(n for n in OBJECTIVES if n in objectives)


class PretrainingModule(nn.Module):
    """Backbone + heads; ``forward(batch)`` returns the weighted sum of the chosen objectives."""

    def __init__(self, backbone: MVPTRModel, objectives: Sequence[str], objective_cfg: ObjectiveConfig,
                 gather: Optional[Gather] = None):
        super().__init__()
        self.objectives = check_objectives(objectives)
        self.run_cross = needs_cross(self.objectives)
        if self.run_cross and not backbone.with_cross:
            raise ConfigError(f"objectives {', '.join(n for n in self.objectives if n in NEEDS_CROSS)} need the "
                              "cross-modal encoder, but the backbone was built without one (stage 1)")
        self.backbone = backbone
        self.heads = nn.ModuleDict({n: HEADS[n](backbone.cfg) for n in self.objectives if n in HEADS})
        self.clone_decoders()
        self.objective_cfg = objective_cfg
        self.gather = gather  # a plain callable, not a module: it holds no state

    def clone_decoders(self) -> None:
        """MLM/MCR decoders := copies of the word-embedding rows of the word pieces (``heads.clone_decoder``):
        at construction, and after ``--init_from`` (``training.init_from``) with ``train.reset_decoders_on_init``
        (the release's behaviour) or from BERT."""
        for name in ("mlm", "mcr"):
            if name in self.heads:
                clone_decoder(self.heads[name], self.backbone.embeddings.word_embeddings.weight)

    def compute(self, name: str, outputs, batch: Batch) -> LossOutput:
        """One objective's ``LossOutput`` on the backbone outputs of ``batch``."""
        if name == "mcr":
            return mcr_loss(outputs, batch, self.heads["mcr"])
        if name == "mlm":
            return mlm_loss(outputs, batch, self.heads["mlm"])
        cfg = self.objective_cfg
        if name == "vsc":
            return vsc_loss(outputs.text_embed, outputs.visual_embed, batch.image_ids, outputs.logit_scale,
                            gather=self.gather, exclude_same_image=cfg.exclude_same_image,
                            cap_scale=cfg.cap_logit_scale)
        if name == "itm":
            return itm_loss(outputs, batch, self.backbone, self.heads["itm"], gather=self.gather,
                            negatives=cfg.itm_negatives, exclude_same_image=cfg.exclude_same_image,
                            cap_scale=cfg.cap_logit_scale, prior=cfg.itm_prior)
        if name == "wpg":
            batch = mined_negative_pairs(outputs, batch, cfg.wpg_negatives, cfg.exclude_same_image,
                                         cfg.cap_logit_scale)
            if cfg.wpg_negative_encoding == "shared":
                return wpg_shared_loss(outputs, batch, self.wpg_negative_cross(outputs, batch),
                                       temperature=cfg.wpg_temperature, exclude_same_image=cfg.exclude_same_image)
            return wpg_loss(outputs, batch, margin=cfg.wpg_margin, topk=cfg.wpg_topk,
                            negative_cross=self.wpg_negative_cross(outputs, batch),
                            exclude_same_image=cfg.exclude_same_image)
        raise ConfigError(f"objective {name!r} is unknown")

    def wpg_negative_cross(self, outputs, batch: Batch) -> Optional[torch.Tensor]:
        """The cross-modal states WPG scores its negative on: ``[B, Lt+Lr, H]`` encoding of (caption i, image
        ``j = wpg_negative_pair[i]``) for ``wpg_negative_encoding="joint"``; ``[B, Lt+2Lr, H]`` encoding of
        caption i with image i's regions then image j's for ``"shared"``; None for ``"separate"``. Rows without a
        negative (-1) pair with row 0's image; WPG masks them out."""
        encoding = self.objective_cfg.wpg_negative_encoding
        if encoding == "separate":
            return None
        neg = batch.wpg_negative_pair.clamp(min=0)  # (B,)
        regions = outputs.visual[:, outputs.num_tags:]  # (B, Lr, H)
        if encoding == "shared":
            return self.backbone.encode_cross(outputs.text, batch.text_mask, torch.cat([regions, regions[neg]], dim=1),
                                              torch.cat([batch.region_mask, batch.region_mask[neg]], dim=1))
        return self.backbone.encode_cross(outputs.text, batch.text_mask, regions[neg], batch.region_mask[neg])

    def forward(self, batch: Batch) -> ModuleOutput:
        """Backbone forward (cross-modal encoder only if needed), every objective; ``loss`` is the sum of weight x
        loss over objectives plus an exact 0 tying in the outputs no objective read."""
        outputs = self.backbone(batch, run_cross=self.run_cross)
        losses: Dict[str, torch.Tensor] = {}
        metrics: Dict[str, torch.Tensor] = {}
        total = None
        for name in self.objectives:
            out = self.compute(name, outputs, batch)
            losses[name] = out.loss
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
            term = self.objective_cfg.weight(name) * out.loss
            total = term if total is None else total + term
        unused = zero_loss(outputs.text, outputs.visual, outputs.text_embed, outputs.visual_embed, outputs.pooled,
                           outputs.logit_scale)
        return ModuleOutput(loss=total + unused, losses=losses, metrics=metrics)


def build_pretraining_module(model_cfg: ModelConfig, objective_names: Sequence[str], objective_cfg: ObjectiveConfig,
                             gather: Optional[Gather] = None) -> PretrainingModule:
    """A fresh backbone (with the cross-modal encoder only if an objective needs it) and its heads."""
    names = check_objectives(objective_names)
    backbone = MVPTRModel(model_cfg, with_cross=needs_cross(names))
    return PretrainingModule(backbone, names, objective_cfg, gather=gather)
