"""Worker threads that a cancellation does not wait for.

A store call (a GET against a slow server, a LIST of a huge prefix) can block for as long as the
server likes. ``trio.to_thread.run_sync`` waits for the thread by default, so cancelling the
task -- which is how the mount shuts down on SIGTERM -- would wait too. :func:`run_sync` lets the
cancelled task go at once; the abandoned thread finishes its call in the background and its
result is dropped (a block it fetched is still stored in the cache by the thread itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def run_sync(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    """Run ``fn(*args)`` in a worker thread; a cancellation abandons the thread at once."""
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
