"""Worker threads that a cancellation does not wait for.

A store call (a GET against a slow server, a LIST of a huge prefix) can block for as long as the
server likes. ``trio.to_thread.run_sync`` waits for the thread by default, so cancelling the
task -- which is how the mount shuts down on SIGTERM -- would wait too. :func:`run_sync` lets the
cancelled task go at once; the abandoned thread finishes its call in the background and its
result is dropped (a block it fetched is still stored in the cache by the thread itself).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

#: trio >= 0.23 calls the flag ``abandon_on_cancel``; 0.22 calls it ``cancellable``.
_ABANDON = (
    "abandon_on_cancel"
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else "cancellable"
)


async def run_sync(
    fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None
) -> T:
    """Run ``fn(*args)`` in a worker thread; a cancellation abandons the thread at once."""
    result: T
    if _ABANDON == "abandon_on_cancel":
        result = await trio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)
    else:  # trio 0.22
        result = await trio.to_thread.run_sync(  # type: ignore[call-arg]
            fn, *args, limiter=limiter, cancellable=True
        )
    return result
