"""The read side of the disk block store: the table of open block files and the checks made
on every read. :class:`OpenBlocks` is the base class of
:class:`fusefs.cache.blocks.DiskBlockStore`, which adds storing, the size bound and upkeep.

Hit path: diskcache's ``get`` writes SQLite (the access time) on every call, a miss too, so
blocks are looked up with a plain select (``index.lookup``) and then read through a table of
open files (``os.pread``); the keys read are collected in ``_touched`` and their access times
written in one batch by the store (``index.touch``). A block evicted while its file is open is
noticed (``st_nlink == 0``) and treated as a miss, so eviction is never hidden. ``read_open``
and ``is_open`` never touch SQLite (fit for the event loop); the other methods may wait on
SQLite and belong in a worker thread.

Integrity: a block is stored with a trailer of per-64 KiB digests (``integrity``), checked
when it is opened (the trailer) and on every read from its file (the units read). A block that
fails, or whose file is missing, is a miss: it is dropped from the open table and deleted from
the index, logged, counted (``on_corrupt``), and the reader fetches it again.

Thread safety: every method may be called from any thread; ``_lock`` guards ``_open``,
``_touched``, ``_damaged``, ``_reported`` and each open entry's reference count. An open block
file is closed only once it has left ``_open`` and no reader holds it (a closed descriptor
number is soon reused for another file: a ``pread`` on it would serve another block's bytes).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

import diskcache

from . import index, integrity
from .keys import BlockKey, parse_cache_key

log = logging.getLogger(__name__)


class OpenBlock:
    """A block held open for repeat reads: a file (pread) or, for tiny blocks, its bytes.

    ``refs`` counts the readers using it; ``retired`` is set when it leaves the open table.
    Its file is closed only when both hold (no reader may ``pread`` a descriptor number that
    was closed and reused for another block). Both fields are guarded by the store's lock.
    """

    __slots__ = ("f", "data", "size", "digests", "refs", "retired", "damaged")

    def __init__(self, f: IO[bytes] | None, data: bytes | None, size: int,
                 digests: tuple[int, ...] = ()) -> None:
        self.f, self.data, self.size, self.digests = f, data, size, digests
        self.refs = 0
        self.retired = False
        self.damaged = False

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class OpenBlocks:
    """Reads of cached blocks through a bounded table of open files (LRU, at most
    ``max_open``), each read verified; damaged blocks are dropped and reported once."""

    def __init__(
        self,
        cache: diskcache.Cache,
        directory: str,
        *,
        max_open: int,
        on_corrupt: Callable[[], None] | None,
    ) -> None:
        self.directory = directory
        self._cache = cache
        self._lock = threading.Lock()
        self._open: OrderedDict[str, OpenBlock] = OrderedDict()
        self._touched: set[str] = set()
        self._max_open = max_open
        self._on_corrupt = on_corrupt
        # a broken index fails every call: one warning a minute, not thousands
        self._read_failures = Throttled()
        #: Keys found damaged by a read, to delete from the index (guarded by ``_lock``).
        self._damaged: set[str] = set()
        #: Keys reported damaged and not stored again since (guarded by ``_lock``).
        self._reported: set[str] = set()

    # --- reading ---------------------------------------------------------------------------

    def read_open(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        """``read`` of a block already open, else None; never touches SQLite (the hit path,
        fit for the event loop)."""
        ck = bkey.cache_key
        entry = self._acquire(ck)
        if entry is None:
            return None
        try:
            return self._read_entry(ck, entry, offset, size)
        finally:
            self._release(entry)

    def is_open(self, bkey: BlockKey) -> bool:
        """True if the block is open for reads (cheap: no SQLite)."""
        with self._lock:
            return bkey.cache_key in self._open

    def read(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        """Bytes ``[offset, offset+size)`` of a cached block (clipped to the block), or None.
        Opens the block if needed, which asks SQLite: call from a worker thread."""
        data = self.read_open(bkey, offset, size)
        if data is not None:
            return data
        ck = bkey.cache_key
        entry = self._load(ck)
        if entry is None:
            return None
        try:
            data = self._read_entry(ck, entry, offset, size)
        finally:
            self._release(entry)
        if data is None:
            self._delete_damaged()  # a worker thread: the index may be asked now
        return data

    def _acquire(self, ck: str) -> OpenBlock | None:
        """The open entry of ``ck`` with a reference taken for the caller, or None."""
        with self._lock:
            entry = self._open.get(ck)
            if entry is not None:
                self._open.move_to_end(ck)
                self._touched.add(ck)
                entry.refs += 1
            return entry

    def _release(self, entry: OpenBlock) -> None:
        with self._lock:
            entry.refs -= 1
            close = entry.refs == 0 and entry.retired
        if close:
            entry.close()

    def _retire_locked(self, ck: str, entry: OpenBlock | None = None) -> OpenBlock | None:
        """Take ``ck`` (only if it is ``entry``, when given) out of the open table; returns the
        entry if the caller must close it now (no reader holds it). Call with the lock held."""
        cur = self._open.get(ck)
        if cur is None or (entry is not None and cur is not entry):
            return None
        del self._open[ck]  # a pending access time stays: it was read (a gone key: no-op)
        cur.retired = True
        return cur if cur.refs == 0 else None

    def _read_entry(self, ck: str, entry: OpenBlock, offset: int, size: int) -> bytes | None:
        """Read from an entry the caller holds a reference on (so its file stays open); the
        units read are verified against their digests."""
        if entry.data is not None:  # verified whole when loaded
            return entry.data[offset : offset + size]
        assert entry.f is not None
        end = min(offset + size, entry.size)
        if offset >= end:
            return b""
        unit = integrity.UNIT
        first = offset // unit
        start, stop = first * unit, min(entry.size, ((end - 1) // unit + 1) * unit)
        try:
            fd = entry.f.fileno()
            if os.fstat(fd).st_nlink == 0:  # evicted (here or by another mount) since opened
                self._drop(ck, entry)
                return None
            buf = os.pread(fd, stop - start, start)
        except (OSError, ValueError):
            self._drop(ck, entry)
            return None
        try:
            if len(buf) != stop - start:
                raise integrity.Damaged("shorter than its trailer says")
            integrity.verify(buf, first, entry.digests)
        except integrity.Damaged as exc:
            self._damage(ck, str(exc), entry)
            return None
        return buf if (start, stop) == (offset, end) else buf[offset - start : end - start]

    def _damage(self, ck: str, why: str, entry: OpenBlock | None = None) -> None:
        """A block failed its checks: forget it (it is deleted from the index by the next call
        that may use SQLite), log and count it."""
        with self._lock:
            self._damaged.add(ck)
            # one report per damaged block, however many readers or loaders saw it at once
            first = ck not in self._reported and not (entry is not None and entry.damaged)
            self._reported.add(ck)
            if entry is not None:
                entry.damaged = True
        self._drop(ck, entry)
        if not first:
            return
        p = parse_cache_key(ck)
        what = f"{p[1]} block {p[4]} ({p[3]} bytes)" if p else ck
        log.warning("cached block of %s in %s is damaged (%s): dropped, it will be fetched "
                    "again", what, self.directory, why)
        if self._on_corrupt is not None:
            self._on_corrupt()

    def _delete_damaged(self) -> None:
        """Delete the index entries of blocks found damaged (SQLite: worker threads only)."""
        with self._lock:
            damaged, self._damaged = self._damaged, set()
        for ck in damaged:
            try:
                self._cache.delete(ck, retry=True)
            except Exception as exc:  # noqa: BLE001 - the next load finds it damaged again
                log.debug("could not delete damaged block %s: %s", ck, exc)

    def _load(self, ck: str) -> OpenBlock | None:
        """Open a block through the index (one select; the access joins the batch for the LRU
        order) and check its trailer; the entry is returned with a reference taken for the
        caller."""
        self._delete_damaged()
        try:
            indexed, handle = index.lookup(self._cache, ck)  # no write: access is batched
        except Exception as exc:  # a damaged entry is a miss, not an error
            self._read_failures.warning("block cache read failed, treating as miss: %s", exc)
            return None
        if handle is None:
            if indexed and self._indexed_without_file(ck):  # still (not evicted meanwhile)
                self._damage(ck, "its file is missing")
                self._delete_damaged()
            return None
        try:
            entry = self._open_entry(handle)
        except integrity.Damaged as exc:
            if hasattr(handle, "close"):
                handle.close()
            self._damage(ck, str(exc))
            self._delete_damaged()
            return None
        entry.refs = 1
        with self._lock:
            to_close = [self._retire_locked(ck)]
            self._open[ck] = entry
            self._touched.add(ck)  # its access time is written with the next batch
            while len(self._open) > self._max_open:
                to_close.append(self._retire_locked(next(iter(self._open))))
        for e in to_close:
            if e is not None:
                e.close()
        return entry

    def _indexed_without_file(self, ck: str) -> bool:
        """True if diskcache has ``ck`` but could not open its file (``get`` says None)."""
        try:
            return ck in self._cache
        except Exception:  # noqa: BLE001 - a broken index: nothing more to learn here
            return False

    @staticmethod
    def _open_entry(handle: Any) -> OpenBlock:
        """An open entry for what diskcache returned; raises Damaged if it fails its checks."""
        if isinstance(handle, bytes):  # kept inside SQLite
            data = integrity.decode(handle)
            return OpenBlock(None, data, len(data))
        fd = handle.fileno()
        stored = os.fstat(fd).st_size
        tail = os.pread(fd, integrity.FOOTER_SIZE, max(0, stored - integrity.FOOTER_SIZE))
        length = integrity.parse_footer(tail, stored)
        raw = os.pread(fd, stored - integrity.FOOTER_SIZE - length, length)
        digests = integrity.parse_digests(raw, tail, length)
        # start reading the whole block from disk now, asynchronously: the requests that
        # follow (1 MiB each) then find it in the page cache, not one at a time
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        return OpenBlock(handle, None, length, digests)

    def _drop(self, ck: str, entry: OpenBlock | None = None) -> None:
        with self._lock:
            victim = self._retire_locked(ck, entry)
        if victim is not None:
            victim.close()

    def warm(self, bkey: BlockKey) -> bool:
        """Open a cached block ahead of its reads so the kernel starts loading it from disk;
        False if it is not cached."""
        ck = bkey.cache_key
        with self._lock:
            if ck in self._open:
                return True
        return self._load(ck) is not None

    def contains(self, bkey: BlockKey) -> bool:
        ck = bkey.cache_key
        with self._lock:
            if ck in self._open:
                return True
        return ck in self._cache

    # --- closing ---------------------------------------------------------------------------

    def _close_matching(self, pred: Any) -> None:
        with self._lock:
            victims = [ck for ck in self._open if (p := parse_cache_key(ck)) and pred(p)]
            to_close = [self._retire_locked(ck) for ck in victims]
        for e in to_close:
            if e is not None:
                e.close()

    def _close_unlinked(self) -> None:
        """Close open blocks whose files were evicted (by any mount), so their disk space is
        freed now rather than when they next would be read."""
        with self._lock:
            gone = [ck for ck, e in self._open.items()
                    if e.f is not None and _unlinked(e.f)]
            to_close = [self._retire_locked(ck) for ck in gone]
        for e in to_close:
            if e is not None:
                e.close()


class Throttled:
    """A recurring warning, logged at most once per ``interval`` seconds with a count of the
    ones left out."""

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return
            self._next = now + self._interval
            skipped, self._skipped = self._skipped, 0
        if skipped:
            msg, args = msg + " (and %d more since the last such warning)", (*args, skipped)
        log.warning(msg, *args)


def _unlinked(f: IO[bytes]) -> bool:
    try:
        return os.fstat(f.fileno()).st_nlink == 0
    except (OSError, ValueError):
        return True
