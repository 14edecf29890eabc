"""Fault injection for the reliability tests, driven by one environment variable (off by default).

``MVPTR_FAULT_INJECT`` holds ``;``-separated ``key=value`` items:

- ``kill=step:N``: this process SIGKILLs itself right after optimizer step N is logged (before its save).
- ``kill=save:N:before|mid|after``: SIGKILL during the save of step N: before DeepSpeed writes anything,
  after its first file is written (the rest missing), or after all files but before the ``COMPLETE`` marker.
- ``kill_rank=R``: only rank R kills itself (default: every rank).
- ``enospc=save:N``: the disk fills up during the save of step N: its first file is cut short and the write
  fails with ``OSError(ENOSPC)``, as ``write(2)`` does on a full disk. ``enospc_rank=R``: only on rank R.
- ``pause_in_save=S``: every save sleeps S seconds after its first file (to signal a process mid-save); the
  process prints ``fault: pausing in the save of step N`` first.
- ``nan_loss=N,M``: the first micro batch drawn for optimizer step N (and M) gets NaN region features (a
  NaN loss through the real forward pass); ``N*K``: the first K micro batches drawn for step N (a skipped
  batch is replaced by the next one, still for step N). ``nan_grad=...``: the same, but the loss stays
  finite and its gradient is NaN. ``nan_rank=R``: only on rank R (default: every rank).
- ``empty=R``: rank R's batches lose every MLM/MCR label and phrase (objectives with nothing to score).
- ``trace=DIR``: every rank appends ``{"step", "rank", "ids"}`` per micro batch to ``DIR/trace<rank>.jsonl``.

The trainer asks :func:`from_env` once; with the variable unset it gets the no-op :class:`LoopHooks`.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from typing import Dict

import torch

from mvptr_ds.training.hooks import LoopHooks

ENV = "MVPTR_FAULT_INJECT"


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _counts(value: str) -> Dict[int, int]:
    """``"3,5*2"`` -> {3: 1, 5: 2}: how many micro batches of each step to poison."""
    out: Dict[int, int] = {}
    for item in value.split(","):
        if item.strip():
            step, _, times = item.partition("*")
            out[int(step)] = int(times or 1)
    return out


class FaultPlan(LoopHooks):
    def __init__(self, spec: str, rank: int):
        items = dict(kv.split("=", 1) for kv in spec.split(";") if "=" in kv)
        self.rank = rank
        kill_rank = items.get("kill_rank")
        self.kill = items.get("kill", "") if kill_rank is None or int(kill_rank) == rank else ""
        nan_rank = items.get("nan_rank")
        nan_here = nan_rank is None or int(nan_rank) == rank
        self.nan_loss = _counts(items.get("nan_loss", "")) if nan_here else {}
        self.nan_grad = _counts(items.get("nan_grad", "")) if nan_here else {}
        self.empty = "empty" in items and int(items["empty"]) == rank
        enospc_rank = items.get("enospc_rank")
        self.enospc = items.get("enospc", "") if enospc_rank is None or int(enospc_rank) == rank else ""
        self.pause_in_save = float(items.get("pause_in_save", 0))
        self.trace = items.get("trace")

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, step: int) -> None:
        if self.kill == f"step:{step}":
            self._die()

    def on_batch(self, batch, step: int):
        """The micro batch of optimizer step ``step`` (1-based) as the data path hands it over."""
        if self.trace:
            os.makedirs(self.trace, exist_ok=True)
            with open(os.path.join(self.trace, f"trace{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "rank": self.rank, "ids": batch.sample_ids.tolist()}) + "\n")
        if self.nan_loss.get(step, 0) > 0:
            self.nan_loss[step] -= 1
            batch.region_feats = torch.full_like(batch.region_feats, float("nan"))
        if self.empty:
            batch.mlm_labels = torch.full_like(batch.mlm_labels, -1)
            batch.mcr_labels = torch.full_like(batch.mcr_labels, -1)
            batch.phrase_mask = torch.zeros_like(batch.phrase_mask)
            if batch.phrase_regions is not None:
                batch.phrase_regions = torch.full_like(batch.phrase_regions, -1)
        return batch

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_grad.get(step, 0) > 0:
            self.nan_grad[step] -= 1
            return _NanGrad.apply(loss)
        return loss

    def before_save(self, engine, step: int):
        self.wrap_checkpoint_engine(engine, step)
        return self.save_hook(step)

    def save_hook(self, step: int):
        """The hook ``checkpoint.save`` calls with "before"/"after" for the save of ``step`` (or None)."""
        if not self.kill.startswith(f"save:{step}:"):
            return None
        where = self.kill.rsplit(":", 1)[1]

        def hook(stage: str) -> None:
            if stage == where:
                self._die()
        return hook

    def wrap_checkpoint_engine(self, engine, step: int) -> None:
        """The save-time faults (``kill=save:N:mid``, ``enospc=save:N``, ``pause_in_save``) for the save of
        ``step``: the engine's checkpoint-file writer is wrapped for this save only."""
        kill = self.kill == f"save:{step}:mid"
        enospc = self.enospc == f"save:{step}"
        ce = engine.checkpoint_engine
        inner = getattr(ce, "_unfaulted_save", ce.save)  # the writer before any earlier save's wrapping
        ce._unfaulted_save = inner
        if not (kill or enospc or self.pause_in_save):
            ce.save = inner
            return
        first = [True]

        def save(state_dict, path):
            if enospc:
                with open(path, "wb") as f:
                    f.write(b"PK\x03\x04 cut short")  # the start of a zip, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            inner(state_dict, path)
            if first[0] and self.pause_in_save:
                print(f"fault: pausing in the save of step {step}", file=sys.stderr, flush=True)
                time.sleep(self.pause_in_save)
            first[0] = False
            if kill:
                self._die()
        ce.save = save


def from_env(rank: int) -> LoopHooks:
    """The fault plan of ``MVPTR_FAULT_INJECT`` for ``rank``, or the no-op hooks when it is unset."""
    spec = os.environ.get(ENV, "").strip()
    return FaultPlan(spec, rank) if spec else LoopHooks()
