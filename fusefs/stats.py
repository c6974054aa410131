"""Counters of one mount. Names are the keys shown by ``cat MOUNT/.fusefs``."""

from __future__ import annotations

import threading
import time

HITS = "hits"
MISSES = "misses"
BYTES_SERVED = "bytes_served"
BYTES_FETCHED = "bytes_fetched"
FETCHES = "fetches"
ERRORS = "errors"
PREFETCH_QUEUED = "prefetch_queued"
PREFETCH_DONE = "prefetch_done"
PREFETCH_FAILED = "prefetch_failed"
READAHEAD_BLOCKS = "readahead_blocks"
CORRUPT_BLOCKS = "corrupt_blocks"

COUNTERS = (
    HITS,
    MISSES,
    BYTES_SERVED,
    BYTES_FETCHED,
    FETCHES,
    ERRORS,
    PREFETCH_QUEUED,
    PREFETCH_DONE,
    PREFETCH_FAILED,
    READAHEAD_BLOCKS,
    CORRUPT_BLOCKS,
)


class Stats:
    """Monotonic counters plus a gauge of fetches in flight; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(COUNTERS, 0)
        self.fetches_in_flight = 0
        self.started = time.monotonic()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def in_flight(self, delta: int) -> None:
        with self._lock:
            self.fetches_in_flight += delta

    def __getitem__(self, name: str) -> int:
        return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)
