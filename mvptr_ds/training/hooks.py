"""The training loop's test seams, in one object. :class:`LoopHooks` itself does nothing: that is production.

Fault injection (``faults.FaultPlan``, driven by ``MVPTR_FAULT_INJECT``) overrides these methods to poison a
batch or a gradient, kill the process after a step or in the middle of a save, or fill the disk.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class LoopHooks:
    def on_batch(self, batch, step: int):
        """The micro batch drawn for optimizer step ``step`` (1-based), before it moves to the device."""
        return batch

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The micro batch's loss before the non-finite check and ``engine.backward``."""
        return loss

    def after_step(self, step: int) -> None:
        """Optimizer step ``step`` is done and logged; its checkpoint (if due) is not written yet."""

    def before_save(self, engine, step: int) -> Optional[Callable[[str], None]]:
        """Called before the checkpoint of ``step`` is written; returns the hook ``checkpoint.save`` calls with
        ``"before"``/``"after"`` (or None)."""
        return None
