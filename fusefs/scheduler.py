"""Bounded, prioritised admission of fetches: foreground reads before readahead before prefetch.

At most ``slots`` fetches run at once. A waiting fetch is admitted in (priority, arrival) order,
and a waiting fetch can be boosted (a foreground read that needs a block a prefetch is queued
for). All methods run on the trio thread; no awaits interleave inside them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

FOREGROUND = 0
READAHEAD = 1
PREFETCH = 2


class Ticket:
    """A request for a slot. ``granted`` is set when the slot is handed over."""

    __slots__ = ("priority", "seq", "granted", "active", "holding")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.seq = 0
        self.granted = trio.Event()
        self.active = True  # False once cancelled or granted (stale heap entries are skipped)
        self.holding = False

    def __lt__(self, other: Ticket) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class Scheduler:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._heap: list[Ticket] = []
        self._seq = itertools.count()

    @property
    def running(self) -> int:
        return self.slots - self._free

    def waiting(self, priority: int | None = None) -> int:
        return sum(
            1 for t in self._heap if t.active and (priority is None or t.priority == priority)
        )

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        await self._acquire(ticket)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, ticket: Ticket) -> None:
        ticket.seq = next(self._seq)
        if self._free > 0 and not any(t.active for t in self._heap):
            self._free -= 1
            ticket.active = False
            ticket.holding = True
            return
        heapq.heappush(self._heap, ticket)
        try:
            await ticket.granted.wait()
        except BaseException:
            if ticket.holding:  # granted while being cancelled: pass the slot on
                ticket.holding = False
                self._release()
            ticket.active = False
            raise

    def _release(self) -> None:
        while self._heap:
            t = heapq.heappop(self._heap)
            if t.active:
                t.active = False
                t.holding = True
                t.granted.set()
                return
        self._free += 1

    def boost(self, ticket: Ticket, priority: int) -> None:
        """Raise a waiting ticket's priority (lower number = sooner)."""
        if ticket.active and priority < ticket.priority:
            ticket.priority = priority
            heapq.heapify(self._heap)
