"""What fusefs knows of one folder's keys: listed key ranges, and the listings in flight.

A LIST that starts after key ``lo`` and returns keys up to ``hi`` (or to the end of the folder)
proves the folder's content over ``(lo, hi]``: every key there is in the page, every key not in
it does not exist. A :class:`Range` keeps such a page; a lookup whose name falls in a range is
answered from memory, present or absent, with no request. Ranges of one folder never overlap
(a newer listing replaces the part of an older one it covers) and adjacent ones merge.

Keys are full keys relative to the store root, compared as Python strings (code point order is
UTF-8 byte order, the order stores list in). An object ``P/name`` is key ``P/name``; a
sub-folder ``P/name/`` is key ``P/name/`` and stands for every key below it, so a range that
ends at a sub-folder covers that whole sub-tree (:func:`range_end`).

Memory: a range holds two lists (8 bytes a slot each) of keys and infos that the backend built
anyway; ``ObjectInfo`` objects are shared with the nodes made from them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from .backends.base import ObjectInfo

#: Entries asked for by one LIST of a range (S3's and GCS's page maximum).
PAGE = 1000
#: Stands for "every key below this sub-folder" at the end of a range.
_MAX_CHAR = "\U0010ffff"


def range_end(last_key: str) -> str:
    """The inclusive upper bound of a page whose last key is ``last_key``."""
    return last_key + _MAX_CHAR if last_key.endswith("/") else last_key


@dataclass(eq=False, slots=True)
class Range:
    """Keys of one folder proven over ``(lo, hi]`` (``hi`` None: to the end) at ``listed``."""

    lo: str
    hi: str | None
    listed: float  # monotonic time the LIST was sent: what it shows is at least this fresh
    keys: list[str]  # sorted
    infos: list[ObjectInfo | None]  # per key; None for sub-folders

    def covers(self, key: str) -> bool:
        return self.lo < key and (self.hi is None or key <= self.hi)

    def get(self, key: str) -> ObjectInfo | None | bool:
        """The entry at ``key``: its info (objects), True (sub-folders), or False (absent)."""
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            return self.infos[i] or True
        return False

    def block_start(self, key: str) -> str:
        """Where to start re-listing the ``PAGE``-entry block of this range that holds
        ``key``: re-listing an expired range block by block costs one LIST per block."""
        i = bisect.bisect_left(self.keys, key)
        i -= i % PAGE
        return self.lo if i == 0 else self.keys[i - 1]

    def __len__(self) -> int:
        return len(self.keys)


def _cut(r: Range, lo: str, hi: str | None) -> Range | None:
    """The part of ``r`` within ``(lo, hi]``, or None if empty."""
    new_lo = max(r.lo, lo)
    if r.hi is None:
        new_hi = hi
    elif hi is None:
        new_hi = r.hi
    else:
        new_hi = min(r.hi, hi)
    if new_hi is not None and new_hi <= new_lo:
        return None
    a = bisect.bisect_right(r.keys, new_lo)
    b = len(r.keys) if new_hi is None else bisect.bisect_right(r.keys, new_hi)
    return Range(new_lo, new_hi, r.listed, r.keys[a:b], r.infos[a:b])


@dataclass(eq=False)
class Flight:
    """A LIST in flight that starts after ``start``; ``fill``: part of a folder fill."""

    start: str
    fill: bool
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class DirListing:
    """A folder's listed ranges (sorted by ``lo``, disjoint) and its listings in flight."""

    ranges: list[Range] = field(default_factory=list)
    flights: list[Flight] = field(default_factory=list)
    filling: bool = False
    full_flight: trio.Event | None = None  # a complete listing in flight (readdir)
    #: this mount's changes made while listings were in flight: (when, key, value), replayed
    #: on a range listed before them (its answer may predate them); cleared when none flies
    notes: list[tuple[float, str, ObjectInfo | None | bool]] = field(default_factory=list)

    def entries(self) -> int:
        return sum(len(r) for r in self.ranges)

    def find(self, key: str) -> Range | None:
        """The range that covers ``key``, if any."""
        i = bisect.bisect_left(self.ranges, key, key=lambda r: r.lo)
        if i > 0 and self.ranges[i - 1].covers(key):
            return self.ranges[i - 1]
        return None

    def insert(self, new: Range, merge_within: float) -> int:
        """Add a newer range: it replaces what older ones said over its span; ranges that
        touch merge (keeping the older time) when listed within ``merge_within`` seconds of
        each other. Returns the change in the number of entries held."""
        before = self.entries()
        kept: list[Range] = []
        for r in self.ranges:
            overlaps = (new.hi is None or r.lo < new.hi) and (r.hi is None or new.lo < r.hi)
            if not overlaps:
                kept.append(r)
                continue
            left = _cut(r, r.lo, new.lo)
            right = _cut(r, new.hi, r.hi) if new.hi is not None else None
            kept.extend(x for x in (left, right) if x is not None)
        kept.append(new)
        kept.sort(key=lambda r: r.lo)
        merged: list[Range] = []
        for r in kept:
            prev = merged[-1] if merged else None
            if (
                prev is not None
                and prev.hi == r.lo
                and abs(prev.listed - r.listed) <= merge_within
            ):
                merged[-1] = Range(prev.lo, r.hi, min(prev.listed, r.listed),
                                   prev.keys + r.keys, prev.infos + r.infos)
            else:
                merged.append(r)
        self.ranges = merged
        return self.entries() - before

    def complete(self, fresh_since: float) -> Range | None:
        """The one range that covers the whole folder, listed after ``fresh_since``."""
        if len(self.ranges) == 1:
            r = self.ranges[0]
            if r.lo == "" and r.hi is None and r.listed > fresh_since:
                return r
        return None

    def next_gap(self, pos: str, fresh_since: float) -> str | None:
        """From ``pos`` on, the first key after which nothing fresh is known (where a fill
        lists next), or None if fresh ranges reach the end of the folder."""
        while True:
            r = self.find(pos + "\x00") if pos else self.find("\x00")
            if r is None or r.listed <= fresh_since:
                return pos
            if r.hi is None:
                return None
            pos = r.hi

    def note(self, key: str, value: ObjectInfo | None | bool, when: float) -> None:
        """This mount changed ``key`` at ``when``: an object (info), a sub-folder (None, key
        ending in ``/``) or absent (False). Only a range that covers it changes (as if
        re-listed); a listing in flight gets it too, when it lands (:meth:`replay`)."""
        if self.flights:
            self.notes.append((when, key, value))
        r = self.find(key)
        if r is not None:
            _note(r, key, value)

    def replay(self, r: Range) -> None:
        """Apply to a range just listed the changes this mount made since it was asked for
        (a folder renamed away while the LIST flew must not come back with its answer)."""
        for when, key, value in self.notes:
            if when >= r.listed and r.covers(key):
                _note(r, key, value)
        if not self.flights:
            self.notes.clear()

    def flight_for(self, key: str) -> Flight | None:
        """The listing in flight most likely to answer ``key``: the one that starts
        closest before it."""
        best = None
        for f in self.flights:
            if f.start < key and (best is None or f.start > best.start):
                best = f
        return best

    def clear(self) -> int:
        n = self.entries()
        self.ranges = []
        return n


def _note(r: Range, key: str, value: ObjectInfo | None | bool) -> None:
    """Set ``key`` in range ``r`` (see :meth:`DirListing.note`)."""
    i = bisect.bisect_left(r.keys, key)
    there = i < len(r.keys) and r.keys[i] == key
    if value is False:
        if there:
            del r.keys[i]
            del r.infos[i]
    elif there:
        r.infos[i] = value if isinstance(value, ObjectInfo) else None
    else:
        r.keys.insert(i, key)
        r.infos.insert(i, value if isinstance(value, ObjectInfo) else None)


def page_items(
    objects: list[ObjectInfo], prefixes: list[str]
) -> Iterator[tuple[str, ObjectInfo | None]]:
    """Objects and sub-folders of listing pages as (key, info-or-None), in key order."""
    items: list[tuple[str, ObjectInfo | None]] = [(o.key, o) for o in objects]
    items.extend((p, None) for p in prefixes)
    items.sort(key=lambda kv: kv[0])
    return iter(items)
