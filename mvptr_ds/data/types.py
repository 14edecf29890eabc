"""The two records that cross module boundaries: one ``Example`` per image-caption pair, one ``Batch`` per step.

Field names and shapes are defined here once. Every sequence is padded per batch to its longest real
element (no fixed-length padding); masks are boolean with True on real positions.

Vocabulary layout (MVPTR.md section 1): ids ``< only_word_size`` are word pieces, concept (phrase) ids
live above them in the same embedding table. Labels use -1 for "not scored".
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional

import numpy as np
import torch


@dataclass
class Example:
    """One image-caption pair before corruption and padding.

    ``caption_ids``: word pieces of the caption without [CLS]/[SEP].
    ``concept_ids``: concept ids (>= only_word_size, or single-word concepts that reuse a word id).
    ``concept_word_links``: for each concept, indices into ``caption_ids`` of the words it came from
    (so corrupting a word always masks the concepts linked to it).
    ``tag_ids``: object-tag word pieces without [CLS]/[SEP].
    ``regions``: ``[num_regions, img_feature_dim]`` (2048-d ROI feature + 6 box values), float32, or float16
    as a converted store holds them (batched as fp16 and converted on the device).
    ``concept_regions``: ground-truth region index per concept (-1 unknown); None when the data has none.
    """

    sample_id: int
    image_id: int
    caption_ids: List[int]
    concept_ids: List[int]
    concept_word_links: List[List[int]]
    tag_ids: List[int]
    regions: np.ndarray
    concept_regions: Optional[List[int]] = None


@dataclass
class Batch:
    """A padded, corrupted batch. B = batch size, Lt/Lg/Lr = longest text / tag / region sequence.

    Text stream ``[CLS] w1..wn p1..pk [SEP] [PAD]..`` (type 0, positions 0..Lt-1 straight through; VQA appends
    the image's tags after ``[SEP]``, type 1, as the release's ``--use_b_text``).
    Visual stream ``[CLS] t1..tm [SEP] [PAD]..`` (type 1, positions from 0) followed by the regions.
    """

    text_ids: torch.Tensor          # [B, Lt] long, after corruption
    text_mask: torch.Tensor         # [B, Lt] bool
    phrase_mask: torch.Tensor       # [B, Lt] bool, True at concept positions
    tag_ids: torch.Tensor           # [B, Lg] long, after corruption
    tag_mask: torch.Tensor          # [B, Lg] bool
    region_feats: torch.Tensor      # [B, Lr, img_feature_dim] float32, or float16 when every example's is
    region_mask: torch.Tensor       # [B, Lr] bool
    image_ids: torch.Tensor         # [B] long; pairs that share an image are never each other's negatives
    sample_ids: torch.Tensor        # [B] long; named in logs when a step is skipped
    mlm_labels: torch.Tensor        # [B, Lt] long, original word id at corrupted caption words, else -1
    mcr_labels: torch.Tensor        # [B, Lg] long, original word id at corrupted tag pieces, else -1
    wpg_negative_pair: torch.Tensor  # [B] long, in-batch index of the pair whose image is WPG's negative (-1: none)
    wpg_pick_positive: torch.Tensor  # [B, Lt] float in [0, 1): which of a phrase's top-k regions s(i, i) takes
    wpg_pick_negative: torch.Tensor  # [B, Lt] float in [0, 1): the same for s(i, j), drawn independently
    itm_text_side: torch.Tensor     # [B] bool: ITM pairs this row's text with a mined image (else its image with a text)
    itm_negative_draw: torch.Tensor  # [B, 2] float in [0, 1): ITM's sampled/random negative (text side, image side)
    phrase_regions: Optional[torch.Tensor] = None  # [B, Lt] long, true region of each concept (-1 unknown)
    text_type_ids: Optional[torch.Tensor] = None   # [B, Lt] long; None: type 0 everywhere (VQA's tags: type 1)
    wpg_negative_draw: Optional[torch.Tensor] = None  # [B] float in [0, 1): WPG's sampled negative (wpg_negatives)

    @property
    def size(self) -> int:
        return self.text_ids.shape[0]

    def num_real_tokens(self) -> int:
        """Non-padding positions over all streams (for tokens/s)."""
        return int(self.text_mask.sum() + self.tag_mask.sum() + self.region_mask.sum())

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "Batch":
        """Move every tensor to ``device``; floating tensors (region features) also to ``dtype`` if given."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if dtype is not None and v.is_floating_point() and f.name == "region_feats":
                    v = v.to(dtype)
            out[f.name] = v
        return Batch(**out)
