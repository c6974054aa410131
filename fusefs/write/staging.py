"""Staged files: the local copy of a file being written, and the staging directory.

A staged file's bytes: position ``p < size`` is in the local data file if ``p`` is in ``dirty``
or ``p >= base_limit``, else it is byte ``p`` of the base object (never fetched unless read or
needed by an upload that cannot copy it server-side). ``base_limit`` only shrinks (truncation);
the data file is truncated along with the file, so bytes past ``base_limit`` never written are
zeros (a sparse hole). ``gen`` counts changes; ``uploaded_gen`` is the last one in the store.

The staging directory ``CACHE_DIR/.staging/<source hash>/`` holds one ``<id>.data`` per staged
file and the journal. Eviction never touches it (the block cache's cull, orphan sweep and
broken-cache handling skip dot-folders). One mount owns a directory at a time (``flock``); a
second mount of the same source on the same cache gets a directory of its own, and any mount of
the source adopts directories no live mount holds (a crashed mount's work).

Concurrency: the trio thread changes staged files (``pwrite``/``ftruncate`` run inline: page
cache writes, no SQLite); ``sync`` (fdatasync + journal row) runs in a worker thread on a
record snapshot. An upload reading a staged file sets ``busy``; changes wait for it.

Ownership: a staged file is one file's state (the kernel's inode, whatever its name now); its
data file (descriptor and path) lives until it is removed AND no worker holds it
(:meth:`StagedFile.hold`): unlink, rename and the end of an upload never close what another
task is reading.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from urllib.parse import urlsplit

import trio

from ..backends.base import ObjectInfo
from ..errors import FileTooBig, FusefsError, NoSpace
from ..safety import clean_key
from . import ranges
from .journal import Journal, Record, problem

log = logging.getLogger(__name__)

STAGING = ".staging"


def _os_error(exc: OSError, what: str) -> FusefsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: the staging area (cache disk) is full")
    if exc.errno == errno.EFBIG:
        return FileTooBig(f"{what}: bigger than a file may be")
    return FusefsError(f"{what}: {exc.strerror}", cause=exc)


def _tag(source_id: str) -> str:
    return hashlib.sha256(source_id.encode()).hexdigest()[:16]


_LOOPBACK = {"localhost", "::1", "ip6-localhost", "localhost.localdomain"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_source(source_id: str) -> str:
    """``source_id`` with its endpoint URL (``s3+URL/bucket``) in one spelling: scheme and
    host in lower case, no user info, no default port, loopback names as 127.0.0.1, no
    trailing slash. Staging is found by this, not by the text the user typed (pending
    uploads of ``--endpoint-url http://localhost:9000`` are this mount's under
    ``http://127.0.0.1:9000/`` too)."""
    scheme, plus, rest = source_id.partition("+")
    if not plus or "://" not in rest:
        return source_id
    url = urlsplit(rest)
    host = (url.hostname or "").lower()
    if host in _LOOPBACK:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = url.port
    except ValueError:
        return source_id
    netloc = host if port in (None, _DEFAULT_PORTS.get(url.scheme.lower())) else f"{host}:{port}"
    path = re.sub("/+", "/", url.path).rstrip("/")
    return f"{scheme.lower()}+{url.scheme.lower()}://{netloc}{path}"


def _sound(rec: Record, journal: Journal) -> bool:
    """Is a recovered journal row fit to act on (:func:`.journal.problem`)? A row that is not
    is logged and dropped: no file is opened, uploaded or deleted for it."""
    why = problem(rec)
    if why is None:
        return True
    log.error("journal %s: a row is ignored and dropped: %s", journal.path, why)
    if isinstance(rec.id, str):
        journal.remove(rec.id)
    return False


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
            raise _os_error(exc, self.key) from None

    def write(self, offset: int, data: bytes) -> int:
        try:
            n = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise _os_error(exc, self.key) from None
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
            raise _os_error(exc, self.key) from None
        rec = self.rec
        end = min(offset + len(data), rec.base_limit)
        if end > offset:
            rec.dirty = ranges.add(rec.dirty, offset, end)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _os_error(exc, self.key) from None
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


class Staging:
    """The staging directory of one mount and the staged files in it, by key."""

    def __init__(self, cache_dir: str, source_id: str) -> None:
        self.cache_dir = cache_dir
        self.top = os.path.join(cache_dir, STAGING)
        self.tag = _tag(canonical_source(source_id))
        #: where earlier versions kept this source's staging (the id as the user typed it)
        self._tags = (self.tag, _tag(source_id))
        #: where this source's attributes memory lives (see fusefs.attrmemory)
        self.attrs_path = os.path.join(self.top, self.tag, "attrs.json")
        self._dir: str | None = None
        self._journal: Journal | None = None
        self._lock_fd = -1
        self.files = StagedIndex()
        #: staged files not reachable by key (unlinked while open, or failed and replaced)
        self.detached: set[StagedFile] = set()
        #: pending deletes found by :meth:`recover` (key -> version)
        self.recovered_deletes: dict[str, str] = {}

    def _open(self) -> None:
        """Claim a directory (made on the first write: a mount that only reads leaves the
        cache directory alone)."""
        if self._dir is None:
            os.makedirs(self.top, mode=0o700, exist_ok=True)
            self._dir, self._lock_fd = self._claim(self.top)
            self._journal = Journal(os.path.join(self._dir, "journal.db"))

    @property
    def dir(self) -> str:
        self._open()
        assert self._dir is not None
        return self._dir

    @property
    def journal(self) -> Journal:
        self._open()
        assert self._journal is not None
        return self._journal

    def disk_path(self) -> str:
        """An existing directory on the staging area's file system (for free space)."""
        for p in (self.top, self.cache_dir):
            if os.path.isdir(p):
                return p
        parent = os.path.dirname(os.path.abspath(self.cache_dir))
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        return parent

    def _claim(self, top: str) -> tuple[str, int]:
        """Lock our directory: ``<tag>`` if free, else a new ``<tag>.<random>``."""
        for name in (self.tag, f"{self.tag}.{uuid.uuid4().hex[:8]}"):
            d = os.path.join(top, name)
            os.makedirs(d, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return d, fd
        raise FusefsError(f"cannot lock a staging directory under {top}")

    def recover(self) -> list[StagedFile]:
        """Staged files left by an earlier mount of this source (ours and unlocked
        siblings'), loaded into this directory. A file never closed is kept as failed."""
        if not os.path.isdir(self.top) or not any(
                n.startswith(self._tags) for n in os.listdir(self.top)):
            return []
        self._adopt_siblings()
        self.recovered_deletes = {}
        for key, version in self.journal.load_deletes().items():
            if key and not key.startswith("/") and clean_key(key) and version:
                self.recovered_deletes[key] = version
            else:  # never a request for a key that is not a clean name inside the mount
                log.error("journal: a pending delete of %r is ignored and dropped", key)
                self.journal.remove_delete(key)
        out: list[StagedFile] = []
        for rec in self.journal.load():
            if not _sound(rec, self.journal):
                continue
            path = os.path.join(self.dir, rec.id + ".data")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                log.error("staged file for %s is gone (%s); its journal row is dropped",
                          rec.key, exc.strerror)
                self.journal.remove(rec.id)
                continue
            if rec.state == "open":
                rec.state = "failed"
                rec.error = ("the program writing it never closed it (crash?): not uploaded; "
                             "its data is in " + path)
            sf = StagedFile(rec, path, fd)
            sf.gen = 1
            sf.synced_gen = sf.durable_gen = 1
            if rec.token:  # the token an upload cut by the crash carried: kept
                sf.token_gen = 1
            else:  # journaled again, with one, before it is sent
                sf.durable_gen = 0
            if rec.state != "failed":
                size = os.fstat(fd).st_size
                if size != rec.size:  # a power loss took data the journal row describes
                    rec.state = "failed"
                    rec.error = (f"the staged data is {size} bytes, {rec.size} were written "
                                 "(lost in a crash?): not uploaded")
            older = self.files.get(rec.key)
            if older is not None:  # two versions of one key: the newer wins the name
                if older.rec.state in ("failed", "conflict"):
                    self.detached.add(older)  # kept for the user
                else:  # superseded by a later change of the name (a crash in between)
                    log.info("%r: an older staged version is superseded and dropped", rec.key)
                    out.remove(older)
                    older.remove_data()
                    self.journal.remove(older.rec.id)
            self.files[rec.key] = sf
            out.append(sf)
        # data files no row describes: unlinked while open when the daemon died
        known = {sf.rec.id + ".data" for sf in out}
        for name in os.listdir(self.dir):
            if name.endswith(".data") and name not in known:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
        return out

    def _adopt_siblings(self) -> None:
        for name in sorted(os.listdir(self.top)):
            d = os.path.join(self.top, name)
            if d == self.dir or not name.startswith(self._tags) or not os.path.isdir(d):
                continue
            fd = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live mount's
                journal_path = os.path.join(d, "journal.db")
                if os.path.exists(journal_path):
                    other = Journal(journal_path)
                    for key, version in other.load_deletes().items():
                        self.journal.save_delete(key, version)
                        other.remove_delete(key)
                    for rec in other.load():
                        if not _sound(rec, other):
                            continue
                        src = os.path.join(d, rec.id + ".data")
                        if os.path.exists(src):
                            os.replace(src, os.path.join(self.dir, rec.id + ".data"))
                            self.journal.save(rec)
                        other.remove(rec.id)
                    other.close()
                if d != os.path.join(self.top, self.tag):
                    shutil.rmtree(d, ignore_errors=True)
            finally:
                os.close(fd)

    def create(self, key: str, base: ObjectInfo | None, expect: str | None,
               mode: int | None = None) -> StagedFile:
        """A new staged file for ``key`` replacing ``base`` (None: a new file), whose upload
        requires the object to have version ``expect`` ("": absent; None: no condition).
        Not journaled yet (the caller journals it, state ``open``, see :meth:`sync`)."""
        id_ = uuid.uuid4().hex
        path = os.path.join(self.dir, id_ + ".data")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if base is not None and base.size:
                os.ftruncate(fd, base.size)
        except OSError as exc:
            raise _os_error(exc, key) from None
        rec = Record(
            id=id_, key=key, size=base.size if base else 0, mtime=time.time(), mode=mode,
            base_key=base.key if base else "", base_version=base.version if base else "",
            base_size=base.size if base else 0, base_mtime=base.mtime if base else 0.0,
            base_limit=base.size if base else 0, expect=expect, created=time.time(),
            uid=base.uid if base else None, gid=base.gid if base else None,  # owners stay
        )
        if mode is None and base is not None:
            rec.mode = base.mode  # a rewrite keeps the mode (and a link's or FIFO's type)
        sf = StagedFile(rec, path, fd)
        old = self.files.get(key)
        if old is not None:
            self.detached.add(old)
        self.files[key] = sf
        return sf

    def get(self, key: str) -> StagedFile | None:
        return self.files.get(key)

    def all(self) -> list[StagedFile]:
        """Every staged file, by name or detached."""
        return list(self.files.values()) + list(self.detached)

    def under(self, prefix: str) -> list[StagedFile]:
        """Staged files whose key starts with ``prefix`` ("" for all)."""
        return [sf for k, sf in self.files.items() if k.startswith(prefix)]

    def rekey(self, sf: StagedFile, new_key: str) -> None:
        if self.files.get(sf.key) is sf:
            del self.files[sf.key]
        old = self.files.get(new_key)
        if old is not None and old is not sf:
            self.detach(old)
        sf.rec.key = new_key
        self.files[new_key] = sf

    def detach(self, sf: StagedFile) -> None:
        """Take ``sf`` off its name (unlinked, replaced); it lives on while it is open."""
        if self.files.get(sf.key) is sf:
            del self.files[sf.key]
        self.detached.add(sf)

    def snapshot(self, sf: StagedFile, state: str = "pending") -> tuple[Record, int]:
        """A copy of ``sf``'s record (with ``state``; ``open`` always, else a failed or
        conflict state is kept) and the change it describes."""
        if state == "open" or sf.rec.state not in ("failed", "conflict"):
            sf.rec.state = state
        return dataclasses.replace(sf.rec, dirty=list(sf.rec.dirty)), sf.gen

    def sync(self, sf: StagedFile, rec: Record, durable: bool = True) -> None:
        """Worker thread: journal ``rec``; ``durable``: sync the data to disk first.

        Without it (at ``close``) the row survives the daemon being killed (SQLite WAL) and
        the data is in the page cache, as a local file's is after ``close``; the data is
        synced before its upload starts, which bounds what a power loss can take."""
        if sf.removed or sf.unlinked:
            # removed meanwhile, or it lost its name (a write through a descriptor still open
            # on it changes nothing in the store): its row must not come back
            return
        if durable:
            if not sf.hold():
                return  # removed meanwhile: nothing to journal
            try:
                os.fdatasync(sf.fd)
            except OSError as exc:
                raise _os_error(exc, sf.key) from None
            finally:
                sf.unhold()
        try:
            self.journal.save(rec)
        except sqlite3.Error as exc:
            if "full" in str(exc):
                raise NoSpace(f"{sf.key}: the staging area (cache disk) is full") from None
            raise FusefsError(f"{sf.key}: cannot journal it: {exc}") from None

    def remove(self, sf: StagedFile) -> None:
        """Forget ``sf`` entirely: data file, journal row, name."""
        if self.files.get(sf.key) is sf:
            del self.files[sf.key]
        self.detached.discard(sf)
        sf.remove_data()
        self.journal.remove(sf.rec.id)

    def staged_bytes(self) -> int:
        """Bytes the staging area holds on disk."""
        total = 0
        for sf in list(self.files.values()) + list(self.detached):
            try:
                total += os.fstat(sf.fd).st_blocks * 512
            except OSError:
                pass
        return total

    def close(self) -> None:
        for sf in list(self.files.values()) + list(self.detached):
            with contextlib.suppress(OSError):
                os.close(sf.fd)
        if self._journal is not None:
            self._journal.close()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
