"""The MVPTR backbone: textual, visual and cross-modal encoders over a shared embedding table.

Layout (MVPTR.md sections 1-2; Li et al., "MVPTR: Multi-Level Semantic Alignment for Vision-Language
Pre-Training via Multi-Stage Learning", ACM MM 2022):

- stage 1, uni-modal: ``text_encoder`` over ``[CLS] words concepts [SEP]`` (type 0, positions 0..Lt-1);
  ``visual_encoder`` over ``[CLS] tags [SEP]`` (type 1, positions from 0) followed by the projected regions
  (no position/type embedding). ``txt_proj``/``vis_proj`` map the two ``[CLS]`` outputs to the contrastive
  space (``x @ P``, then L2 normalisation; the orientation of the authors' raw matrices, checked against
  their outputs in ``tests/compat/test_compat.py``); ``logit_scale`` starts at ln(1/0.07).
- stage 2, cross-modal: ``cross_encoder`` over the text outputs followed by the visual encoder's **region**
  outputs only; ``pooler`` = tanh(dense) at position 0 (the text ``[CLS]``).

Padding-aware cross-modal compute. Batches arrive padded per batch to the longest text (Lt) and the
longest region list (Lr), so a naive concatenation has Lt+Lr positions per row, most of them padding when
short captions meet images with few regions. ``encode_cross`` instead *packs* each row: its real text
tokens and real regions are gathered to the left (keeping their order), the joint sequence is trimmed to
``max_i(text_len_i + regions_i)``, the encoder runs on that, and the result is scattered back to the
``[B, Lt+Lr, H]`` layout (text positions first, then regions) with zeros at padded positions. The
cross-modal encoder has no position embedding and masks padded keys, so each real position's output is
exactly what the naive padded computation gives; only padding work is removed. The packed length is a
shape, so it costs one host sync per call. Inside every encoder (``layers.BertEncoder``) the position-wise
work (projections, feed-forward, LayerNorms: most of the FLOPs) runs on the real tokens only; only the
attention kernel sees the padded ``[B, L]`` layout. Encoder outputs are zeros at padded positions.
``ModelConfig.skip_padding`` off turns all of this off (the authors-style baseline of ``benchmarks/throughput.py``).
(Attention without any padding, i.e. varlen/segment masks, would need a kernel behind the attention seam
that takes segment ids instead of a key-padding mask.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mvptr_ds.config import ConfigError, ModelConfig
from mvptr_ds.data.types import Batch
from mvptr_ds.model.embeddings import BertEmbeddings, embed_regions
from mvptr_ds.model.layers import BertEncoder, BertPooler

TEXT_TYPE = 0
VISUAL_TYPE = 1


@dataclass
class EncoderOutputs:
    """What one forward pass of the backbone produces. B = batch, Lt/Lg/Lr = text/tag/region lengths."""

    text: torch.Tensor                    # [B, Lt, H] textual encoder output
    visual: torch.Tensor                  # [B, Lg+Lr, H] visual encoder output: tags (Lg) then regions (Lr)
    text_embed: torch.Tensor              # [B, H] L2-normalised contrastive embedding of text[:, 0]
    visual_embed: torch.Tensor            # [B, H] L2-normalised contrastive embedding of visual[:, 0]
    num_tags: int                         # Lg: regions of ``visual`` are visual[:, num_tags:]
    cross: Optional[torch.Tensor] = None  # [B, Lt+Lr, H] cross-modal output, text positions then regions
    pooled: Optional[torch.Tensor] = None  # [B, H] tanh(pooler(cross[:, 0]))
    # [1] the contrastive temperature parameter, read inside forward: ZeRO-3 tracks a parameter's gradient
    # only when it is used within its module's forward, so objectives take it from here.
    logit_scale: Optional[torch.Tensor] = None


def _text_types(text_types: Optional[torch.Tensor]):
    """The text stream's token types: ``[B, Lt]`` as given, or type 0 everywhere."""
    return TEXT_TYPE if text_types is None else text_types


