"""MCR, masked concept recovering (MVPTR.md section 3; stage 1).

The data pipeline corrupts 15% of the object-tag word pieces of the visual stream (80% ``[MASK]``, 10%
random word, 10% kept) and stores the originals in ``batch.mcr_labels``. The visual encoder's states at
the tag positions predict them over the word vocabulary with the MCR head. Only the uni-modal visual
encoder is involved: the cross-modal encoder receives no gradient from this loss.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from mvptr_ds.data.types import Batch
from mvptr_ds.objectives.base import LossOutput, masked_token_loss

if TYPE_CHECKING:
    from mvptr_ds.model.mvptr import EncoderOutputs


def mcr_loss(outputs: "EncoderOutputs", batch: Batch, head: nn.Module) -> LossOutput:
    """Mean cross-entropy over corrupted tag pieces.

    Reads ``outputs.visual[:, :num_tags]`` (``[B, Lg, H]``) and ``batch.mcr_labels`` (``[B, Lg]``, -1 = not
    scored); ``head`` maps ``[N, H]`` to word logits ``[N, only_word_size]``. Exact 0 (with graph) when no
    tag piece is corrupted.
    """
    tags = outputs.visual[:, :outputs.num_tags]  # (B, Lg, H)
    if tags.shape[:2] != batch.mcr_labels.shape:
        raise ValueError(f"mcr: visual encoder has {tags.shape[1]} tag positions but batch.mcr_labels has shape "
                         f"{tuple(batch.mcr_labels.shape)}")
    return masked_token_loss("mcr", tags, batch.mcr_labels, head)
