"""Folder attributes and the times this mount keeps in memory. No pyfuse3 here.

A folder's mode, owner and mtime live in its marker object ``dir/`` under the same metadata
keys as a file's (``mode`` with ``S_IFDIR``, ``uid``, ``gid``, ``mtime``: s3fs-fuse's
convention, so s3fs reads them and fusefs reads s3fs's). A folder without a marker (only a
prefix of other keys) shows the mount's defaults. On a local source the marker is the real
directory (its mode, owner and times).

Cost: a folder's marker is read with one HEAD (local: an ``fstat``) the first time the kernel
looks the folder up, then trusted for the metadata TTL, as listings are; a directory listing
hands out sub-folders it has not read yet with the defaults and an attribute timeout of 0, so
a ``stat`` of one (``ls -l``) asks for it (one HEAD) and a plain ``ls``/``find`` asks nothing.

In memory only (never stored, lost at unmount): a folder's mtime and ctime moving when this
mount adds, removes or renames entries in it; ctime of files and folders (``chmod``,
``chown``, ``utimensat``, ``rename``, ``write``, ``truncate``); atime set by ``utimensat``.
Without one, ctime and atime read as the mtime (the mount never updates atime on reads, as
``noatime``). Bounded: ``MAX_TIMES`` paths and ``MAX_FOLDERS`` markers (least recently set
or seen dropped first).

Concurrency: on the trio thread; the HEAD runs in a worker thread.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import threads
from .backends.base import ObjectInfo, ObjectStore
from .errors import NotFound

#: Paths whose in-memory ctime or atime is kept (each ~150 B).
MAX_TIMES = 200_000
#: Folders whose marker is kept (each ~400 B with its info).
MAX_FOLDERS = 200_000


@dataclass(slots=True)
class FolderState:
    """What is known of one folder's marker: its info (None: no marker), when it was seen."""

    marker: ObjectInfo | None
    seen: float


