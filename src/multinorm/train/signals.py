"""Stopping a run cleanly: SIGINT/SIGTERM become a request to stop after the current step."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

__all__ = ["STOP_SIGNALS", "SignalLatch", "StopOnSignal"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalLatch:
    """A SIGINT/SIGTERM handler that only remembers the signal, for a process that trains several runs in turn
    (a study's worker): a signal that arrives between two runs, or during a run's last step, is kept, and
    `train` started while the latch holds a signal stops after its first step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def install(self) -> SignalLatch:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)
        return self


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; restores the old handlers on exit.

    Handlers are only installed from the main thread (Python delivers signals there), and a signal the
    process already ignores (nohup, background jobs) stays ignored. A `SignalLatch` in place shares its
    signal both ways: one it holds stops this run, one this run received is left in it.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        for latch in self._latches():
            self.signum = self.signum or latch.signum
        return self

    def _latches(self) -> list[SignalLatch]:
        return [h for h in self._previous.values() if isinstance(h, SignalLatch)]

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now (the last checkpoint is intact)
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to the same stream.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step "
                    f"(send it again to stop at once)\n".encode())

    def __exit__(self, *exc_info) -> None:
        for latch in self._latches():
            latch.signum = latch.signum or self.signum
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
