"""Batches and fake backbone outputs shared by the objective tests (helpers, not tests)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mvptr_ds.config import MODEL_PRESETS
from mvptr_ds.data.types import Batch

TINY = dataclasses.replace(MODEL_PRESETS["tiny"], hidden_size=32, num_attention_heads=2, intermediate_size=64,
                           text_layers=1, visual_layers=1, cross_layers=1, vocab_size=120, only_word_size=100,
                           img_feature_dim=14, max_position_embeddings=64, kernels="torch")


@dataclass
class Outputs:
    """Same fields as ``mvptr_ds.model.mvptr.EncoderOutputs`` (duck-typed stand-in for unit tests)."""

    text: torch.Tensor
    visual: torch.Tensor
    text_embed: torch.Tensor
    visual_embed: torch.Tensor
    num_tags: int
    cross: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    logit_scale: Optional[torch.Tensor] = None


def make_batch(image_ids: Sequence[int], text_lens: Sequence[int], num_phrases: Sequence[int],
               region_counts: Sequence[int], tag_lens: Optional[Sequence[int]] = None, seed: int = 0,
               mask_every: int = 3, wpg_negative: Optional[Sequence[int]] = None, cfg=TINY) -> Batch:
    """A valid padded Batch: text ``[CLS] words phrases [SEP]`` (text_lens counts all of it), masked labels
    on every ``mask_every``-th word/tag piece (0 = none), WPG negative = next pair with another image."""
    g = torch.Generator().manual_seed(seed)
    b = len(image_ids)
    tag_lens = tag_lens or [4] * b
    lt, lg, lr = max(text_lens), max(tag_lens), max(max(region_counts), 1)
    text_ids = torch.zeros(b, lt, dtype=torch.long)
    text_mask = torch.zeros(b, lt, dtype=torch.bool)
    phrase_mask = torch.zeros(b, lt, dtype=torch.bool)
    mlm = torch.full((b, lt), -1, dtype=torch.long)
    tag_ids = torch.zeros(b, lg, dtype=torch.long)
    tag_mask = torch.zeros(b, lg, dtype=torch.bool)
    mcr = torch.full((b, lg), -1, dtype=torch.long)
    region_mask = torch.zeros(b, lr, dtype=torch.bool)
    for i in range(b):
        n, k = text_lens[i], num_phrases[i]
        words = n - 2 - k
        assert words >= 0, "text_lens must hold [CLS], [SEP] and the phrases"
        text_mask[i, :n] = True
        text_ids[i, :n] = torch.randint(5, cfg.only_word_size, (n,), generator=g)
        text_ids[i, 1 + words:1 + words + k] = torch.randint(cfg.only_word_size, cfg.vocab_size, (k,), generator=g)
        phrase_mask[i, 1 + words:1 + words + k] = True
        tag_mask[i, :tag_lens[i]] = True
        tag_ids[i, :tag_lens[i]] = torch.randint(5, cfg.only_word_size, (tag_lens[i],), generator=g)
        region_mask[i, :region_counts[i]] = True
        if mask_every:
            for p in range(1, 1 + words, mask_every):
                mlm[i, p] = int(text_ids[i, p])
                text_ids[i, p] = 3
            for p in range(1, tag_lens[i] - 1, mask_every):
                mcr[i, p] = int(tag_ids[i, p])
                tag_ids[i, p] = 3
    if wpg_negative is None:
        wpg_negative = [next((j for j in list(range(i + 1, b)) + list(range(i)) if image_ids[j] != image_ids[i]), -1)
                        for i in range(b)]
    feats = torch.randn(b, lr, cfg.img_feature_dim, generator=g) * region_mask[..., None]
    return Batch(text_ids=text_ids, text_mask=text_mask, phrase_mask=phrase_mask, tag_ids=tag_ids,
                 tag_mask=tag_mask, region_feats=feats, region_mask=region_mask,
                 image_ids=torch.tensor(list(image_ids)), sample_ids=torch.arange(b), mlm_labels=mlm,
                 mcr_labels=mcr, wpg_negative_pair=torch.tensor(list(wpg_negative)),
                 wpg_pick_positive=torch.rand(b, lt, generator=g), wpg_pick_negative=torch.rand(b, lt, generator=g),
                 itm_text_side=torch.arange(b) < (b + 1) // 2, itm_negative_draw=torch.rand(b, 2, generator=g))


def fake_outputs(batch: Batch, hidden: int = 8, seed: int = 1, with_cross: bool = True) -> Outputs:
    """Random leaf tensors shaped like the backbone's outputs for ``batch`` (all require grad)."""
    g = torch.Generator().manual_seed(seed)
    b, lt = batch.text_mask.shape
    lg, lr = batch.tag_mask.shape[1], batch.region_mask.shape[1]

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    te = torch.nn.functional.normalize(torch.randn(b, hidden, generator=g), dim=-1).requires_grad_()
    ve = torch.nn.functional.normalize(torch.randn(b, hidden, generator=g), dim=-1).requires_grad_()
    return Outputs(text=leaf(b, lt, hidden), visual=leaf(b, lg + lr, hidden), text_embed=te, visual_embed=ve,
                   num_tags=lg, cross=leaf(b, lt + lr, hidden) if with_cross else None,
                   pooled=leaf(b, hidden) if with_cross else None)


class FakeCrossModel:
    """Records what the cross-modal encoder was given; pooled = text [CLS] state + first region state."""

    def __init__(self):
        self.calls = []

    def encode_cross(self, text_h, text_mask, region_h, region_mask):
        self.calls.append((text_h, text_mask, region_h, region_mask))
        first = text_h[:, :1] + region_h[:, :1]  # (B, 1, H)
        return torch.cat([first, text_h[:, 1:], region_h], dim=1)  # (B, Lt+Lr, H)

    def pool(self, h):
        return h[:, 0]

    def pooled_cross(self, text_h, text_mask, region_h, region_mask):
        return self.pool(self.encode_cross(text_h, text_mask, region_h, region_mask))
