"""The persistent, size-bounded block store on diskcache.

Each block is one diskcache item keyed by (source, object key, object version, block size,
block index): a changed object has a new version and so new keys, which is why no invalidation
protocol exists. Items are tagged with (source, object key) so one object's blocks can be dropped.
Cache keys carry a format tag, so blocks of an older layout are never looked up (they age out
by LRU).

Reading (the open-file table, integrity checks, damaged blocks) is in ``open_blocks``, the base
class of :class:`DiskBlockStore`; this module stores blocks and keeps the directory in bounds.

Eviction is diskcache's least-recently-used policy; the access times of blocks opened or read
are written in one batch every ``touch_interval`` seconds (``index.touch``). SQLite stays off
the hit path and off the event loop: ``read_open``, ``is_open``, ``volume`` and ``count`` never
touch SQLite (the latter two return a snapshot of the index's figures), so the event loop may
call them; every other method may wait on SQLite (its busy timeout is 60 s) and belongs in a
worker thread. A maintenance thread refreshes the snapshot every second and writes the batched
access times.

Size bound: after every ``put`` the least recently used items are culled until the volume (item
bytes + SQLite pages, as diskcache counts it, shared by every store on the directory) is at or
under ``size_limit``, however many small items that takes (``index.cull``). The slack: blocks
being written at that moment (at most one per worker of each mount) and SQLite's write-ahead
log; disk usage also rounds each file up to the filesystem's block size. Files a killed process
wrote but never recorded are removed at the next start (``index.sweep_orphans``).

Privacy: the directory is created 0700, and every file and sub-directory fusefs or diskcache
creates in it is 0600/0700 whatever the umask (``directory``). An existing directory that group
or others may enter is used as it is, with one warning.

Thread safety: every method may be called from any thread (see ``open_blocks`` for what
``_lock`` guards). diskcache itself is thread- and process-safe (two mounts may share a
directory).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import diskcache

from . import index, integrity
from .directory import PrivateDisk, open_index
from .keys import BlockKey, object_tag, parse_cache_key
from .open_blocks import OpenBlocks, Throttled

log = logging.getLogger(__name__)


#: Blocks at least this large are files in the cache directory; smaller ones live in SQLite.
MIN_FILE_SIZE = 32 * 1024


class DiskBlockStore(OpenBlocks):
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

        cache = open_index(directory, open_cache) if owner else open_cache()
        super().__init__(cache, directory, max_open=max_open, on_corrupt=on_corrupt)
        self._touch_interval = touch_interval
        self._last_touch = time.monotonic()
        # a full disk fails every put: one warning a minute, not thousands
        self._write_failures = Throttled()
        self.puts = 0
        self._usage = (0, 0)  # (volume, count) as last read from the index
        self.refresh_usage()
        self._count_at_start = self.count()
        self._stop = threading.Event()
        self._maintenance = threading.Thread(
            target=self._maintain, name="fusefs-cache", daemon=True)
        if owner:
            self._maintenance.start()


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
