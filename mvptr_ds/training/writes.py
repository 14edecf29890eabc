"""Checkpoint writes whose failures are reported, not garbled: the OS error kept, every rank told.

A full disk during ``torch.save`` surfaces as ``RuntimeError: [enforce fail at inline_container.cc] unexpected
pos 704 vs 598``: the zip writer loses the ``OSError``. :func:`install_writer` makes DeepSpeed's torch
checkpoint engine write through a Python file object whose failed ``write`` is recorded, so the error raised
is the ``OSError`` itself (``[Errno 28] No space left on device: '<file>'``); the file is fsynced, so a
checkpoint marked complete afterwards is on disk.

Every rank writes its own files, and DeepSpeed's ``save_checkpoint`` holds collectives between the writes: a
rank that raised out of it would leave the others waiting. :func:`deferred_errors` lets the save run to its end
on every rank (after the first failure a rank skips its remaining files) and raises afterwards;
:func:`agree_failure` then tells every rank about the first failure on any rank, so all of them stop with the
same one-line message (:class:`CheckpointWriteError`).
"""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from mvptr_ds.training.guard import TrainingStopped

_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (disk full, ...); the message names the checkpoint that remains usable."""


class _Sink:
    """A file's ``write``/``flush``, remembering the first OSError (torch's zip writer swallows it)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def save_file(state: Any, path: str, zipfile: bool = True) -> None:
    """``torch.save(state, path)``, fsynced; a failed write raises its ``OSError`` (errno and file name)."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(state, sink, _use_new_zipfile_serialization=zipfile)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def install_writer(engine) -> None:
    """Make the engine's torch checkpoint engine write with :func:`save_file` (other engines are left alone)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce).__name__ == "TorchCheckpointEngine":
        ce.save = lambda state_dict, path: save_file(state_dict, path, bool(getattr(ce, "zipfile_serialization", True)))


@contextlib.contextmanager
def deferred_errors(engine):
    """Inside: the engine's checkpoint-file writes never raise (the first error is kept, later writes skipped);
    on leaving, that error is raised. Lets DeepSpeed's collectives inside ``save_checkpoint`` complete."""
    ce = engine.checkpoint_engine
    inner = ce.save
    errors: List[Exception] = []

    def save(state_dict, path):
        if errors:
            return
        try:
            inner(state_dict, path)
        except Exception as e:  # not KeyboardInterrupt: a second Ctrl-C still ends the save at once
            errors.append(e)
    ce.save = save
    try:
        yield
    finally:
        ce.save = inner
    if errors:
        raise errors[0]


Failure = Tuple[int, bool, Optional[int], str]  # (rank, an OSError?, errno, message)


def attempt(fn) -> Optional[Exception]:
    """Run ``fn()``; the exception it raised, or None."""
    try:
        fn()
    except Exception as e:
        return e
    return None


def agree_failure(error: Optional[Exception]) -> Optional[Failure]:
    """The first failure on any rank, on every rank (a collective when ranks exist), or None.

    A failure that is not an ``OSError`` (a bug) is re-raised as it is on the rank where it happened, and as a
    RuntimeError naming that rank on the others.
    """
    mine = None
    if error is not None:
        is_os = isinstance(error, OSError)
        mine = (dist.get_rank() if dist.is_initialized() else 0, is_os, error.errno if is_os else None,
                str(error) if is_os else f"{type(error).__name__}: {error}")
    failures = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, mine)
    first = next((f for f in failures if f is not None), None)
    if first is not None and not first[1]:
        if error is not None:
            raise error
        raise RuntimeError(f"rank {first[0]} failed while writing a checkpoint: {first[3]}")
    return first


def describe(failure: Failure, world_size: int) -> str:
    """"the disk is full ([Errno 28] No space left on device: '<file>'; rank 1)" and the like."""
    rank, _, err, text = failure
    where = f"; rank {rank}" if world_size > 1 else ""
    return f"{_FULL[err]} ({text}{where})" if err in _FULL else f"{text}{where}"


def is_full(failure: Failure) -> bool:
    return failure[2] in _FULL
