"""The cache directory: private permissions whatever the umask, and a broken cache set aside.

diskcache creates its value files with ``open`` and sub-directories with ``makedirs``, so they
follow the process umask; changing the umask around its calls is not thread-safe (the umask is
per process). ``PrivateDisk`` creates them 0600/0700 itself; ``prepare_directory`` creates the
directory 0700 and the SQLite database 0600 before diskcache opens it (SQLite gives its -wal and
-shm files the database's mode).

A broken cache never stops a mount: ``open_index`` opens diskcache's index under a lock file
(mounts starting together), and when the index cannot be read or fails SQLite's quick check, or
the format marker names another layout, moves the directory's contents into ``.broken-TIME/``
(keeping only the latest such folder), logs one line and starts an empty cache. A directory
without a marker (new, or written before markers existed) is adopted: blocks of an older layout
have other keys and are never looked up. Missing or damaged block files are the block store's
business (a miss each).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from typing import Any

import diskcache

from ..errors import UserError

log = logging.getLogger(__name__)

#: Directories already warned about (one warning per directory and process).
_warned_open_dirs: set[str] = set()

#: The marker file naming the layout of the blocks in a cache directory.
MARKER = "fusefs-cache.json"
#: Layout of this fusefs's cache (1: checksummed blocks, keys tagged "b1").
FORMAT = 1
_LOCK = ".lock"
_BROKEN = ".broken-"
#: The write path's staging area (fusefs.write.staging.STAGING): never moved or cleaned here.
_STAGING = ".staging"


class PrivateDisk(diskcache.Disk):
    """diskcache's Disk, writing its value files 0600 in sub-directories 0700 (diskcache's own
    uses ``open``/``makedirs`` and so the process umask, which a thread cannot change safely).

    Value files go into one level of 256 sub-directories (``ab/cdef....val``), not diskcache's
    two levels of 65,536: a new directory costs about as much kernel time as the file itself,
    and with diskcache's layout nearly every block of a young cache made one. The path is
    stored in the index, so files of either layout are read and removed alike."""

    def filename(self, key: Any = diskcache.UNKNOWN, value: Any = diskcache.UNKNOWN
                 ) -> tuple[str, str]:
        hex_name = os.urandom(16).hex()
        name = os.path.join(hex_name[:2], hex_name[2:] + ".val")
        return name, os.path.join(self._directory, name)

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> int:
        if "b" not in mode:  # fusefs stores bytes only; keep diskcache's path for anything else
            return int(super()._write(full_path, iterator, mode, encoding))
        full_dir = os.path.dirname(full_path)
        for attempt in range(10):
            try:  # O_EXCL; the directory may be missing (new, or removed by another cache)
                fd = os.open(full_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                if attempt == 9:
                    raise
                _make_private_dirs(self._directory, full_dir)
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
        st = os.stat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory") from None
        mode = st.st_mode & 0o777
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




def open_index(directory: str, open_cache: Callable[[], diskcache.Cache]) -> diskcache.Cache:
    """``open_cache()`` on a prepared directory; a broken or foreign cache is moved aside first
    (one warning). Raises UserError if the directory cannot be used, or if even an empty cache
    cannot be opened there."""
    try:
        prepare_directory(directory)
        lock = _lock(directory)  # mounts starting together check and move aside one at a time
    except OSError as exc:
        raise UserError(f"cache directory {directory}: {exc.strerror or exc}") from None
    try:
        problem = _marker_problem(directory)
        if problem is None:
            cache = None
            try:
                cache = open_cache()
                problem = _index_problem(cache)
            except sqlite3.DatabaseError as exc:
                if "locked" in str(exc):  # busy, not broken: never move a live cache aside
                    raise UserError(f"cache directory {directory}: {exc}") from None
                problem = f"has an unreadable index ({_first_line(exc)})"
            if problem is None:
                assert cache is not None
                _write_marker(directory)
                return cache
            if cache is not None:
                with contextlib.suppress(Exception):
                    cache.close()
        try:
            where = _move_aside(directory)
            prepare_directory(directory)
            cache = open_cache()
            _write_marker(directory)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cache directory {directory} {problem}, and cannot be reset: "
                            f"{_first_line(exc)}") from None
        log.warning("cache directory %s %s: moved its contents to %s (delete it when done) and "
                    "started an empty cache", directory, problem, where)
        return cache
    finally:
        os.close(lock)  # releases the flock


def _lock(directory: str) -> int:
    """An exclusive ``flock`` on the directory's lock file; closing the fd releases it."""
    fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


def _marker_problem(directory: str) -> str | None:
    try:
        with open(os.path.join(directory, MARKER), "rb") as f:
            found = json.loads(f.read(4096)).get("format")
    except FileNotFoundError:
        return None  # a new directory, or a cache from before markers: adopted
    except (OSError, ValueError, AttributeError) as exc:
        return f"has an unreadable {MARKER} ({_first_line(exc)})"
    if found != FORMAT:
        return f"holds a cache of another fusefs version (format {found!r}, this one uses {FORMAT})"
    return None


def _index_problem(cache: diskcache.Cache) -> str | None:
    rows = cache._sql("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        return f"has a damaged index ({_first_line(rows[0][0] if rows else 'no answer')})"
    return None


def _write_marker(directory: str) -> None:
    path = os.path.join(directory, MARKER)
    if _marker_problem(directory) is None and os.path.exists(path):
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        json.dump({"format": FORMAT, "written_by": "fusefs"}, f)
    os.replace(tmp, path)


def _move_aside(directory: str) -> str:
    """Move everything but the lock file and the staging area (written data, not a copy)
    into a fresh ``.broken-TIME`` folder (removing older ones: a cache is only a copy);
    returns its path."""
    for name in os.listdir(directory):
        if name.startswith(_BROKEN):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    where = os.path.join(directory, _BROKEN + time.strftime("%Y%m%dT%H%M%S"))
    os.mkdir(where, 0o700)
    for name in os.listdir(directory):
        if name not in (_LOCK, _STAGING) and not name.startswith(_BROKEN):
            os.rename(os.path.join(directory, name), os.path.join(where, name))
    return where


def _first_line(x: object) -> str:
    text = str(x).strip()
    return text.splitlines()[0] if text else type(x).__name__