class MVPTRModel(nn.Module):
    """The backbone without task heads. ``with_cross=False`` builds the stage-1 model (no cross encoder/pooler)."""

    def __init__(self, cfg: ModelConfig, with_cross: bool = True):
        super().__init__()
        if cfg.vocab_size is None or cfg.only_word_size is None:
            raise ConfigError("model.vocab_size and model.only_word_size must be set (they come from the data's "
                              f"tokenizer and concept vocabulary); got vocab_size={cfg.vocab_size}, "
                              f"only_word_size={cfg.only_word_size}")
        cfg.validate()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embeddings = BertEmbeddings(cfg)
        self.img_embedding = nn.Linear(cfg.img_feature_dim, h)
        self.img_layernorm = nn.LayerNorm(h, eps=cfg.layer_norm_eps) if cfg.use_img_layernorm else None
        self.text_encoder = BertEncoder(cfg, cfg.text_layers)
        self.visual_encoder = BertEncoder(cfg, cfg.visual_layers)
        self.cross_encoder = BertEncoder(cfg, cfg.cross_layers) if with_cross else None
        self.pooler = BertPooler(cfg) if with_cross else None
        # Bias-free linear maps (weight = the authors' raw matrix transposed: they compute x @ P). Modules,
        # not raw parameters, so that ZeRO-3 gathers them through its module hooks in forward and backward.
        self.txt_proj = nn.Linear(h, h, bias=False)
        self.vis_proj = nn.Linear(h, h, bias=False)
        # Shape (1,), not (): DeepSpeed's parameter broadcast cannot handle 0-dim tensors. The authors'
        # checkpoint holds a 0-dim scalar; the converter reshapes it.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.apply(self._init_module)

    def _init_module(self, m: nn.Module) -> None:
        """BERT initialisation: weights ~ N(0, initializer_range), zero biases, LayerNorm 1/0."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def with_cross(self) -> bool:
        return self.cross_encoder is not None

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
                    text_types: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Textual encoder. text_ids ``[B, Lt]`` long, text_mask ``[B, Lt]`` bool, text_types ``[B, Lt]`` long
        (None: type 0 everywhere) -> ``[B, Lt, H]``."""
        return self.text_encoder(self.embeddings(text_ids, _text_types(text_types)), text_mask.bool())

    def encode_visual(self, tag_ids: torch.Tensor, tag_mask: torch.Tensor, region_feats: torch.Tensor,
                      region_mask: torch.Tensor) -> torch.Tensor:
        """Visual encoder over tags then regions.

        tag_ids/tag_mask ``[B, Lg]``; region_feats ``[B, Lr, img_feature_dim]``; region_mask ``[B, Lr]``.
        Returns ``[B, Lg+Lr, H]``.
        """
        return self._encode_visual(self.embeddings(tag_ids, VISUAL_TYPE), tag_mask, region_feats, region_mask)

    def _encode_visual(self, tags: torch.Tensor, tag_mask: torch.Tensor, region_feats: torch.Tensor,
                       region_mask: torch.Tensor) -> torch.Tensor:
        """``encode_visual`` from the embedded tags ``[B, Lg, H]``."""
        regions = embed_regions(region_feats, self.img_embedding, self.img_layernorm,
                                self.cfg.hidden_dropout, self.training, self.cfg.kernels)  # (B, Lr, H)
        h = torch.cat([tags, regions.to(tags.dtype)], dim=1)  # (B, Lg+Lr, H)
        mask = torch.cat([tag_mask.bool(), region_mask.bool()], dim=1)  # (B, Lg+Lr)
        return self.visual_encoder(h, mask)

    def embed_text(self, text_h: torch.Tensor) -> torch.Tensor:
        """Contrastive text embedding: ``[B, Lt, H]`` (or its ``[B, H]`` [CLS] rows) -> ``[B, H]``, unit norm."""
        cls = text_h[:, 0] if text_h.dim() == 3 else text_h
        return F.normalize(self.txt_proj(cls), dim=-1)

    def embed_visual(self, visual_h: torch.Tensor) -> torch.Tensor:
        """Contrastive image embedding: ``[B, Lg+Lr, H]`` (or its ``[B, H]`` [CLS] rows) -> ``[B, H]``, unit norm."""
        cls = visual_h[:, 0] if visual_h.dim() == 3 else visual_h
        return F.normalize(self.vis_proj(cls), dim=-1)

    def encode_cross(self, text_h: torch.Tensor, text_mask: torch.Tensor, region_h: torch.Tensor,
                     region_mask: torch.Tensor, keep_layer: Optional[int] = None):
        """Cross-modal encoder over packed text + regions (see the module docstring).

        text_h ``[B, Lt, H]``, text_mask ``[B, Lt]``, region_h ``[B, Lr, H]``, region_mask ``[B, Lr]``.
        Returns ``[B, Lt+Lr, H]``: text positions then regions; zeros at padded positions. With ``keep_layer``
        k: ``(states after the first k cross-modal layers, output)``, both in that layout.
        """
        return self._cross(text_h, text_mask, region_h, region_mask, keep_layer=keep_layer)

    def pooled_cross(self, text_h: torch.Tensor, text_mask: torch.Tensor, region_h: torch.Tensor,
                     region_mask: torch.Tensor) -> torch.Tensor:
        """``pool(encode_cross(...))``, ``[B, H]``, without the last layer's work at positions the pooler does
        not read (its keys and values still come from every position; with ``skip_padding`` off, the authors'
        way, the whole layer runs). Equal values and gradients without dropout; with dropout the last layer draws
        smaller masks (the same distribution, other draws)."""
        return self.pool(self._cross(text_h, text_mask, region_h, region_mask, first_only=True))

    def _cross(self, text_h, text_mask, region_h, region_mask, keep_layer=None, first_only=False):
        if self.cross_encoder is None:
            raise ConfigError("this MVPTRModel was built with with_cross=False (stage 1): it has no "
                              "cross-modal encoder")
        joint = torch.cat([text_h, region_h.to(text_h.dtype)], dim=1)  # (B, Lt+Lr, H)
        mask = torch.cat([text_mask.bool(), region_mask.bool()], dim=1)  # (B, Lt+Lr)
        if first_only and not bool(mask[:, 0].all()):
            raise ValueError("pooled_cross: position 0 (the text's [CLS]) is padding in some row")
        if not self.cfg.skip_padding:  # the authors' way (benchmark baseline): no packing, padding computed
            return self.cross_encoder(joint, mask, keep_layer, first_only)
        lengths = mask.sum(dim=1)  # (B,)
        packed_len = int(lengths.max())  # host sync: the packed length is a shape
        # Real positions first, in their original order: a stable sort of "is padding".
        order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices[:, :packed_len]  # (B, Lp)
        index = order.unsqueeze(-1).expand(-1, -1, joint.shape[-1])  # (B, Lp, H)
        packed_mask = torch.arange(packed_len, device=mask.device)[None, :] < lengths[:, None]  # (B, Lp)
        out = self.cross_encoder(joint.gather(1, index), packed_mask, keep_layer, first_only)  # (B, Lp, H)
        if first_only:
            return out  # (B, H): packed position 0 is position 0 (real positions keep their order)
        unpack = lambda t: torch.zeros_like(joint).scatter(1, index, t)  # noqa: E731 (B, Lt+Lr, H)
        return unpack(out) if keep_layer is None else (unpack(out[0]), unpack(out[1]))

    def pool(self, cross_h: torch.Tensor) -> torch.Tensor:
        """``tanh(dense(cross_h[:, 0]))``: ``[B, L, H]`` -> ``[B, H]``."""
        if self.pooler is None:
            raise ConfigError("this MVPTRModel was built with with_cross=False (stage 1): it has no pooler")
        return self.pooler(cross_h)

    def forward(self, batch: Batch, run_cross: bool = True) -> EncoderOutputs:
        """Run the uni-modal encoders and, if ``run_cross`` and the model has one, the cross-modal encoder."""
        # Words and tags share the embedding table: one lookup for both.
        words, tags = self.embeddings(batch.text_ids, _text_types(batch.text_type_ids), batch.tag_ids, VISUAL_TYPE)
        text = self.text_encoder(words, batch.text_mask.bool())
        visual = self._encode_visual(tags, batch.tag_mask, batch.region_feats, batch.region_mask)
        num_tags = batch.tag_ids.shape[1]
        out = EncoderOutputs(text=text, visual=visual, text_embed=self.embed_text(text),
                             visual_embed=self.embed_visual(visual), num_tags=num_tags,
                             logit_scale=self.logit_scale * 1.0)
        if run_cross and self.with_cross:
            out.cross = self.encode_cross(text, batch.text_mask, visual[:, num_tags:], batch.region_mask)
            out.pooled = self.pool(out.cross)
        return out
