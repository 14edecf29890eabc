"""MLM on the cross-modal text positions of matched pairs (MVPTR.md section 3; stage 2).

The data pipeline corrupts 15% of the caption word pieces (80% ``[MASK]``, 10% random word, 10% kept) and
stores the originals in ``batch.mlm_labels``. Predictions come from the cross-modal encoder's outputs at
the text positions of the matched (image, caption) pairs, i.e. the forward pass of the batch itself (the
ITM negatives are never scored). Concept ids are never predicted: labels at concept positions are
ignored even if a pipeline set them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mvptr_ds.data.types import Batch
from mvptr_ds.objectives.base import LossOutput, masked_token_loss

if TYPE_CHECKING:
    from mvptr_ds.model.mvptr import EncoderOutputs


def mlm_loss(outputs: "EncoderOutputs", batch: Batch, head: nn.Module) -> LossOutput:
    """Mean cross-entropy over corrupted caption word pieces.

    Reads ``outputs.cross[:, :Lt]`` (``[B, Lt, H]``, Lt = ``batch.mlm_labels.shape[1]``) and
    ``batch.mlm_labels`` (``[B, Lt]``, -1 = not scored); ``head`` maps ``[N, H]`` to ``[N, only_word_size]``.
    Exact 0 (with graph) when nothing is corrupted.
    """
    if outputs.cross is None:
        raise ValueError("mlm: the cross-modal encoder did not run (outputs.cross is None)")
    lt = batch.mlm_labels.shape[1]
    text = outputs.cross[:, :lt]  # (B, Lt, H)
    labels = torch.where(batch.phrase_mask.bool(), torch.full_like(batch.mlm_labels, -1), batch.mlm_labels)
    return masked_token_loss("mlm", text, labels, head)
