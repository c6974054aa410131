"""The journal of staged files: one SQLite row per staged file of one staging directory.

A row is written when a file is staged (state ``open``), again at its first change after each
close (``open``: being changed), and each time the file is closed or fsynced (state
``pending``), so after ``kill -9``, a crash or a reboot the next mount of the same source finds
every closed file and uploads it. A file being changed when the daemon died (state ``open`` at
start) is not uploaded, never a mix of two versions: it is kept, as failed, for the user to look
at. Rows are removed once their upload succeeded.

The ``deletes`` table holds deletes this mount decided on and has not done yet (a key and the
version to delete): written before the name disappears, removed once the store no longer has
that version there.

SQLite in WAL mode with ``synchronous=NORMAL``: a committed row survives the daemon being
killed at once, and a power loss once the WAL is synced (at the next durable sync before an
upload, or a checkpoint). Every call takes the journal's lock, so worker threads may share it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass, field, fields

from ..safety import clean_key

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS staged (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deletes (
    key TEXT PRIMARY KEY,
    version TEXT NOT NULL
);
"""


@dataclass
class Record:
    """What must be uploaded: the staged file ``id`` as object ``key``.

    ``base_key``/``base_version``: the object whose bytes fill the ranges not written
    (``[0, base_limit)`` minus ``dirty``), or "" for none. ``expect``: the version the object at
    ``key`` must have for the upload to go ahead ("" absent, None: no condition).
    ``token``: unique to the change being uploaded, sent in the object's metadata: after a
    lost answer or a crash, the object at ``key`` is this upload only if it carries it.
    """

    id: str
    key: str
    size: int = 0
    mtime: float = 0.0
    mode: int | None = None
    #: owner and group kept in metadata (None: the mount's default, nothing written)
    uid: int | None = None
    gid: int | None = None
    #: a device node's number (its type is in ``mode``)
    rdev: int | None = None
    base_key: str = ""
    base_version: str = ""
    base_size: int = 0
    base_mtime: float = 0.0
    base_limit: int = 0
    dirty: list[tuple[int, int]] = field(default_factory=list)
    expect: str | None = ""
    token: str = ""
    #: an S3 multipart upload in progress (aborted at the next mount if a crash cut it)
    multipart: str = ""
    state: str = "open"  # open | pending | failed | conflict
    error: str = ""
    created: float = 0.0


class Journal:
    """Staged-file records of one staging directory (``journal.db`` in it)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self.path = path
        # private whatever the umask (SQLite gives its -wal and -shm files the same mode)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def save(self, rec: Record) -> None:
        data = json.dumps(asdict(rec), separators=(",", ":"))
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO staged (id, record) VALUES (?, ?)",
                             (rec.id, data))

    def remove(self, id_: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM staged WHERE id = ?", (id_,))

    def save_delete(self, key: str, version: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO deletes (key, version) VALUES (?, ?)",
                             (key, version))

    def remove_delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deletes WHERE key = ?", (key,))

    def load_deletes(self) -> dict[str, str]:
        with self._lock:
            rows = self._db.execute("SELECT key, version FROM deletes").fetchall()
        return {str(k): str(v) for k, v in rows}

    def load(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM staged").fetchall()
        known = {f.name for f in fields(Record)}
        out = []
        for (data,) in rows:
            try:
                d = {k: v for k, v in json.loads(data).items() if k in known}
                d["dirty"] = [tuple(x) for x in d.get("dirty", [])]
                out.append(Record(**d))
            except (ValueError, TypeError, AttributeError) as exc:  # not a row we wrote
                log.error("journal %s: a row that is not a record is ignored (%s)",
                          self.path, exc)
        out.sort(key=lambda r: r.created if isinstance(r.created, (int, float)) else 0.0)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


_ID = re.compile(r"[0-9a-f]{32}")
_STATES = ("open", "pending", "failed", "conflict", "done")


def problem(rec: Record) -> str | None:
    """Why a journal row must not be acted on, or None if it is sound.

    Rows are read back from disk, so each field is checked before it names a file or a key:
    ``id`` is the UUID hex this module writes (the data file's name: never a path), keys are
    clean and relative to the mount (so inside its prefix), numbers are numbers."""
    if not isinstance(rec.id, str) or not _ID.fullmatch(rec.id):
        return "its id is not a staged file's"
    for name in ("key", "base_key"):
        value = getattr(rec, name)
        if not isinstance(value, str) or (name == "key" and not value):
            return f"its {name} is not a key"
        if value and (value.startswith("/") or value.endswith("/") or not clean_key(value)):
            return f"its {name} {value!r} is not a key inside the mount"
    for name in ("base_version", "error"):
        if not isinstance(getattr(rec, name), str):
            return f"its {name} is not text"
    if rec.expect is not None and not isinstance(rec.expect, str):
        return "its expected version is not text"
    if rec.mode is not None and (type(rec.mode) is not int or not 0 <= rec.mode <= 0o177777):
        return "its mode is not a mode"
    for v in (rec.uid, rec.gid):
        if v is not None and (type(v) is not int or not 0 <= v < 0xFFFFFFFF):
            return "its owner is not an id"
    if rec.rdev is not None and (type(rec.rdev) is not int or not 0 <= rec.rdev < 1 << 64):
        return "its device number is not a number"
    for f in fields(Record):
        if f.type in ("int", "float"):
            v = getattr(rec, f.name)
            if type(v) not in ((int,) if f.type == "int" else (int, float)) or (
                    f.type == "int" and v < 0):
                return f"its {f.name} is not a number"
    if not all(isinstance(r, tuple) and len(r) == 2 and all(type(x) is int and x >= 0 for x in r)
               for r in rec.dirty):
        return "its written ranges are not ranges"
    if rec.state not in _STATES:
        return "its state is unknown"
    return None
