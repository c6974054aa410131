"""The persistent, size-bounded block store on diskcache.

Each block is one diskcache item keyed by (source, object key, object version, block size,
block index): a changed object has a new version and so new keys, which is why no invalidation
protocol exists. Items are tagged with (source, object key) so one object's blocks can be dropped.

Eviction is diskcache's least-recently-used policy. Its ``get`` writes SQLite (the access time)
on every call, so repeat reads of a block go through a small table of open files instead
(``os.pread``, no SQLite), and the access times of blocks read that way are refreshed in a batch
every ``touch_interval`` seconds. A block evicted while its file is open is noticed
(``st_nlink == 0``) and treated as a miss, so eviction is never hidden.

Size bound: after every ``put`` the least recently used items are culled until the volume (item
bytes + SQLite pages, as diskcache counts it, shared by every store on the directory) is at or
under ``size_limit``, however many small items that takes. The slack: blocks being written at
that moment (at most one per worker of each mount) and SQLite's write-ahead log; disk usage also
rounds each file up to the filesystem's block size.

Privacy: the directory is created 0700, and every file and sub-directory fusefs or diskcache
creates in it is 0600/0700 whatever the umask (``_PrivateDisk``; the SQLite files are created
before diskcache opens them, and SQLite gives its -wal/-shm files the database's mode). An existing
directory that group or others may enter is used as it is, with one warning.

Thread safety: every method may be called from any thread; ``_lock`` guards ``_open``,
``_touched`` and each open entry's reference count. An open block file is closed only once it
has left ``_open`` and no reader holds it (a closed descriptor number is soon reused for another
file: a ``pread`` on it would serve another block's bytes).
diskcache itself is thread- and process-safe (two mounts may share a directory).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import diskcache

log = logging.getLogger(__name__)

#: Directories already warned about (one warning per directory and process).
_warned_open_dirs: set[str] = set()

#: Blocks at least this large are files in the cache directory; smaller ones live in SQLite.
MIN_FILE_SIZE = 32 * 1024

#: Least recently used items first (diskcache's schema; its LRU policy indexes access_time).
_SELECT_LRU = "SELECT rowid, filename, size FROM Cache ORDER BY access_time LIMIT ?"


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Identity of one cached block; ``cache_key`` is what diskcache stores."""

    source: str
    key: str
    version: str
    block_size: int
    index: int
    #: Computed once: every read looks a block up by it, often more than once.
    cache_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_key", json.dumps(
            [self.source, self.key, self.version, self.block_size, self.index]))

    @property
    def tag(self) -> str:
        return object_tag(self.source, self.key)


def object_tag(source: str, key: str) -> str:
    return json.dumps([source, key])


def parse_cache_key(cache_key: str) -> tuple[str, str, str, int, int] | None:
    try:
        s, k, v, bs, i = json.loads(cache_key)
        return str(s), str(k), str(v), int(bs), int(i)
    except (ValueError, TypeError):
        return None


