"""Index operations diskcache lacks: culling by bytes, and removing orphaned value files.

Both work on diskcache's own schema (the ``Cache`` table: ``rowid``, ``filename``, ``size``,
``access_time``) through its transaction helper, so its triggers keep the volume and count
right and value files are removed only after the commit, as diskcache's own culling does.
"""

from __future__ import annotations

import os
import time

import diskcache

#: Block files the index does not list are removed once they are this old (seconds).
ORPHAN_AGE = 3600.0

#: Least recently used items first (its LRU policy indexes access_time).
_SELECT_LRU = "SELECT rowid, filename, size FROM Cache ORDER BY access_time LIMIT ?"


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
