"""Counting the requests a stand-in server answers at once, for tests of a client's concurrency bound."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

# a client that never sends `gather` requests at once is let through after this long: its test then fails on
# `peak` instead of hanging
GIVE_UP_SECONDS = 30


class InFlight:
    """Requests being answered now (`now`) and the most at once (`peak`). `gather` holds each request until
    that many are in flight together (0: none held), so a concurrent client shows its bound however loaded
    the machine is."""

    def __init__(self, lock: threading.Condition) -> None:
        self.lock = lock  # the stand-in's own: its other state is guarded by it too
        self.now = self.peak = self.gather = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside: one request counted in flight (after waiting for `gather` of them)."""
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.lock.notify_all()
            if not self.lock.wait_for(lambda: self.peak >= self.gather, timeout=GIVE_UP_SECONDS):
                self.gather = 0
        try:
            yield
        finally:
            with self.lock:
                self.now -= 1
