"""Booking that Ctrl+C cannot cut in half: SIGINT is held back while a step is booked, then delivered.

Installing a signal handler and putting the old one back costs two system calls, on every step if done per
booking, so the guard installs its handler once, at the first booking, and leaves it in place between steps.
Outside a booking the handler passes SIGINT straight on to the handler it replaced, so Ctrl+C behaves as it
did; :meth:`InterruptGuard.release` puts that handler back at the end of the fit. Only the main thread can own
signal handlers; elsewhere bookings run unprotected. Nothing here knows Lightning.
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
        self._installed = False
        self._previous: Any = None  # the handler ours replaced
        self._booking = False
        self._delivering = False
        self._received: tuple[int, Any] | None = None

    @contextmanager
    def booking(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if signal.getsignal(signal.SIGINT) is not self._handler:  # the first booking, or another handler took over
            self._previous, self._installed = signal.signal(signal.SIGINT, self._handler), True
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
        if self._installed and signal.getsignal(signal.SIGINT) is self._handler:
            signal.signal(signal.SIGINT, self._previous)
        self._installed, self._previous = False, None

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
