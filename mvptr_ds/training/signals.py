"""Graceful stop on SIGTERM/SIGINT (as batch schedulers send before a job's time runs out) or when the
launcher is gone.

The handler only records the signal. The trainer asks :meth:`StopRequest.agreed` at every optimizer-step
boundary; that also asks the launcher watch (``launcher.LauncherWatch``), and the flag is all-reduced, so
every rank sees the stop at the same step (a signal delivered to one rank only stops all of them), saves the
checkpoint together and leaves with exit code 0.

A second SIGINT (Ctrl-C pressed twice) raises :class:`Interrupted` at once, wherever the process is (the
step, or the final checkpoint, whose files are then incomplete: its ``COMPLETE`` marker is written last, so
it is ignored on resume and the previous complete checkpoint stays the newest). The trainer turns it into
one ``error:`` line and exit code 130 (128 + SIGINT, what shells report for an interrupted command).
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

import torch

from mvptr_ds.training.guard import agree

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
EXIT_INTERRUPTED = 130


class Interrupted(KeyboardInterrupt):
    """Ctrl-C pressed again while stopping; the message (if any) says which checkpoint is intact."""


class StopRequest:
    def __init__(self, watch=None):
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None  # a stop not caused by a signal (the launcher exited)
        self.saving: Optional[int] = None  # the step whose checkpoint is being written (set by the trainer)
        self._watch = watch
        self._interrupts = 0
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # counted apart: Ctrl-C under deepspeed also brings the launcher's SIGTERM
                raise Interrupted()
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        """This rank's own request (a signal, or the launcher gone); asks the watch. Not a collective."""
        if self.signum is None and self.reason is None and self._watch is not None:
            self.reason = self._watch.check()
        return self.signum is not None or self.reason is not None

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has a stop request (a collective)."""
        return agree([self.requested], device)[0]

    @property
    def name(self) -> str:
        """What stopped the run, short ("SIGTERM", "launcher exit")."""
        if self.signum is not None:
            return NAMES[self.signum]
        return "launcher exit" if self.reason is not None else "a stop signal on another rank"

    @property
    def cause(self) -> str:
        """What stopped the run, for the log ("received SIGTERM", "the launcher (pid 12) exited")."""
        if self.signum is None and self.reason is not None:
            return self.reason
        return f"received {self.name}"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
