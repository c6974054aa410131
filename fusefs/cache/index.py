"""Index operations diskcache lacks: culling by bytes, removing orphaned value files, and
looking items up without a write.

All work on diskcache's own schema (the ``Cache`` table: ``rowid``, ``filename``, ``size``,
``access_time``) through its transaction helper, so its triggers keep the volume and count
right and value files are removed only after the commit, as diskcache's own culling does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import diskcache

#: Block files the index does not list are removed once they are this old (seconds).
ORPHAN_AGE = 3600.0

#: Least recently used items first (its LRU policy indexes access_time).
#: A value kept inside SQLite (under 32 KiB) has size 0 in diskcache: its bytes are the value
_SELECT_LRU = (
    "SELECT rowid, filename, CASE WHEN filename IS NULL THEN length(value) ELSE size END"
    " FROM Cache ORDER BY access_time LIMIT ?"
)
#: A string key is stored as itself with raw = 1 (``Disk.put``); fusefs sets no expiry.
_SELECT_ITEM = "SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_TOUCH = "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1"


def lookup(cache: diskcache.Cache, key: str) -> tuple[bool, Any]:
    """(indexed, what ``cache.get(key, read=True)`` returns: an open file, the bytes, or None
    if absent or its file is gone), without recording the access. Under the LRU policy
    diskcache's ``get`` takes SQLite's write lock for every call, a miss too (it updates the
    access time): one write transaction per cold block, contending with the stores. Callers
    record accesses in batches with :func:`touch`."""
    rows = cache._sql(_SELECT_ITEM, (key,)).fetchall()
    if not rows:
        return False, None
    mode, filename, value = rows[0]
    try:
        return True, cache._disk.fetch(mode, filename, value, True)
    except OSError:  # its file is gone: damaged, or evicted since the select
        return True, None


def touch(cache: diskcache.Cache, keys: Iterable[str]) -> None:
    """Set the access time of ``keys`` to now (the LRU order), in one transaction."""
    now = time.time()
    with cache._transact(retry=True) as (sql, _):
        for key in keys:
            sql(_TOUCH, (now, key))


def cull(cache: diskcache.Cache, excess: int) -> int:
    """Evict least recently used items until their bytes cover ``excess``; returns how many.

    diskcache's own culling cannot bound a cache of mixed sizes: ``set`` removes a fixed number
    of items however small they are, and ``cull()`` removes batches of ten, which can take the
    item just stored with them.
    """
    removed = 0
    while excess > 0:
        with cache._transact(retry=True) as (sql, cleanup):
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
    return removed


def sweep_orphans(cache: diskcache.Cache, directory: str, min_age: float) -> tuple[int, int]:
    """Delete value files the index does not list (a process killed between writing a file and
    recording it) older than ``min_age`` seconds, so never a file another mount is writing right
    now; such files are outside the size bound. Returns (files, bytes) removed."""
    known = {row[0] for row in cache._sql(
        "SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()}
    cutoff = time.time() - min_age
    removed = freed = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .broken-*: not ours to clean
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".val") or os.path.relpath(path, directory) in known:
                continue
            try:
                st = os.stat(path)
                if st.st_mtime < cutoff:
                    os.unlink(path)
                    removed, freed = removed + 1, freed + st.st_size
            except OSError:
                continue
    return removed, freed
