"""Counters of one mount. Names are the keys shown by ``cat MOUNT/.fusefs``."""

from __future__ import annotations

import resource
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


#: FUSE requests counted by kind (the adapter's handler names; ``forget`` counts FORGET and
#: BATCH_FORGET messages). IOCTL never reaches fusefs: libfuse answers it (pyfuse3 has no
#: handler), so it cannot be counted here.
FUSE_REQUESTS = (
    "lookup", "forget", "getattr", "setattr", "mknod", "mkdir", "unlink", "rmdir", "symlink",
    "readlink",
    "rename", "link", "open", "read", "write", "flush", "release", "fsync", "opendir",
    "readdir", "releasedir", "statfs", "setxattr", "getxattr", "listxattr", "removexattr",
    "access", "create",
)  # fmt: skip


class Stats:
    """Monotonic counters plus a gauge of fetches in flight; safe from any thread.

    ``requests`` (FUSE requests by kind) is written by the trio thread only, one increment
    per request without a lock; readers elsewhere may see a count one request old."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(COUNTERS, 0)
        self.fetches_in_flight = 0
        self.started = time.monotonic()
        self.requests: dict[str, int] = dict.fromkeys(FUSE_REQUESTS, 0)
        #: the thread that answers FUSE requests (set when serving starts), for its CPU time
        self.loop_thread: int | None = None

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

    def request_counts(self) -> dict[str, int]:
        """FUSE requests answered so far, by kind (kinds never seen are left out)."""
        return {k: n for k, n in list(self.requests.items()) if n}

    def cpu(self) -> tuple[float, float | None]:
        """CPU seconds (user + system) of the whole daemon, and of the thread that answers
        FUSE requests (None before serving starts, or where the platform cannot tell)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        loop = None
        if self.loop_thread is not None:
            try:
                loop = time.clock_gettime(time.pthread_getcpuclockid(self.loop_thread))
            except (OSError, AttributeError):  # the thread ended; not Linux
                loop = None
        return ru.ru_utime + ru.ru_stime, loop
