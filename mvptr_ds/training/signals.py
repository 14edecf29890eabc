"""Graceful stop on SIGTERM/SIGINT, as batch schedulers send before a job's time runs out.

The handler only records the signal. The trainer asks :meth:`StopRequest.agreed` at every optimizer-step
boundary; the flag is all-reduced, so every rank sees the stop at the same step (a signal delivered to one
rank only stops all of them), saves the checkpoint together and leaves with exit code 0. A second SIGINT
(Ctrl-C pressed twice) interrupts at once with KeyboardInterrupt.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

import torch

from mvptr_ds.training.guard import agree

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopRequest:
    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has received a stop signal (a collective)."""
        return agree([self.signum is not None], device)[0]

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, "a stop signal on another rank")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