class _Open:
    """A block held open for repeat reads: a file (pread) or, for tiny blocks, its bytes.

    ``refs`` counts the readers using it; ``retired`` is set when it leaves the open table.
    Its file is closed only when both hold (no reader may ``pread`` a descriptor number that
    was closed and reused for another block). Both fields are guarded by the store's lock.
    """

    __slots__ = ("f", "data", "size", "refs", "retired")

    def __init__(self, f: IO[bytes] | None, data: bytes | None, size: int) -> None:
        self.f, self.data, self.size = f, data, size
        self.refs = 0
        self.retired = False

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class _PrivateDisk(diskcache.Disk):
    """diskcache's Disk, writing its value files 0600 in sub-directories 0700 (diskcache's own
    uses ``open``/``makedirs`` and so the process umask, which a thread cannot change safely)."""

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int:
        if "b" not in mode:  # fusefs stores bytes only; keep diskcache's path for anything else
            return int(super()._write(full_path, iterator, mode, encoding))
        full_dir = os.path.dirname(full_path)
        for attempt in range(10):
            _make_private_dirs(self._directory, full_dir)
            try:  # O_EXCL: another cache may have removed the directory meanwhile; retry
                fd = os.open(full_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError:
                if attempt == 9:
                    raise
                continue
            size = 0
            with open(fd, "wb") as writer:
                for chunk in iterator:
                    size += len(chunk)
                    writer.write(chunk)
            return size
        raise AssertionError("unreachable")


def _make_private_dirs(top: str, path: str) -> None:
    """Create ``path`` (below ``top``) and its missing parents, each 0700."""
    rel = os.path.relpath(path, top)
    cur = top
    for part in rel.split(os.sep):
        if part in ("", "."):
            continue
        cur = os.path.join(cur, part)
        try:
            os.mkdir(cur, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(cur, 0o700)  # mkdir's mode is filtered by the umask


def prepare_directory(directory: str) -> None:
    """Create the cache directory 0700 (parents as the umask says), or warn once if an existing
    one is open to group or others; pre-create SQLite's database file 0600."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        mode = os.stat(directory).st_mode & 0o777
        if mode & 0o077 and directory not in _warned_open_dirs:
            _warned_open_dirs.add(directory)
            log.warning(
                "cache directory %s has mode %04o: other local users may read cached data "
                "(chmod 700 it)", directory, mode,
            )
    except FileNotFoundError:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        return prepare_directory(directory)
    else:
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    db = os.path.join(directory, "cache.db")
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass


class DiskBlockStore:
    """Blocks on disk under ``directory``, bounded by ``size_limit`` bytes, LRU eviction."""

    def __init__(
        self,
        directory: str,
        size_limit: int,
        *,
        max_open: int = 256,
        touch_interval: float = 10.0,
    ) -> None:
        prepare_directory(directory)
        self.directory = directory
        self.size_limit = size_limit
        self._cache = diskcache.Cache(
            directory,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            cull_limit=0,  # diskcache's cull in ``set`` stops after N items: ``put`` culls
            tag_index=True,
            statistics=False,
            disk_min_file_size=MIN_FILE_SIZE,
            disk=_PrivateDisk,
        )
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._touched: set[str] = set()
        self._max_open = max_open
        self._touch_interval = touch_interval
        self._last_touch = time.monotonic()
        self.puts = 0
        self._count_at_start = self.count()

    # --- reading ---------------------------------------------------------------------------

    def read(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        """Bytes ``[offset, offset+size)`` of a cached block (clipped to the block), or None."""
        ck = bkey.cache_key
        entry = self._acquire(ck)
        if entry is not None:
            try:
                data = self._read_entry(ck, entry, offset, size)
            finally:
                self._release(entry)
            if data is not None:
                return data
        entry = self._load(ck)
        if entry is None:
            return None
        try:
            return self._read_entry(ck, entry, offset, size)
        finally:
            self._release(entry)

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
        del self._open[ck]
        self._touched.discard(ck)
        cur.retired = True
        return cur if cur.refs == 0 else None

    def _read_entry(self, ck: str, entry: _Open, offset: int, size: int) -> bytes | None:
        """Read from an entry the caller holds a reference on (so its file stays open)."""
        if entry.data is not None:
            return entry.data[offset : offset + size]
        assert entry.f is not None
        try:
            fd = entry.f.fileno()
            if os.fstat(fd).st_nlink == 0:  # evicted (here or by another mount) since opened
                self._drop(ck, entry)
                return None
            return os.pread(fd, max(0, min(size, entry.size - offset)), offset)
        except (OSError, ValueError):
            self._drop(ck, entry)
            return None

    def _load(self, ck: str) -> _Open | None:
        """Open a block through diskcache (this records the access for LRU); the entry is
        returned with a reference taken for the caller."""
        try:
            handle: Any = self._cache.get(ck, default=None, read=True)
        except Exception as exc:  # a damaged entry is a miss, not an error
            log.warning("block cache read failed, treating as miss: %s", exc)
            return None
        if handle is None:
            return None
        if hasattr(handle, "fileno") and not isinstance(handle, bytes):
            try:
                fd = handle.fileno()
                size = os.fstat(fd).st_size
                # start reading the whole block from disk now, asynchronously: the requests
                # that follow (1 MiB each) then find it in the page cache, not one at a time
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                entry = _Open(handle, None, size)
            except (OSError, ValueError):  # io.BytesIO for values kept inside SQLite
                data = handle.read()
                entry = _Open(None, data, len(data))
        else:
            entry = _Open(None, bytes(handle), len(handle))
        entry.refs = 1
        with self._lock:
            to_close = [self._retire_locked(ck)]
            self._open[ck] = entry
            while len(self._open) > self._max_open:
                to_close.append(self._retire_locked(next(iter(self._open))))
        for e in to_close:
            if e is not None:
                e.close()
        return entry

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

    def put(self, bkey: BlockKey, data: bytes) -> None:
        """Store a block; failures (disk full...) are logged and the block simply not cached."""
        try:
            if len(data) >= MIN_FILE_SIZE:
                # diskcache writes a bytes value by iterating it as lines (tens of thousands of
                # Python-level writes for binary data); a file object is copied in 4 MiB chunks
                self._cache.set(bkey.cache_key, io.BytesIO(data), read=True, tag=bkey.tag,
                                retry=True)
            else:  # small blocks live inside SQLite
                self._cache.set(bkey.cache_key, data, tag=bkey.tag, retry=True)
            self.puts += 1
            self._cull()
        except Exception as exc:
            log.warning("could not store block in cache %s: %s", self.directory, exc)

    def _cull(self) -> int:
        """Evict least recently used items until the volume is within the bound; returns how
        many were evicted.

        diskcache's own culling cannot do this: ``set`` removes a fixed number of items however
        small they are, and ``cull()`` removes batches of ten, which can take the block just
        stored with them. Here items are taken in LRU order until their bytes cover the excess
        (through diskcache's transaction, so its triggers keep the size and count and the files
        are removed after the commit).
        """
        excess = self._cache.volume() - self.size_limit
        removed = 0
        while excess > 0:
            with self._cache._transact(retry=True) as (sql, cleanup):
                rows = sql(_SELECT_LRU, (64,)).fetchall()
                chosen = []
                for rowid, filename, size in rows:
                    chosen.append(rowid)
                    cleanup(filename)
                    excess -= size or 0
                    if excess <= 0:
                        break
                if chosen:
                    marks = ",".join("?" * len(chosen))
                    sql(f"DELETE FROM Cache WHERE rowid IN ({marks})", chosen)
            if not rows:
                break
            removed += len(chosen)
        if removed:
            self._close_unlinked()
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
        for ck in touched:
            try:
                handle = self._cache.get(ck, default=None, read=True)
                if handle is not None and hasattr(handle, "close"):
                    handle.close()
            except Exception:  # noqa: BLE001 - best effort bookkeeping
                pass
        self._close_unlinked()

    # --- management ------------------------------------------------------------------------

    def evict_object(self, source: str, key: str) -> int:
        """Drop every cached block of one object (all versions); returns blocks removed."""
        tag = object_tag(source, key)
        self._close_matching(lambda p: p[0] == source and p[1] == key)
        return int(self._cache.evict(tag, retry=True))

    def evict_matching(self, source: str, prefix: str) -> int:
        """Drop the blocks of all objects of ``source`` whose key starts with ``prefix``."""
        removed = 0
        for ck in list(self.iter_keys()):
            p = parse_cache_key(ck)
            if p and p[0] == source and p[1].startswith(prefix):
                self._drop(ck)
                if self._cache.delete(ck, retry=True):
                    removed += 1
        return removed

    def clear(self) -> int:
        self._close_matching(lambda p: True)
        return int(self._cache.clear(retry=True))

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
        return int(self._cache.volume())

    def count(self) -> int:
        return int(self._cache.__len__())

    def evictions(self) -> int:
        """Blocks this process stored that are no longer counted (estimate when shared)."""
        return max(0, self._count_at_start + self.puts - self.count())

    def close(self) -> None:
        """Flush the bookkeeping, close the open blocks and the cache (at unmount)."""
        self.flush()
        self._close_matching(lambda p: True)
        with self._lock:
            to_close = [self._retire_locked(ck) for ck in list(self._open)]
        for e in to_close:
            if e is not None:
                e.close()
        self._cache.close()


def _unlinked(f: IO[bytes]) -> bool:
    try:
        return os.fstat(f.fileno()).st_nlink == 0
    except (OSError, ValueError):
        return True


class NullBlockStore:
    """The disk cache disabled (cache size 0 or -1): every read goes to the store."""

    directory = ""
    size_limit = 0
    puts = 0

    def read(self, bkey: BlockKey, offset: int, size: int) -> bytes | None:
        return None

    def contains(self, bkey: BlockKey) -> bool:
        return False

    def warm(self, bkey: BlockKey) -> bool:
        return False

    def put(self, bkey: BlockKey, data: bytes) -> None:
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
