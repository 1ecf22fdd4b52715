"""Booking that Ctrl+C cannot cut in half: SIGINT is held back while a step is booked, then delivered.

Installing a signal handler costs two system calls, about 30 µs per step inside a training step
(``benchmarks/step_breakdown.py``), so the guard installs its handler once, at the first booking, and leaves
it in place between steps. Outside a booking the handler passes SIGINT straight on to the handler it replaced,
so Ctrl+C behaves as it did; :meth:`InterruptGuard.release` puts that handler back at the end of the fit.
Only the main thread can own signal handlers; elsewhere bookings run unprotected. Nothing here knows Lightning.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InterruptGuard:
    """``with guard.booking(): ...`` runs the block whole; a SIGINT that arrives meanwhile is delivered after it."""

    def __init__(self) -> None:
        self._handler = self._on_sigint  # one bound method, so that ``getsignal(...) is self._handler`` holds
        self._previous: Any = None  # the handler ours replaced; None while ours is not installed
        self._booking = False
        self._delivering = False
        self._received: tuple[int, Any] | None = None

    @contextmanager
    def booking(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if signal.getsignal(signal.SIGINT) is not self._handler:  # the first booking, or another handler took over
            self._previous = signal.signal(signal.SIGINT, self._handler)
        self._booking, self._received = True, None
        try:
            yield
        finally:
            self._booking = False
            received, self._received = self._received, None
            if received is not None:
                self._deliver(*received)

    def release(self) -> None:
        """Put back the handler that ours replaced (when ours is still the one installed)."""
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is self._handler:
                signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._booking:
            self._received = (signum, frame)
        else:
            self._deliver(signum, frame)

    def _deliver(self, signum: int, frame: Any) -> None:
        previous = self._previous
        if self._delivering or previous in (None, signal.SIG_DFL):  # (a handler that calls ours back: stop there)
            raise KeyboardInterrupt
        if callable(previous):
            self._delivering = True
            try:
                previous(signum, frame)
            finally:
                self._delivering = False
