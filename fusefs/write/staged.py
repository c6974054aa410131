"""Staged files: the local copy of a file being written (:class:`StagedFile`), and the index
of a mount's staged files by key and folder (:class:`StagedIndex`). The staging directory that
holds them is :mod:`.staging`.

A staged file's bytes: position ``p < size`` is in the local data file if ``p`` is in ``dirty``
or ``p >= base_limit``, else it is byte ``p`` of the base object (never fetched unless read or
needed by an upload that cannot copy it server-side). ``base_limit`` only shrinks (truncation);
the data file is truncated along with the file, so bytes past ``base_limit`` never written are
zeros (a sparse hole). ``gen`` counts changes; ``uploaded_gen`` is the last one in the store.

Concurrency: the trio thread changes staged files (``pwrite``/``ftruncate`` run inline: page
cache writes, no SQLite). An upload reading a staged file sets ``busy``; changes wait for it.

Ownership: a staged file is one file's state (the kernel's inode, whatever its name now); its
data file (descriptor and path) lives until it is removed AND no worker holds it
(:meth:`StagedFile.hold`): unlink, rename and the end of an upload never close what another
task is reading. The index counts every folder above a staged file (``has_under`` answers
without a scan).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
import time

import trio

from ..backends.base import ObjectInfo
from ..errors import FileTooBig, FusefsError, NoSpace
from . import ranges
from .journal import Record


def os_error(exc: OSError, what: str) -> FusefsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: the staging area (cache disk) is full")
    if exc.errno == errno.EFBIG:
        return FileTooBig(f"{what}: bigger than a file may be")
    return FusefsError(f"{what}: {exc.strerror}", cause=exc)


class StagedFile:
    """One file being written or waiting for its upload (see the module docstring)."""

    def __init__(self, rec: Record, path: str, fd: int) -> None:
        self.rec = rec
        self.path = path
        self.fd = fd
        self.gen = 0
        self.uploaded_gen = 0
        self.synced_gen = 0  # journaled up to this change
        self.durable_gen = 0  # data synced to disk (fdatasync) and journaled up to this change
        self.writers = 0  # open write handles
        self.handles = 0  # open handles of any kind
        self.busy: trio.Event | None = None  # an upload is reading the data file
        #: operations working on it across awaits (``Writes.held``): no upload starts meanwhile
        self.pins = 0
        self.unpinned = trio.Event()
        self.changed = trio.Event()  # set (and replaced) whenever the upload state changes
        self.queued = False  # an upload task owns this file
        self.retiring = False  # leaving the staging area (``Writes._retire``)
        #: the version whose bytes the worker that uploaded it put into the block cache
        self.seeded = ""
        self.unlinked = False
        self.failed_logged = False
        self.nudge = trio.Event()  # wakes a failed file's task (``sync`` retries it)
        self.failed_gen = -1  # the change whose last upload attempt failed
        self.attempts = 0  # upload attempts finished (either way)
        #: upload even while write handles are open (fsync, flush); else wait for the last
        self.flush_requested = False
        self.token_gen = -1  # the change ``rec.token`` was made for
        self.changing = False  # journaled as being changed (state open) since the last close
        self.conflict_gen = -1  # the last change that went to a conflict name
        #: when the store was last known to hold its upload under its name (None: never)
        self.confirmed: float | None = None
        self._users = 0  # workers using the data file (``hold``)
        self._removed = False
        self._lock = threading.Lock()

    # --- the data file's lifetime (any thread) --------------------------------------------

    @property
    def removed(self) -> bool:
        """Its data file is gone (or going): nothing of it can be read or uploaded."""
        return self._removed

    def hold(self) -> bool:
        """Keep the data file open for a worker (``unhold`` after); False if it is gone."""
        with self._lock:
            if self._removed or self.fd < 0:
                return False
            self._users += 1
            return True

    def unhold(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0 and self._removed
        if last:
            self._discard()

    def remove_data(self) -> None:
        """The data file goes: now, or when the last worker holding it lets go."""
        with self._lock:
            self._removed = True
            now = self._users == 0
        if now:
            self._discard()

    def _discard(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:  # never twice: the number may already be another file's
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @property
    def key(self) -> str:
        return self.rec.key

    @property
    def size(self) -> int:
        return self.rec.size

    @property
    def needs_upload(self) -> bool:
        return self.gen != self.uploaded_gen and not self.unlinked

    def signal(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def idle(self) -> None:
        """Wait until no upload is reading the data file."""
        while self.busy is not None:
            await self.busy.wait()

    def pin(self) -> None:
        self.pins += 1

    def unpin(self) -> None:
        self.pins -= 1
        if self.pins == 0:
            self.unpinned.set()
            self.unpinned = trio.Event()

    async def ready_to_upload(self) -> None:
        """Wait until no upload reads it and no operation holds it (a rename that rekeys and
        rebases it must not meet an upload ending under the old name and base)."""
        while self.busy is not None or self.pins:
            if self.busy is not None:
                await self.busy.wait()
            else:
                await self.unpinned.wait()

    # --- content (trio thread) -----------------------------------------------------------

    def segments(self, offset: int, size: int) -> list[tuple[bool, int, int]]:
        """``[offset, offset+size)`` within the file as (local, start, end) pieces in order."""
        end = min(offset + size, self.rec.size)
        if offset >= end:
            return []
        limit = self.rec.base_limit if self.rec.base_key else 0
        out: list[tuple[bool, int, int]] = []
        if offset < limit:
            pos = offset
            stop = min(end, limit)
            for a, b in ranges.gaps(self.rec.dirty, offset, stop):
                if a > pos:
                    out.append((True, pos, a))
                out.append((False, a, b))
                pos = b
            if pos < stop:
                out.append((True, pos, stop))
            offset = stop
        if offset < end:
            out.append((True, offset, end))
        return out

    def read_local(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as exc:
            raise os_error(exc, self.key) from None

    def write(self, offset: int, data: bytes) -> int:
        try:
            n = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise os_error(exc, self.key) from None
        rec = self.rec
        rec.size = max(rec.size, offset + n)
        if rec.base_key and offset < rec.base_limit:
            rec.dirty = ranges.add(rec.dirty, offset, min(offset + n, rec.base_limit))
        self.touch()
        return n

    def fill(self, offset: int, data: bytes) -> None:
        """Put bytes of the base into the data file (they become local; not a change)."""
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise os_error(exc, self.key) from None
        rec = self.rec
        end = min(offset + len(data), rec.base_limit)
        if end > offset:
            rec.dirty = ranges.add(rec.dirty, offset, end)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise os_error(exc, self.key) from None
        rec = self.rec
        if size < rec.base_limit:
            rec.base_limit = size
            rec.dirty = ranges.clip(rec.dirty, size)
        rec.size = size
        self.touch()

    def touch(self, mtime: float | None = None) -> None:
        self.rec.mtime = time.time() if mtime is None else mtime
        self.gen += 1

    def base_info(self) -> ObjectInfo:
        """The base object (reads of unchanged ranges go through the block cache)."""
        rec = self.rec
        return ObjectInfo(rec.base_key, rec.base_size, rec.base_mtime, rec.base_version)

    def copy_ranges(self) -> tuple[tuple[int, int], ...]:
        """Ranges of the base object kept as they are (not in the data file)."""
        if not self.rec.base_key:
            return ()
        return tuple(ranges.gaps(self.rec.dirty, 0, min(self.rec.base_limit, self.rec.size)))

    def uploaded(self, info: ObjectInfo, gen: int) -> None:
        """The store now holds change ``gen`` (the current one: changes wait while an upload
        reads) as ``info``: it becomes the base; the data file keeps what it holds."""
        self.uploaded_gen = gen
        rec = self.rec
        local = (ranges.add(list(rec.dirty), rec.base_limit, rec.size) if rec.base_key
                 else ([(0, rec.size)] if rec.size else []))
        rec.base_key, rec.base_version = info.key, info.version
        rec.base_size, rec.base_mtime = info.size, info.mtime
        rec.base_limit = rec.size
        rec.dirty = ranges.clip(local, rec.size)
        rec.expect = info.version
        rec.state = "done"


class StagedIndex(dict[str, StagedFile]):
    """Staged files by key, with how many are under each folder and which keys sit directly in
    each: a lookup or a folder listing asks in O(1), not by scanning every staged file."""

    def __init__(self) -> None:
        super().__init__()
        self.below: collections.Counter[str] = collections.Counter()
        self.children: dict[str, set[str]] = collections.defaultdict(set)

    @staticmethod
    def _folders(key: str) -> list[str]:
        parts = key.split("/")[:-1]
        return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]

    def __setitem__(self, key: str, sf: StagedFile) -> None:
        if key not in self:
            for f in self._folders(key):
                self.below[f] += 1
            self.children[key.rpartition("/")[0]].add(key)
        super().__setitem__(key, sf)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        for f in self._folders(key):
            self.below[f] -= 1
            if not self.below[f]:
                del self.below[f]
        parent = key.rpartition("/")[0]
        self.children[parent].discard(key)
        if not self.children[parent]:
            del self.children[parent]

    def has_under(self, folder: str) -> bool:
        """Is any file staged below folder ``folder`` (a path, "" for the root)?"""
        return self.below.get(folder, 0) > 0

    def in_folder(self, folder: str) -> tuple[list[StagedFile], set[str]]:
        """Staged files directly in ``folder``, and names of its sub-folders holding some."""
        files = [self[k] for k in self.children.get(folder, ())]
        n = len(folder) + 1 if folder else 0
        subs = {f[n:].split("/", 1)[0] for f in self.below
                if f and f.rpartition("/")[0] == folder} if len(self) > len(files) else set()
        return files, subs