class FolderMeta:
    """Folder markers as read, and the in-memory times of one mount."""

    def __init__(self, store: ObjectStore, clock: Callable[[], float],
                 fresh: Callable[[float, float], bool], limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.clock = clock
        self.fresh = fresh
        self.limiter = limiter
        #: by path, least recently seen first (bounded: MAX_FOLDERS)
        self._markers: OrderedDict[str, FolderState] = OrderedDict()
        self._loading: dict[str, trio.Event] = {}
        #: path -> (mtime, ctime, atime) set by this mount (wall-clock seconds, None: none)
        self._times: OrderedDict[str, tuple[float | None, float | None, float | None]] = (
            OrderedDict())
        self.heads = 0  # marker HEADs sent (tests)
        #: the store keeps no metadata on folder markers (SeaweedFS: its folders are filer
        #: directories; a PUT of ``dir/`` drops the metadata, a copy of it is NoSuchKey):
        #: folders' attributes are then kept in memory only (see :meth:`keep`)
        self.memory_only = False

    # --- markers ---------------------------------------------------------------------------

    def state(self, path: str) -> FolderState | None:
        """The folder's marker as last seen (maybe stale), or None if never seen."""
        return self._markers.get(path)

    def known(self, path: str) -> bool:
        st = self._markers.get(path)
        return st is not None and self.fresh(st.seen, self.clock())

    async def load(self, path: str) -> FolderState:
        """The folder's marker, read (one HEAD of ``path/``) unless fresh; one read per
        folder at a time. The root has no marker."""
        while True:
            st = self._markers.get(path)
            if not path or (st is not None and self.fresh(st.seen, self.clock())):
                return st or FolderState(None, math.inf)
            running = self._loading.get(path)
            if running is None:
                break
            await running.wait()
        self._loading[path] = done = trio.Event()
        try:
            sent = self.clock()
            self.heads += 1
            try:
                info: ObjectInfo | None = await threads.run_sync(
                    self.store.head, path + "/", limiter=self.limiter)
            except NotFound:
                info = None
            return self.seen(path, info, sent)
        finally:
            del self._loading[path]
            done.set()

    def seen(self, path: str, info: ObjectInfo | None, sent: float) -> FolderState:
        """An observation of the folder's marker (a HEAD, or this mount's own change)."""
        st = self._markers.get(path)
        if st is not None and sent < st.seen:
            return st
        if (st is not None and st.marker is not None and info is not None
                and st.marker.version != info.version and path in self._times):
            # a new marker (another writer's, or this mount's change, which sets its own
            # times after this): its mtime wins over the one kept in memory
            old = self._times[path]
            self._set_times(path, mtime=None, ctime=old[1], atime=old[2])
        st = self._markers[path] = FolderState(info, sent)
        self._markers.move_to_end(path)
        self._bound()
        return st

    def _bound(self) -> None:
        """At most MAX_FOLDERS markers kept: the least recently seen go (read again when
        asked; a folder's attributes kept in memory only are then lost: the defaults)."""
        while len(self._markers) > MAX_FOLDERS:
            self._markers.popitem(last=False)

    def keep(self, path: str, info: ObjectInfo) -> None:
        """A folder's attributes kept in memory only (``memory_only``): never read again."""
        self._markers[path] = FolderState(info, math.inf)
        self._markers.move_to_end(path)
        self._bound()

    def stale(self, path: str) -> None:
        st = self._markers.get(path)
        if st is not None and st.seen != math.inf:
            st.seen = -math.inf

    # --- times in memory -------------------------------------------------------------------

    def times(self, path: str) -> tuple[float | None, float | None, float | None]:
        """(mtime, ctime, atime) this mount set for ``path`` (None where it set none)."""
        return self._times.get(path, (None, None, None))

    def _set_times(self, path: str, *, mtime: float | None = None, keep_ctime: bool = False,
                   ctime: float | None = None, atime: float | None = None,
                   keep_atime: bool = True) -> None:
        old = self._times.get(path, (None, None, None))
        new = (mtime, old[1] if keep_ctime else ctime,
               (old[2] if atime is None else atime) if keep_atime else atime)
        if new == (None, None, None):
            self._times.pop(path, None)
            return
        self._times[path] = new
        self._times.move_to_end(path)
        while len(self._times) > MAX_TIMES:
            self._times.popitem(last=False)

    def entries_changed(self, path: str) -> None:
        """An entry of folder ``path`` was added, removed or renamed by this mount: its mtime
        and ctime are now."""
        now = time.time()
        old = self._times.get(path, (None, None, None))
        self._set_times(path, mtime=now, ctime=now, atime=old[2])

    def changed(self, path: str, *, atime: float | None = None) -> None:
        """``path``'s attributes (or bytes) changed: its ctime is now; ``atime`` if given."""
        old = self._times.get(path, (None, None, None))
        self._set_times(path, mtime=old[0], ctime=time.time(), atime=atime)

    def set_mtime(self, path: str, mtime: float) -> None:
        """A folder's mtime set (utimensat): what it shows until its entries change."""
        old = self._times.get(path, (None, None, None))
        self._set_times(path, mtime=mtime, ctime=time.time(), atime=old[2])

    def move(self, old: str, new: str) -> None:
        """``old`` (and everything below it) is now ``new``."""
        pre = old + "/"
        for table in (self._times, self._markers):
            for p in [p for p in table if p == old or p.startswith(pre)]:
                table[new + p[len(old):]] = table.pop(p)  # type: ignore[assignment]
        for p in [p for p in self._markers if p == new or p.startswith(new + "/")]:
            self.stale(p)  # a copy: another version, read again
        for p in [p for p in self._times if p == new or p.startswith(new + "/")]:
            self._times.move_to_end(p)

    def drop(self, path: str) -> None:
        """``path`` is gone (unlink, rmdir)."""
        self._times.pop(path, None)
        self._markers.pop(path, None)
