"""One run per output folder: an OS lock on ``<output_dir>/.lock``, held by rank 0 for the run's lifetime.

Two runs writing one folder destroy each other's work (the first deletes the second's checkpoint as an
"incomplete leftover", both append to ``metrics.jsonl``). Rank 0 takes an exclusive ``flock`` before anything
is written and writes its pid and host into the file; a second run finds the lock held and stops with one
line naming that pid, writing nothing. The kernel drops the lock when the holder dies, however it dies
(SIGKILL included), so a lock is never stale: a leftover file without a live holder is simply taken over.

The file is removed on release. Taking the lock re-checks that the locked file is still the one at the path
(another run may have removed it between our open and our flock), so removal never lets two runs in.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from typing import List, Optional

import torch.distributed as dist

from mvptr_ds.config import ConfigError

NAME = ".lock"


class RunLock:
    """The held lock of one output folder (see :func:`acquire`)."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: nobody can have locked the file at this path meanwhile
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def holder(path: str) -> str:
    """What the lock file says about its holder ("pid 123" or "pid 123 on host-b"), or "pid unknown"."""
    try:
        with open(path) as f:
            pid, _, host = f.read().strip().partition(" ")
    except OSError:
        return "pid unknown"
    if not pid.isdigit():
        return "pid unknown"
    return f"pid {pid}" if host in ("", socket.gethostname()) else f"pid {pid} on {host}"


def acquire(output_dir: str) -> RunLock:
    """Lock ``output_dir`` (created if missing) for this process, or ConfigError naming the holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--output_dir {output_dir}: in use by another run ({holder(path)}, lock {path}); "
                              f"wait for it to end or stop it, or use another --output_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {path}: the file system cannot lock files ({e.strerror}); nothing stops a second "
                  f"run from writing into {output_dir} at the same time", file=sys.stderr, flush=True)
            return RunLock(path, None)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released (and removed) it between our open and our flock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return RunLock(path, fd)


def acquire_on_rank0(output_dir: str, rank: int) -> Optional[RunLock]:
    """:func:`acquire` on rank 0; its refusal is raised on every rank (a collective when ranks exist).

    Returns the lock on rank 0, None elsewhere.
    """
    lock, error = None, None
    if rank == 0:
        try:
            lock = acquire(output_dir)
        except ConfigError as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box: List[Optional[str]] = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return lock
