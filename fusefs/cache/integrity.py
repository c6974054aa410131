"""The checksummed layout of a cached block: the data, then a trailer of per-unit digests.

Layout (all integers little-endian)::

    data (length bytes) | digest of each UNIT of data (8 bytes each) | footer

    footer = magic (8 bytes) | length (8) | digest of (digests + length + unit) (8) | unit (4)

A digest is XXH3-64 (xxhash): checksums are verified on every read from a block file, on the
event loop, and XXH3 hashes at several times the speed of a page-cache ``pread`` where CRC32C
(google-crc32c) runs at about its speed, which would cost warm reads far more than the 10%
allowed. Units are 64 KiB, so a 4 KiB random read hashes one 64 KiB unit, never the whole block.

Anything that does not parse (an old fusefs's bare block, a truncated or torn file, a flipped
bit in the trailer) is rejected as a whole; a unit whose digest differs is rejected on read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

UNIT = 64 * 1024
MAGIC = b"fusefsB1"
_FOOTER = struct.Struct("<8sQQI")
FOOTER_SIZE = _FOOTER.size

digest = xxhash.xxh3_64_intdigest


class Damaged(Exception):
    """A cached block failed its checks; the message says how."""


def units(length: int) -> int:
    return (length + UNIT - 1) // UNIT


def trailer(data: bytes | memoryview) -> bytes:
    """The digests and footer to store after ``data``."""
    mv = memoryview(data)
    n = units(len(mv))
    digests = struct.pack(f"<{n}Q", *(digest(mv[i * UNIT : (i + 1) * UNIT]) for i in range(n)))
    return digests + _footer(digests, len(mv))


def _footer(digests: bytes, length: int) -> bytes:
    check = digest(digests + struct.pack("<QI", length, UNIT))
    return _FOOTER.pack(MAGIC, length, check, UNIT)


def parse_footer(footer: bytes, stored_size: int) -> int:
    """The data length a footer announces, checked against the stored item's size."""
    if len(footer) != FOOTER_SIZE:
        raise Damaged("shorter than its trailer")
    magic, length, _check, unit = _FOOTER.unpack(footer)
    if magic != MAGIC or unit != UNIT:
        raise Damaged("no valid trailer")
    if stored_size != length + 8 * units(length) + FOOTER_SIZE:
        raise Damaged(f"size {stored_size} does not match its trailer (length {length})")
    return int(length)


def parse_digests(raw: bytes, footer: bytes, length: int) -> tuple[int, ...]:
    """The per-unit digests, once the trailer's own check matches."""
    if _footer(raw, length) != footer:
        raise Damaged("trailer checksum mismatch")
    return struct.unpack(f"<{units(length)}Q", raw)


def decode(value: bytes) -> bytes:
    """The data of a whole stored item (kept in memory: the small blocks inside SQLite),
    every unit verified."""
    footer = value[-FOOTER_SIZE:]
    length = parse_footer(footer, len(value))
    digests = parse_digests(value[length:-FOOTER_SIZE], footer, length)
    verify(memoryview(value)[:length], 0, digests)
    return value[:length]


def verify(buf: bytes | memoryview, first_unit: int, digests: Sequence[int]) -> None:
    """Check ``buf``, which holds whole units from ``first_unit`` on (the last may be short)."""
    mv = memoryview(buf)
    for j in range(units(len(mv))):
        if digest(mv[j * UNIT : (j + 1) * UNIT]) != digests[first_unit + j]:
            raise Damaged(f"checksum mismatch in unit {first_unit + j}")
