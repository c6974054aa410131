"""Bounded, prioritised admission of fetches: demand reads first, background fetches behind.

Two disjoint pools of slots:
- ``slots`` for *demand* fetches (``FOREGROUND`` reads a program waits for, and its
  ``READAHEAD``), admitted in (priority, arrival) order;
- ``background_slots`` for *background* fetches (``PREFETCH``: ``prefetch`` commands and hint
  streams), admitted in arrival order, and only while no demand fetch waits.

Invariants: a demand fetch never waits for a slot a background fetch holds (the pools are
disjoint), and no background fetch starts while a demand fetch waits for a slot. A waiting
ticket can be boosted (a program reads a block a prefetch is queued for): a background ticket
boosted to a demand priority moves to the demand queue. A ticket gives its slot back to the
pool it was granted from. All methods run on the trio thread; no awaits interleave inside them.
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


def is_background(priority: int) -> bool:
    """Fetches of this priority run in the background pool (behind every demand fetch)."""
    return priority >= PREFETCH


class Ticket:
    """A request for a slot. ``granted`` is set when the slot is handed over."""

    __slots__ = ("priority", "seq", "granted", "active", "holding", "background")

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.seq = 0
        self.granted = trio.Event()
        self.active = True  # False once cancelled or granted (stale heap entries are skipped)
        self.holding = False
        self.background = False  # the pool the held slot came from

    def __lt__(self, other: Ticket) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class Scheduler:
    def __init__(self, slots: int, background_slots: int = 1) -> None:
        self.slots = slots
        self.background_slots = max(1, background_slots)
        self._free = slots
        self._bg_free = self.background_slots
        self._demand: list[Ticket] = []  # heaps of waiting tickets (stale entries skipped)
        self._background: list[Ticket] = []
        self._seq = itertools.count()

    @property
    def running(self) -> int:
        """Fetches holding a slot, in both pools."""
        return self.slots - self._free + self.background_slots - self._bg_free

    @property
    def running_background(self) -> int:
        return self.background_slots - self._bg_free

    def waiting(self, priority: int | None = None) -> int:
        return sum(
            1
            for t in (*self._demand, *self._background)
            if t.active and (priority is None or t.priority == priority)
        )

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        await self._acquire(ticket)
        try:
            yield
        finally:
            self._release(ticket)

    async def _acquire(self, ticket: Ticket) -> None:
        ticket.seq = next(self._seq)
        heapq.heappush(self._background if is_background(ticket.priority) else self._demand,
                       ticket)  # fmt: skip
        self._dispatch()
        if ticket.holding:
            return
        try:
            await ticket.granted.wait()
        except BaseException:
            if ticket.holding:  # granted while being cancelled: pass the slot on
                self._release(ticket)
            ticket.active = False
            raise

    def _release(self, ticket: Ticket) -> None:
        ticket.holding = False
        if ticket.background:
            self._bg_free += 1
        else:
            self._free += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiting tickets: demand first; background only while no demand
        ticket waits."""
        while self._free > 0 and (t := _pop_active(self._demand)) is not None:
            self._free -= 1
            self._grant(t, background=False)
        if _peek_active(self._demand) is not None:
            return  # a demand fetch waits: start no background work now
        while self._bg_free > 0 and (t := _pop_active(self._background)) is not None:
            self._bg_free -= 1
            self._grant(t, background=True)

    @staticmethod
    def _grant(t: Ticket, *, background: bool) -> None:
        t.active = False
        t.holding = True
        t.background = background
        t.granted.set()

    def boost(self, ticket: Ticket, priority: int) -> None:
        """Raise a waiting ticket's priority (lower number = sooner); a background ticket
        boosted to a demand priority moves to the demand queue."""
        if not ticket.active or priority >= ticket.priority:
            return
        was_background = is_background(ticket.priority)
        ticket.priority = priority
        if was_background and not is_background(priority):
            self._background.remove(ticket)
            heapq.heapify(self._background)
            heapq.heappush(self._demand, ticket)
        else:
            heapq.heapify(self._background if was_background else self._demand)
        self._dispatch()


def _peek_active(heap: list[Ticket]) -> Ticket | None:
    """The first waiting ticket of ``heap`` (stale entries at its head are dropped)."""
    while heap and not heap[0].active:
        heapq.heappop(heap)
    return heap[0] if heap else None


def _pop_active(heap: list[Ticket]) -> Ticket | None:
    t = _peek_active(heap)
    if t is not None:
        heapq.heappop(heap)
    return t
