"""The staging directory of a mount: where staged files (:mod:`.staged`) keep their bytes,
and the journal that lets a later mount resume or report them.

The staging directory ``CACHE_DIR/.staging/<source hash>/`` holds one ``<id>.data`` per staged
file and the journal. Eviction never touches it (the block cache's cull, orphan sweep and
broken-cache handling skip dot-folders). One mount owns a directory at a time (``flock``); a
second mount of the same source on the same cache gets a directory of its own, and any mount of
the source adopts directories no live mount holds (a crashed mount's work).

Concurrency: the trio thread changes staged files (see :mod:`.staged`); ``sync``
(fdatasync + journal row) runs in a worker thread on a record snapshot. A row recovered from
the journal is acted on only if it is sound (``_sound``); a data file is removed only once no
worker holds it (:meth:`StagedFile.hold`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from urllib.parse import urlsplit

from ..backends.base import ObjectInfo
from ..errors import FusefsError, NoSpace
from ..safety import clean_key
from .journal import Journal, Record, problem
from .staged import StagedFile, StagedIndex, os_error

log = logging.getLogger(__name__)

STAGING = ".staging"


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
            raise os_error(exc, key) from None
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
                raise os_error(exc, sf.key) from None
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
