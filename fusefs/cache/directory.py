"""The cache directory: private permissions whatever the umask.

diskcache creates its value files with ``open`` and sub-directories with ``makedirs``, so they
follow the process umask; changing the umask around its calls is not thread-safe (the umask is
per process). ``PrivateDisk`` creates them 0600/0700 itself; ``prepare_directory`` creates the
directory 0700 and the SQLite database 0600 before diskcache opens it (SQLite gives its -wal and
-shm files the database's mode).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import diskcache

log = logging.getLogger(__name__)

#: Directories already warned about (one warning per directory and process).
_warned_open_dirs: set[str] = set()


class PrivateDisk(diskcache.Disk):
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


