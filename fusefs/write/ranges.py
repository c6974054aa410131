"""Sorted, disjoint, non-adjacent half-open byte ranges ``[(start, end), ...]``."""

from __future__ import annotations

Ranges = list[tuple[int, int]]


def add(rs: Ranges, start: int, end: int) -> Ranges:
    """``rs`` with ``[start, end)`` added (merged with what it touches)."""
    if end <= start:
        return rs
    out: Ranges = []
    placed = False
    for a, b in rs:
        if b < start:
            out.append((a, b))
        elif end < a:
            if not placed:
                out.append((start, end))
                placed = True
            out.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    if not placed:
        out.append((start, end))
    return out


def clip(rs: Ranges, limit: int) -> Ranges:
    """The part of ``rs`` below ``limit``."""
    return [(a, min(b, limit)) for a, b in rs if a < limit]


def gaps(rs: Ranges, start: int, end: int) -> Ranges:
    """The parts of ``[start, end)`` not in ``rs``."""
    out: Ranges = []
    pos = start
    for a, b in rs:
        if b <= pos:
            continue
        if a >= end:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < end:
        out.append((pos, end))
    return out


def covered(rs: Ranges, start: int, end: int) -> bool:
    return not gaps(rs, start, end)
