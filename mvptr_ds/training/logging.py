"""Rank-0 run reporting: ``metrics.jsonl``, a tqdm progress bar and Weights & Biases (offline by default).

Only rank 0 writes. Each ``metrics.jsonl`` record is one complete line written with a single ``write`` to a
file opened for appending, so neither a killed writer nor a second one ever leaves half a line in the middle
of the file; a write cut short (a full disk) is cut back off before its error is raised. The file is fsynced with
every checkpoint (``sync``): records newer than the checkpoint a run resumes from are dropped then anyway.
W&B: one run per output folder across resumes (:mod:`~mvptr_ds.training.wandb_run`).
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Dict

from tqdm import tqdm

from mvptr_ds.training import wandb_run


class RunLogger:
    def __init__(self, output_dir: str, is_main: bool, total_steps: int, initial_step: int, train_cfg,
                 config: Dict[str, Any], resume: bool):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = None
        self._bar = None
        self._wandb = None
        if not is_main:
            return
        self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC),
                             0o644)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stderr, disable=None)
        self._wandb = wandb_run.start(output_dir, train_cfg, config, resumed=resume)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_line(self._file, json.dumps(record, sort_keys=True), self.path)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def event(self, message: str) -> None:
        """A one-line notice (skipped step, checkpoint written, ...), shown above the progress bar."""
        if self.is_main:
            (self._bar.write if self._bar is not None else print)(message)

    def sync(self) -> None:
        """``metrics.jsonl`` on disk (called with every checkpoint)."""
        if self._file is not None:
            os.fsync(self._file)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            os.close(self._file)
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._file = self._wandb = None


def append_line(fd: int, text: str, path: str = "metrics.jsonl") -> None:
    """Append ``text`` + newline to the O_APPEND file ``fd`` in one ``write``. A short write (the disk filled
    up during it) is cut back off and raised as ENOSPC, so no partial line of ours stays in the file."""
    data = (text + "\n").encode()
    written = os.write(fd, data)
    if written < len(data):
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)  # O_APPEND: our bytes end at the offset
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes)", path)
