"""The persistent, size-bounded block store on diskcache.

Each block is one diskcache item keyed by (source, object key, object version, block size,
block index): a changed object has a new version and so new keys, which is why no invalidation
protocol exists. Items are tagged with (source, object key) so one object's blocks can be dropped.

Eviction is diskcache's least-recently-used policy. Its ``get`` writes SQLite (the access time)
on every call, a miss too, so blocks are looked up with a plain select (``index.lookup``) and
then read through a table of open files (``os.pread``); the access times of blocks opened or
read are written in one batch every ``touch_interval`` seconds (``index.touch``). A block
evicted while its file is open is noticed (``st_nlink == 0``) and treated as a miss, so
eviction is never hidden.

SQLite stays off the hit path and off the event loop: ``read_open``, ``is_open``, ``volume``
and ``count`` never touch SQLite (the latter two return a snapshot of the index's figures), so
the event loop may call them; every other method may wait on SQLite (its busy timeout is 60 s)
and belongs in a worker thread. A maintenance thread refreshes the snapshot every second and
writes the batched access times.

Integrity: a block is stored with a trailer of per-64 KiB digests (``integrity``), checked
when it is opened (the trailer) and on every read from its file (the units read). A block that
fails, or whose file is missing, is a miss: it is dropped from the open table and deleted from
the index, logged, counted (``on_corrupt``), and the reader fetches it again. Cache keys carry
a format tag, so blocks of an older layout are never looked up (they age out by LRU).

Size bound: after every ``put`` the least recently used items are culled until the volume (item
bytes + SQLite pages, as diskcache counts it, shared by every store on the directory) is at or
under ``size_limit``, however many small items that takes (``index.cull``). The slack: blocks
being written at that moment (at most one per worker of each mount) and SQLite's write-ahead
log; disk usage also rounds each file up to the filesystem's block size. Files a killed process
wrote but never recorded are removed at the next start (``index.sweep_orphans``).

Privacy: the directory is created 0700, and every file and sub-directory fusefs or diskcache
creates in it is 0600/0700 whatever the umask (``directory``). An existing directory that group
or others may enter is used as it is, with one warning.

Thread safety: every method may be called from any thread; ``_lock`` guards ``_open``,
``_touched`` and each open entry's reference count. An open block file is closed only once it
has left ``_open`` and no reader holds it (a closed descriptor number is soon reused for another
file: a ``pread`` on it would serve another block's bytes).
diskcache itself is thread- and process-safe (two mounts may share a directory).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import IO, Any

import diskcache

from . import index, integrity
from .directory import PrivateDisk, open_index
from .keys import BlockKey, object_tag, parse_cache_key

log = logging.getLogger(__name__)


#: Blocks at least this large are files in the cache directory; smaller ones live in SQLite.
MIN_FILE_SIZE = 32 * 1024



class _Open:
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


class DiskBlockStore:
    """Blocks on disk under ``directory``, bounded by ``size_limit`` bytes, LRU eviction."""

    persistent = True

    def __init__(
        self,
        directory: str,
        size_limit: int,
        *,
        max_open: int = 256,
        touch_interval: float = 10.0,
        on_corrupt: Callable[[], None] | None = None,
        owner: bool = True,
    ) -> None:
        """``owner``: the mount's own store, which prepares and checks the directory (a broken
        cache is moved aside, an open mode warned about) and runs the maintenance thread
        (orphan sweep, usage snapshot, batched access times). A fetch worker process's store
        (``owner=False``) attaches to the directory its mount prepared and leaves all that
        to it."""
        self.directory = directory
        self.size_limit = size_limit

        def open_cache() -> diskcache.Cache:
            return diskcache.Cache(
                directory,
                size_limit=size_limit,
                eviction_policy="least-recently-used",
                cull_limit=0,  # diskcache's cull in ``set`` stops after N items: ``put`` culls
                tag_index=True,
                statistics=False,
                disk_min_file_size=MIN_FILE_SIZE,
                disk=PrivateDisk,
            )

        self._cache = open_index(directory, open_cache) if owner else open_cache()
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._touched: set[str] = set()
        self._max_open = max_open
        self._touch_interval = touch_interval
        self._last_touch = time.monotonic()
        self._on_corrupt = on_corrupt
        # a broken index or a full disk fails every call: one warning a minute, not thousands
        self._read_failures = _Throttled()
        self._write_failures = _Throttled()
        #: Keys found damaged by a read, to delete from the index (guarded by ``_lock``).
        self._damaged: set[str] = set()
        #: Keys reported damaged and not stored again since (guarded by ``_lock``).
        self._reported: set[str] = set()
        self.puts = 0
        self._usage = (0, 0)  # (volume, count) as last read from the index
        self.refresh_usage()
        self._count_at_start = self.count()
        self._stop = threading.Event()
        self._maintenance = threading.Thread(
            target=self._maintain, name="fusefs-cache", daemon=True)
        if owner:
            self._maintenance.start()

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

    def _acquire(self, ck: str) -> _Open | None:
        """The open entry of ``ck`` with a reference taken for the caller, or None."""
        with self._lock:
            entry = self._open.get(ck)
            if entry is not None:
                self._open.move_to_end(ck)
                self._touched.add(ck)
                entry.refs += 1
            return entry

    def _release(self, entry: _Open) -> None:
        with self._lock:
            entry.refs -= 1
            close = entry.refs == 0 and entry.retired
        if close:
            entry.close()

    def _retire_locked(self, ck: str, entry: _Open | None = None) -> _Open | None:
        """Take ``ck`` (only if it is ``entry``, when given) out of the open table; returns the
        entry if the caller must close it now (no reader holds it). Call with the lock held."""
        cur = self._open.get(ck)
        if cur is None or (entry is not None and cur is not entry):
            return None
        del self._open[ck]  # a pending access time stays: it was read (a gone key: no-op)
        cur.retired = True
        return cur if cur.refs == 0 else None

    def _read_entry(self, ck: str, entry: _Open, offset: int, size: int) -> bytes | None:
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

    def _damage(self, ck: str, why: str, entry: _Open | None = None) -> None:
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

    def _load(self, ck: str) -> _Open | None:
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
    def _open_entry(handle: Any) -> _Open:
        """An open entry for what diskcache returned; raises Damaged if it fails its checks."""
        if isinstance(handle, bytes):  # kept inside SQLite
            data = integrity.decode(handle)
            return _Open(None, data, len(data))
        fd = handle.fileno()
        stored = os.fstat(fd).st_size
        tail = os.pread(fd, integrity.FOOTER_SIZE, max(0, stored - integrity.FOOTER_SIZE))
        length = integrity.parse_footer(tail, stored)
        raw = os.pread(fd, stored - integrity.FOOTER_SIZE - length, length)
        digests = integrity.parse_digests(raw, tail, length)
        # start reading the whole block from disk now, asynchronously: the requests that
        # follow (1 MiB each) then find it in the page cache, not one at a time
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        return _Open(handle, None, length, digests)

    def _drop(self, ck: str, entry: _Open | None = None) -> None:
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

    # --- writing ---------------------------------------------------------------------------

    def put(self, bkey: BlockKey, data: bytes) -> bool:
        """Store a block; True if stored. Failures (disk full...) are logged and the block
        simply not cached."""
        try:
            trailer = integrity.trailer(data)
            if len(data) >= MIN_FILE_SIZE:
                # diskcache writes a bytes value by iterating it as lines (tens of thousands of
                # Python-level writes for binary data); a file object is copied in chunks
                self._cache.set(bkey.cache_key, _Chunks(data, trailer), read=True,
                                tag=bkey.tag, retry=True)
            else:  # small blocks live inside SQLite
                self._cache.set(bkey.cache_key, bytes(data) + trailer, tag=bkey.tag,
                                retry=True)
            with self._lock:
                self._damaged.discard(bkey.cache_key)  # replaced by the set
                self._reported.discard(bkey.cache_key)
            self.puts += 1
            self._cull()
            return True
        except Exception as exc:
            self._write_failures.warning("could not store block in cache %s: %s",
                                         self.directory, exc)
            return False

    def stored_elsewhere(self, volume: int, items: int) -> None:
        """Count a block a fetch worker process of this mount stored (for ``evictions``), and
        take the index's figures it read just after (``volume``/``count`` then follow the
        worker's puts at once, as they follow this store's own; no SQLite here)."""
        with self._lock:
            self.puts += 1
        self._usage = (volume, items)

    def refresh_usage(self) -> int:
        """Read the volume and item count from the index into the snapshot; returns the
        volume."""
        volume = int(self._cache.volume())
        self._usage = (volume, int(self._cache.__len__()))
        return volume

    def _maintain(self) -> None:
        """Maintenance thread: remove orphaned block files once, then refresh the usage
        snapshot and write batched access times every second."""
        try:
            self.sweep_orphans()
        except Exception as exc:  # noqa: BLE001 - the files simply stay
            log.debug("cache orphan sweep failed: %s", exc)
        while not self._stop.wait(1.0):
            try:
                self.refresh_usage()
                self.maybe_touch()
            except Exception as exc:  # noqa: BLE001 - bookkeeping: the next round retries
                log.debug("cache maintenance failed: %s", exc)
        self._cache.close()  # this thread's SQLite connection (diskcache's are per thread)

    def sweep_orphans(self, min_age: float = index.ORPHAN_AGE) -> int:
        """Delete block files the index does not list, older than ``min_age`` seconds (see
        :func:`index.sweep_orphans`); returns files removed."""
        removed, freed = index.sweep_orphans(self._cache, self.directory, min_age)
        if removed:
            log.info("cache %s: removed %d orphaned block files (%d bytes)", self.directory,
                     removed, freed)
        return removed

    def _cull(self) -> int:
        """Evict least recently used items until the volume is within the bound (see
        :func:`index.cull`); returns how many were evicted."""
        removed = index.cull(self._cache, self.refresh_usage() - self.size_limit)
        if removed:
            self._close_unlinked()
            self.refresh_usage()
        return removed

    def maybe_touch(self) -> None:
        """Refresh access times of blocks read from open files (call from a worker thread)."""
        if time.monotonic() - self._last_touch < self._touch_interval:
            return
        self.flush()

    def flush(self) -> None:
        """Write the access times of blocks read from open files now (the LRU order), and close
        open files that were evicted meanwhile."""
        self._last_touch = time.monotonic()
        with self._lock:
            touched, self._touched = self._touched, set()
        if touched:
            try:
                index.touch(self._cache, touched)
            except Exception:  # noqa: BLE001 - best effort bookkeeping
                pass
        self._delete_damaged()
        self._close_unlinked()

    # --- management ------------------------------------------------------------------------

    def evict_object(self, source: str, key: str) -> int:
        """Drop every cached block of one object (all versions); returns blocks removed."""
        tag = object_tag(source, key)
        self._close_matching(lambda p: p[0] == source and p[1] == key)
        removed = int(self._cache.evict(tag, retry=True))
        self.refresh_usage()
        return removed

    def evict_matching(self, source: str, prefix: str) -> int:
        """Drop the blocks of all objects of ``source`` whose key starts with ``prefix``."""
        removed = 0
        for ck in list(self.iter_keys()):
            p = parse_cache_key(ck)
            if p and p[0] == source and p[1].startswith(prefix):
                self._drop(ck)
                if self._cache.delete(ck, retry=True):
                    removed += 1
        self.refresh_usage()
        return removed

    def clear(self) -> int:
        """Drop every item of the directory (of all mounts sharing it)."""
        with self._lock:
            to_close = [self._retire_locked(ck) for ck in list(self._open)]
        for e in to_close:
            if e is not None:
                e.close()
        removed = int(self._cache.clear(retry=True))
        self.refresh_usage()
        return removed

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

    def iter_keys(self) -> Iterator[str]:
        for k in self._cache.iterkeys():
            if isinstance(k, str):
                yield k

    def volume(self) -> int:
        """Bytes the directory holds (all mounts sharing it), as last read from the index."""
        return self._usage[0]

    def count(self) -> int:
        """Items the directory holds, as last read from the index."""
        return self._usage[1]

    def evictions(self) -> int:
        """Blocks this process stored that are no longer counted (estimate when shared)."""
        return max(0, self._count_at_start + self.puts - self.count())

    def close(self) -> None:
        """Stop the maintenance thread, flush the bookkeeping, close the open blocks and the
        cache (at unmount)."""
        self._stop.set()
        if self._maintenance.is_alive():
            self._maintenance.join(timeout=5)
        self.flush()
        with self._lock:
            to_close = [self._retire_locked(ck) for ck in list(self._open)]
        for e in to_close:
            if e is not None:
                e.close()
        self._cache.close()


class _Throttled:
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


class _Chunks:
    """A file-like ``read`` over the data and then its trailer, without joining them."""

    def __init__(self, data: bytes, trailer: bytes) -> None:
        self._parts = [memoryview(data), memoryview(trailer)]

    def read(self, n: int) -> bytes | memoryview:
        while self._parts and not self._parts[0]:
            self._parts.pop(0)
        if not self._parts:
            return b""
        head = self._parts[0]
        self._parts[0] = head[n:]
        return head[:n]


def _unlinked(f: IO[bytes]) -> bool:
    try:
        return os.fstat(f.fileno()).st_nlink == 0
    except (OSError, ValueError):
        return True


class NullBlockStore:
    """The disk cache disabled (cache size 0 or -1): every read goes to the store."""

    persistent = False

    directory = ""
    size_limit = 0
    puts = 0

    def read(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        return None

    def read_open(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        return None

    def is_open(self, bkey: BlockKey) -> bool:
        return False

    def refresh_usage(self) -> int:
        return 0

    def contains(self, bkey: BlockKey) -> bool:
        return False

    def warm(self, bkey: BlockKey) -> bool:
        return False

    def put(self, bkey: BlockKey, data: bytes) -> bool:
        return False

    def stored_elsewhere(self, volume: int, items: int) -> None:
        return None

    def maybe_touch(self) -> None:
        return None

    def flush(self) -> None:
        return None

    def evict_object(self, source: str, key: str) -> int:
        return 0

    def evict_matching(self, source: str, prefix: str) -> int:
        return 0

    def clear(self) -> int:
        return 0

    def iter_keys(self) -> Iterator[str]:
        return iter(())

    def volume(self) -> int:
        return 0

    def count(self) -> int:
        return 0

    def evictions(self) -> int:
        return 0

    def close(self) -> None:
        return None


BlockStore = DiskBlockStore | NullBlockStore
