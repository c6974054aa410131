"""The one retry loop of the backends: transient failures are tried again, boundedly.

A store call is retried when it raises :class:`~fusefs.errors.TransientError` (throttling, 5xx,
a refused or reset connection, a body cut short or of the wrong length, a checksum mismatch, a
response that made no progress for the stall timeout). Each retry is a new request, on a fresh
connection when the old one broke, after an exponential backoff with jitter. Any other error
(not found, denied, changed) is final at once. The SDKs' own retries are turned off so attempts
do not multiply.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """At most ``attempts`` tries, and none started ``deadline`` seconds after the first.

    The wait before try ``n+1`` is drawn from ``[d/2, d]`` with ``d = min(cap, base * 2**n)``.
    The longest a call can take is therefore about ``deadline`` plus one attempt (whose own
    length is bounded by the stall timeout while it makes no progress).
    """

    attempts: int = 10
    deadline: float = 15.0
    base: float = 0.05
    cap: float = 1.0

    def backoff(self, attempt: int) -> float:
        d = min(self.cap, self.base * 2**attempt)
        return random.uniform(d / 2, d)

    def call(self, fn: Callable[[], T], what: str, *, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
        """``fn()``, tried again on TransientError while attempts and time remain."""
        started = clock()
        attempt = 1
        while True:
            try:
                return fn()
            except TransientError as exc:
                delay = self.backoff(attempt)
                if attempt >= self.attempts or clock() + delay - started > self.deadline:
                    raise TransientError(
                        f"{exc.message} (gave up after {attempt} attempts)", cause=exc
                    ) from exc
                log.debug("%s: %s; attempt %d failed, retrying in %.2fs", what, exc.message,
                          attempt, delay)
                sleep(delay)
                attempt += 1


#: The policy every backend uses unless told otherwise.
DEFAULT_RETRY = RetryPolicy()
