"""How many requests the server holds at once: ``--parallel`` running plus ``--max-queue`` waiting, then 503.

A request takes a place before its images are decoded (so an overloaded server refuses cheaply) and gives it back
when its job is over: finished, failed, or cancelled because the client went away.
"""

from __future__ import annotations

import math
import threading
import time


class Admission:
    def __init__(self, parallel: int, max_queue: int) -> None:
        self.parallel = max(1, parallel)
        self.capacity = self.parallel + max(0, max_queue)
        self._held = 0
        self._lock = threading.Lock()
        self._mean_seconds = 0.0  # moving average of how long a request holds its place (for Retry-After)

    def try_acquire(self) -> float | None:
        """A start time to hand back to `release`, or None when the server is full."""
        with self._lock:
            if self._held >= self.capacity:
                return None
            self._held += 1
            return time.monotonic()

    def release(self, started: float) -> None:
        with self._lock:
            self._held -= 1
            took = time.monotonic() - started
            self._mean_seconds = took if not self._mean_seconds else 0.8 * self._mean_seconds + 0.2 * took

    @property
    def running(self) -> int:
        return min(self._held, self.parallel)

    @property
    def queued(self) -> int:
        return max(0, self._held - self.parallel)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: one average request per slot ahead of us, at least 1."""
        with self._lock:
            waves = (self._held - self.parallel) / self.parallel + 1
            return max(1, math.ceil(self._mean_seconds * waves))
