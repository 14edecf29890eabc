"""Run reporting: the log window's averages, ``metrics.jsonl``, the console and Weights & Biases (rank 0).

Each record covers the ``log_every`` steps since the previous one (:class:`LogWindow`): losses are the mean
over those steps (and over ranks), throughput is their samples and tokens over their time.

Only rank 0 writes. Each ``metrics.jsonl`` record is one complete line written with a single ``write`` to a
file opened for appending, so neither a killed writer nor a second one ever leaves half a line in the middle
of the file; a write cut short (a full disk) is cut back off before its error is raised. The file is fsynced with
every checkpoint (``sync``): records newer than the checkpoint a run resumes from are dropped then
(:func:`truncate_metrics`). On a terminal the console shows a progress bar; without one (a launcher's or a
batch job's log) it prints one line per record instead: step, losses, lr, samples/s and the time left.
W&B: one run per output folder across resumes (:mod:`~mvptr_ds.training.wandb_run`).
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from mvptr_ds.files import atomic_write_lines
from mvptr_ds.training import distributed, wandb_run


class LogWindow:
    """What happened since the last record: the sum of each step's losses, the steps, samples and tokens."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.steps, self.samples, self.tokens = 0, 0, 0
        self.start = time.perf_counter()

    def count(self, samples: int, tokens: int) -> None:
        """A micro batch went through the model (counted for throughput even if its step is skipped later)."""
        self.samples += samples
        self.tokens += tokens

    def add_step(self, losses: Dict[str, torch.Tensor]) -> None:
        """The (accumulation-averaged) losses of one optimizer step."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1

    def record(self, device: torch.device, world_size: int, **extra: Any) -> Dict[str, Any]:
        """The window's record (losses: mean over its steps and over ranks; a collective), then a new window."""
        values = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        values["samples"] = torch.tensor(float(self.samples))
        values["tokens"] = torch.tensor(float(self.tokens))
        reduced = distributed.mean_over_ranks(values, device)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = dict(extra)
        record["samples_per_s"] = reduced.pop("samples") * world_size / elapsed
        record["tokens_per_s"] = reduced.pop("tokens") * world_size / elapsed
        record.update(reduced)
        self.reset()
        return record


class RunLogger:
    def __init__(self, output_dir: str, is_main: bool, total_steps: int, initial_step: int, train_cfg,
                 config: Dict[str, Any], resume: bool):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self._file = None
        self._bar = None
        self._wandb = None
        self._since = (time.perf_counter(), initial_step)  # for the time left: the previous record's time, step
        if not is_main:
            return
        self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC),
                             0o644)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stderr, disable=None)  # None: off without a terminal
        self._wandb = wandb_run.start(output_dir, train_cfg, config, resumed=resume)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        append_line(self._file, json.dumps(record, sort_keys=True), self.path)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        now, step = time.perf_counter(), record["step"]
        then, before = self._since
        self._since = (now, step)
        if not self._bar.disable:
            if "loss" in record:
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            return
        eta = (self.total_steps - step) * (now - then) / (step - before) if step > before else None
        print(progress_line(record, self.total_steps, eta), flush=True)

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


def progress_line(record: Dict[str, Any], total_steps: int, eta_s: Optional[float]) -> str:
    """``step 20/600 | loss 4.1234 (mcr 2.0100, mlm 2.1134) | lr 1.00e-04 | 123.4 samples/s | ETA 3m20s``."""
    parts = [f"step {record['step']}/{total_steps}"]
    if "loss" in record:
        terms = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(record.items())
                          if k.startswith("loss/"))
        parts.append(f"loss {record['loss']:.4f}" + (f" ({terms})" if terms else ""))
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """``3h02m``, ``3m20s``, ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def append_line(fd: int, text: str, path: str = "metrics.jsonl") -> None:
    """Append ``text`` + newline to the O_APPEND file ``fd`` in one ``write``. A short write (the disk filled
    up during it) is cut back off and raised as ENOSPC, so no partial line of ours stays in the file."""
    data = (text + "\n").encode()
    written = os.write(fd, data)
    if written < len(data):
        os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - written)  # O_APPEND: our bytes end at the offset
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes)", path)


def truncate_metrics(path: str, step: int) -> None:
    """Drop ``metrics.jsonl`` records of steps after ``step`` (written after the checkpoint we resume from).

    Rewritten atomically, so a resumed run never shows two different records for one step.
    """
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(json.dumps(record, sort_keys=True) + "\n")
    atomic_write_lines(path, kept)
