"""Notice when the launcher of this rank is gone, so that a rank never trains on as an orphan.

``deepspeed`` (the runner) starts one ``deepspeed.launcher.launch`` per node, which starts the ranks. The
runner forwards SIGTERM only in multi-node launches: ``kill -TERM <deepspeed pid>`` ends the runner at once
and leaves the per-node launcher and the ranks running, with nobody left to stop them. ``torchrun`` starts the
ranks itself and forwards signals, but a SIGKILLed torchrun leaves them running too.

:meth:`LauncherWatch.check` is asked at every step boundary (through ``signals.StopRequest``); it reports the
direct parent's exit (``os.getppid()`` changes when the parent dies) and, under DeepSpeed's per-node
launcher, the exit of the ``deepspeed`` runner above it (the per-node launcher's parent pid changes). The
trainer then stops at that boundary with a checkpoint, like on SIGTERM. Only processes started by a launcher
(``LOCAL_RANK`` set by it, ``distributed.launched``) are watched, never a plain ``python -m mvptr_ds.run``, and
nothing above the launcher (a shell, a scheduler) is.

Why not ``prctl(PR_SET_PDEATHSIG)``: it fires when the parent *thread* that started us exits (a launcher
spawning from a worker thread would stop the run for nothing), it only covers the direct parent (the
per-node launcher, which is exactly the process that survives the runner's SIGTERM), and the flag it would
set is read at the next step boundary anyway, where comparing pids costs a few microseconds.
"""
from __future__ import annotations

import os
from typing import Optional

from mvptr_ds.training import distributed


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid`` (None when it does not exist or /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return int(fields[1])


class LauncherWatch:
    def __init__(self, parent: int, runner: Optional[int] = None):
        self.parent, self.runner = parent, runner

    @classmethod
    def from_env(cls) -> Optional["LauncherWatch"]:
        """A watch for a rank started by a launcher (``distributed.launched``), else None."""
        if not distributed.launched():
            return None
        parent = os.getppid()
        runner = None
        if "deepspeed.launcher.launch" in _cmdline(parent):
            grand = _parent_of(parent)
            if grand is not None and grand > 1 and "deepspeed" in _cmdline(grand):
                runner = grand
        return cls(parent, runner)

    def check(self) -> Optional[str]:
        """None while the launcher lives, else what happened ("the launcher (pid N) exited")."""
        if os.getppid() != self.parent:
            return f"the launcher (pid {self.parent}) exited"
        if self.runner is not None and _parent_of(self.parent) not in (self.runner, None):
            return f"the deepspeed launcher (pid {self.runner}) exited"
        return None
