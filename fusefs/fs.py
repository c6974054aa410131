"""The filesystem core: inodes, lookups, freshness, open handles. No pyfuse3 here.

Directories are key prefixes split on ``/``. Names are resolved by :mod:`fusefs.folders` (listed
key ranges: most lookups make no request). A file's metadata is the newest observation of it (a
listing or a HEAD, by the time the request was sent): an older one never replaces it, and a new
version makes the kernel drop the inode's cached size and pages (``on_changed``).

Inodes: a node exists while the kernel holds it (its lookup count, from LOOKUP replies and
READDIRPLUS entries, is above zero) or a handle is open on it; ``forget`` frees it, and its
number may be given to another path later. Internal users (the control file) resolve paths to
:class:`Entry` values, which are not nodes and hold nothing.

Concurrency: every method runs on the trio thread; store calls run in worker threads, so other
requests may interleave at each ``await``. Node fields are replaced whole, never half-updated.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import stats as S
from . import threads
from .backends.base import ObjectInfo, ObjectStore
from .config import Settings
from .errors import (
    FusefsError,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    ReadOnly,
    StaleVersion,
)
from .foldermeta import FolderMeta
from .folders import Folders, check_length, join, valid_name
from .kinds import file_type, is_link
from .nodes import (
    Attr,
    DirHandle,
    Entry,
    Handle,
    Node,
    capped_dir_mode,
    capped_mode,
    seen_type,
)
from .reader import Reader, SeqState
from .workers.pool import PoolUnavailable

if TYPE_CHECKING:
    from .write.staging import StagedFile
    from .write.writes import Writes

log = logging.getLogger(__name__)

#: Folders whose files :meth:`FileSystem.getattr` settles ahead of the program, at most,
#: and their files kept for that over all of them (about 150 bytes each; a bigger folder's
#: first ones only).
SETTLE_FOLDERS = 16
SETTLE_FILES = 100_000


class _SettleQueue:
    """A listed folder's files whose metadata is unknown, in listing order (see
    :meth:`FileSystem._settle_next`)."""

    __slots__ = ("infos", "index", "started", "last")

    def __init__(self, infos: list[ObjectInfo]) -> None:
        self.infos = infos
        self.index = {info.key: i for i, info in enumerate(infos)}
        self.started: set[int] = set()  # indices whose fetch was started ahead
        self.last = -1  # index of the file whose attributes the kernel asked for last


ROOT_INO = 1
#: The control file's inode; never handed out to an object.
CONTROL_INO = 2
CONTROL_NAME = ".fusefs"
#: Longest entry/attribute timeout given to the kernel (a "forever" TTL becomes this).
MAX_KERNEL_TIMEOUT = 365 * 86400.0


class FileSystem:
    """A read-only view of an object store as a directory tree."""

    def __init__(
        self,
        store: ObjectStore,
        reader: Reader,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.reader = reader
        self.settings = settings
        self.clock = clock
        self.uid = settings.uid if settings.uid is not None else os.getuid()
        self.gid = settings.gid if settings.gid is not None else os.getgid()
        self.mount_time_ns = time.time_ns()
        self._file_mode_forced = "file_mode" in settings.sources
        root = Node(ROOT_INO, "", True, None, math.inf)
        #: Indexed by inode number (a list: 8 bytes a node, numbers of freed nodes reused).
        self._nodes: list[Node | None] = [None, root, None]
        self._by_path: dict[str, Node] = {"": root}
        self._free_inos: list[int] = []
        self._count = 1
        #: Version whose pages the kernel may cache, per inode opened at least once.
        self._kernel_version: dict[int, str] = {}
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        #: Called (awaited) with an inode whose object changed version while the kernel may
        #: cache its attributes or pages; set by the FUSE adapter.
        self.on_changed: Callable[[int], Awaitable[None]] | None = None
        self.folders = Folders(store, settings, clock, reader.start_soon)
        reader._on_stale = self.mark_stale
        self.folders.seed = self._seed
        self.folders.fetch_small = self._fetch_small
        reader.learn = self._learn
        self.folders.keeps_bytes = reader.blocks.persistent
        #: folders' markers (mode, owner, mtime) and the times kept in memory
        self.folder_meta = FolderMeta(store, clock, self._fresh, self.folders.meta_limiter)
        #: The write side (set by :class:`fusefs.write.writes.Writes`); None: read-only core.
        self.writes: Writes | None = None
        #: Is a hint stream open? (set by the control layer): then :meth:`_settle_next`
        #: starts nothing (the stream prefetches, with the metadata, within its cache bound)
        self.hinting: Callable[[], bool] = lambda: False
        #: Files of recently read folders whose metadata is unknown (S3), in listing order:
        #: stats in that order learn the next few ahead of the program (``ls -l``)
        self._to_settle: OrderedDict[str, _SettleQueue] = OrderedDict()

    def set_ttls(self, metadata_ttl: float, negative_ttl: float) -> None:
        self.folders.set_ttls(metadata_ttl, negative_ttl)

    @property
    def ttl(self) -> float:
        return self.folders.ttl

    @property
    def negative_ttl(self) -> float:
        return self.folders.negative_ttl

    def _fresh(self, t: float, now: float) -> bool:
        return self.folders.fresh(t, now)

    @property
    def kernel_timeout(self) -> float:
        return min(self.ttl, MAX_KERNEL_TIMEOUT)

    # --- nodes -----------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        node = self._nodes[ino] if 0 <= ino < len(self._nodes) else None
        if node is None:
            raise NotFound(f"inode {ino} unknown")
        return node

    def node_by_path(self, path: str) -> Node | None:
        return self._by_path.get(path)

    @property
    def node_count(self) -> int:
        return self._count

    def _node(self, path: str, is_dir: bool, info: ObjectInfo | None, seen: float) -> Node:
        """The node of ``path``, made or updated with an observation made at ``seen``."""
        node = self._by_path.get(path)
        if node is not None and (file_type(node.info) != seen_type(node, is_dir, info)
                                 or self._replaced_while_open(node, info, seen)):
            # a file became a folder, a link... or the other way round: a new inode (the
            # kernel refuses a type change); it may still hold the old one until it forgets.
            # Also a new version of a file that is open: the kernel keeps pages per inode, so
            # the descriptors must keep theirs while the name shows the new file
            del self._by_path[path]
            node = None
        if node is None:
            if self._free_inos:
                ino = self._free_inos.pop()
                node = self._nodes[ino] = Node(ino, path, is_dir, info, seen)
            else:
                ino = len(self._nodes)
                node = Node(ino, path, is_dir, info, seen)
                self._nodes.append(node)
            self._count += 1
            self._by_path[node.path] = node  # a file's key string: shared, not copied
            return node
        self._observe(node, info, seen)
        return node

    def _replaced_while_open(self, node: Node, info: ObjectInfo | None, seen: float) -> bool:
        """Another writer's version of an open file (a newer observation than the node's)."""
        old = node.info
        return (info is not None and old is not None and not node.is_dir
                and seen >= node.confirmed and old.version != info.version
                and self._is_open(node))

    def _observe(self, node: Node, info: ObjectInfo | None, seen: float) -> None:
        """Take a newer observation of a node; an older one than what it has is ignored."""
        if seen < node.confirmed:
            return
        if not node.is_dir and info is not None:
            old = node.info
            if (old is not None and old.version == info.version and info.meta_mtime is None
                    and info.mode is None and (old.meta_mtime is not None
                                               or old.mode is not None)):
                info = dataclasses.replace(  # a listing without metadata
                    info, meta_mtime=old.meta_mtime, mode=old.mode, uid=old.uid, gid=old.gid)
            if old is not None and old.version == info.version and old.mtime != info.mtime:
                # one version, one mtime: a listing's LastModified (milliseconds on MinIO
                # and rclone) and a GET's Last-Modified header (seconds) differ, and an
                # mtime that moves makes the kernel drop the file's cached pages
                info = dataclasses.replace(info, mtime=old.mtime)
            node.info = info
            if old is not None and old.version != info.version:
                self._changed(node)
        node.confirmed = seen

    def _changed(self, node: Node) -> None:
        """The object behind ``node`` has a new version: the kernel must drop the old size
        and pages (invalidated in the background, never inside a request on that inode)."""
        if node.ino not in self._kernel_version or self.on_changed is None:
            return
        on_changed = self.on_changed
        ino = node.ino
        try:
            self.reader.start_soon(lambda: on_changed(ino))
        except FusefsError:
            pass  # not serving

    async def _fetch_small(self, info: ObjectInfo) -> ObjectInfo | None:
        """A small object's metadata from a fetch worker's GET of it whole (the worker keeps
        its bytes in the block cache: a read then makes no request); None where the workers
        cannot run (the caller fetches it in a thread instead)."""
        pool = self.reader.pool
        if pool is None or not pool.usable:
            return None
        try:
            got, stored = await pool.get_small(self.reader.block_key(info, 0), info.key,
                                               info.version, info.size)
        except PoolUnavailable:
            return None
        self.reader.stats.add(S.FETCHES)  # the fetch a read of it then saves
        self.reader.stats.add(S.BYTES_FETCHED, info.size)
        if stored is not None:
            self.reader.blocks.stored_elsewhere(*stored)
        return got

    def _seed(self, info: ObjectInfo, data: bytes) -> None:
        """Worker thread: a small object's whole bytes, fetched to learn its type, into the
        block cache (a read then makes no request); counted as the reader's fetch it saves."""
        self.reader.stats.add(S.FETCHES)
        self.reader.stats.add(S.BYTES_FETCHED, len(data))
        if 0 < info.size == len(data) <= self.reader.block_size:
            self.reader.blocks.put(self.reader.block_key(info, 0), data)

    def unsettled(self, node: Node) -> bool:
        """Does ``node``'s stat wait for its metadata (S3: listings lack it; see
        :meth:`Folders.settle`)? Until then the kernel may cache its attributes for no time
        (:meth:`attr_timeout`), so that a ``stat`` asks (GETATTR) and gets them."""
        if node.info is None or not self.folders.unsettled(node.info):
            return False
        return self.writes is None or self.writes.file_of(node) is None

    def attr_timeout(self, node: Node) -> float:
        """How long the kernel may cache ``node``'s attributes."""
        return 0.0 if self.unsettled(node) else self.kernel_timeout

    async def _settle(self, node: Node) -> None:
        """Learn ``node``'s metadata (one request, or a share of one in flight). A failure
        leaves the defaults (asked again at the next stat), never an error for a ``stat``."""
        info = node.info
        assert info is not None
        sent = self.clock()
        try:
            got = await self.folders.settle(info)
        except FusefsError as exc:
            log.info("could not read the metadata of %s: %s", info.key, exc)
            return
        if node.info is info and got is not info and got.version == info.version:
            node.info = got  # same version, its metadata now known
            node.confirmed = max(node.confirmed, sent)

    def _settle_next(self, node: Node) -> None:
        """The kernel asks for the attributes of a file of a folder listed lately: if it walks
        the listing in order (``ls -l``, ``rsync``: a stat per file, one at a time), start
        learning the metadata of the next files (up to the metadata workers' limit ahead of
        it, each once), so that their stats find it done instead of making a round trip each
        in a row. Stats out of order (a training loop's random opens) start nothing: only a
        stat of the first file listed, or of the one listed right after the last one asked;
        nor while a hint stream is open (its prefetch learns the metadata of what it fetches,
        within the cache's bound, which fetches ahead here would not respect)."""
        info = node.info
        assert info is not None
        q = self._to_settle.get(node.path.rpartition("/")[0])
        i = q.index.get(info.key) if q is not None else None
        if q is None or i is None:
            return
        last, q.last = q.last, i
        if i != last + 1 or self.hinting():  # in order: the first listed, or the next one
            return
        window = self.settings.metadata_workers
        for j in range(i + 1, min(i + 1 + window, len(q.infos))):
            if j in q.started or not self.folders.unsettled(q.infos[j]):
                continue
            q.started.add(j)
            try:
                self.reader.start_soon(functools.partial(self._settle_ahead, q.infos[j]))
            except FusefsError:
                return  # not serving: no background work

    async def _learn(self, info: ObjectInfo) -> bool:
        """For the reader (:attr:`Reader.learn`): the first block of an object whose metadata
        is unknown and which :meth:`Folders.settle` fetches whole (a GET that also brings the
        metadata) is fetched that way, so a prefetch (hints) teaches the metadata and the
        program's ``stat`` or ``open`` then asks nothing. False: fetch it as any block."""
        if not self.folders.settles_whole(info):
            return False
        try:
            await self.folders.settle(info)
        except FusefsError as exc:
            log.debug("reading %s with its metadata failed: %s", info.key, exc)
            return False
        return True

    async def _settle_ahead(self, info: ObjectInfo) -> None:
        try:
            await self.folders.settle(info)
        except Exception as exc:  # background: the file's own stat asks again
            log.debug("reading the metadata of %s ahead failed: %s", info.key, exc)

    def dir_mtime(self, path: str) -> float:
        """A folder's mtime: set in memory by this mount (entries changed, utimensat), else
        its marker's (metadata, else the marker's own time), else the mount time."""
        mtime = self.folder_meta.times(path)[0]
        if mtime is not None:
            return mtime
        st = self.folder_meta.state(path)
        marker = st.marker if st is not None else None
        if marker is not None:
            return marker.meta_mtime if marker.meta_mtime is not None else marker.mtime
        return self.mount_time_ns / 1e9

    def attr_known(self, node: Node) -> bool:
        """Are a node's attributes known (False: a folder whose marker was not read yet, whose
        entry the kernel gets with the defaults and no attribute timeout)?"""
        return not node.is_dir or node.ino == ROOT_INO or self.folder_meta.known(node.path)

    def attr(self, node: Node) -> Attr:
        ro = ~0o222 if self.settings.read_only else ~0
        info: ObjectInfo | None = None
        if node.is_dir:
            st = self.folder_meta.state(node.path)
            info = st.marker if st is not None else None
            perm = (capped_dir_mode(info.mode, self.settings)
                    if info is not None and info.mode is not None else self.settings.dir_mode)
            mode = stat.S_IFDIR | (perm & ro)
            # one link (as btrfs): find and du take it as "count unknown" (no leaf shortcut)
            mtime_ns, size, nlink = int(self.dir_mtime(node.path) * 1e9), 0, 1
        else:
            info = node.info
            assert info is not None
            if self.writes is not None:
                sf = self.writes.file_of(node)
                if sf is not None:
                    info = self.writes.info_of(sf)
            info = self.folders.attrs.apply(info)  # learnt since the node's listing
            # a mode kept in metadata (chmod, rsync -a) shows, unless --file-mode was given
            perm = (self.settings.file_mode if info.mode is None or self._file_mode_forced
                    else capped_mode(info.mode, self.settings))
            kind = file_type(info)
            mode = kind | (perm & ro if kind != stat.S_IFLNK else 0o777)  # as links show
            mtime = info.meta_mtime if info.meta_mtime is not None else info.mtime
            # a file that lost its name (unlinked while open) has no link left
            nlink = 1 if self._by_path.get(node.path) is node else 0
            mtime_ns, size = int(mtime * 1e9), info.size
        uid = self.uid if info is None or info.uid is None else info.uid
        gid = self.gid if info is None or info.gid is None else info.gid
        _, ctime, atime = self.folder_meta.times(node.path)
        return Attr(node.ino, mode, size, mtime_ns, (size + 511) // 512, 128 * 1024, nlink,
                    uid, gid, info.rdev or 0 if info is not None and not node.is_dir else 0,
                    int(ctime * 1e9) if ctime is not None else -1,
                    int(atime * 1e9) if atime is not None else -1)

    def mark_stale(self, key: str) -> None:
        """The store said ``key`` changed: distrust what we know of it and of its folder."""
        node = self._by_path.get(key)
        if node is not None:
            node.confirmed = -math.inf
        self.folders.mark_stale(key)

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` references: at zero the node is freed (unless open)."""
        node = self._nodes[ino] if 0 <= ino < len(self._nodes) else None
        if node is None or ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - n)
        if node.lookups == 0 and not self._is_open(node):
            self._free(node)

    def _is_open(self, node: Node) -> bool:
        return any(h.node is node for h in self._handles.values())

    def _free(self, node: Node) -> None:
        self._nodes[node.ino] = None
        self._count -= 1
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        self._kernel_version.pop(node.ino, None)
        self._free_inos.append(node.ino)

    # --- folders ---------------------------------------------------------------------------

    # --- metadata --------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Node:
        """The child ``name`` of a directory, with one more kernel reference; NotFound if it
        does not exist."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        if not valid_name(name):
            check_length(name)
            raise NotFound(f"{name!r}: not a valid name")
        path = join(parent.path, name)
        known = self._by_path.get(path)
        if self.writes is not None:
            ov = self.writes.overlay(path)
            if ov is not None:
                if ov[0]:
                    await self.folder_meta.load(path)
                known = self._node(path, ov[0], ov[1], self.clock())
                known.lookups += 1
                return known
        for attempt in range(2):
            if known is None or not self._fresh(known.confirmed, self.clock()):
                is_dir, info, seen = await self.resolve(parent.path, name)
                if is_dir:
                    await self.folder_meta.load(path)  # its marker: mode, owner, times
                known = self._node(path, is_dir, info, seen)
                break
            if not known.is_dir or attempt or self.folder_meta.known(path):
                break
            # Read the folder's marker before the reference is taken below, and take the
            # node again after: while this waits, a node nobody holds may be freed (and its
            # inode number given to another path), so one made or found before must not be
            # handed to the kernel.
            await self.folder_meta.load(path)
            known = self._by_path.get(path)
        assert known is not None
        known.lookups += 1  # no await between the node's making (or finding) and this
        return known

    async def resolve(self, parent: str, name: str) -> tuple[bool, ObjectInfo | None, float]:
        """(is_dir, info, seen) of ``name`` in folder ``parent`` as the store shows it, less
        what this mount removed and has not deleted yet; NotFound if nothing is there.
        A staged file of this mount whose upload is not :meth:`~Writes.unconfirmed` answers
        for its name without a request (callers ask :meth:`~Writes.overlay` first)."""
        path = join(parent, name)
        sf = self.writes.unconfirmed(path) if self.writes is not None else None
        if sf is not None:
            assert self.writes is not None
            try:
                store: tuple[bool, ObjectInfo | None, float] | None = (
                    await self.folders.resolve(parent, name))
            except NotFound:
                store = None
            ours = self.writes.reconcile(sf, store)
            if ours is not None:
                return ours
            # another writer's object (or none) took the name: the descriptors keep the
            # file they opened, off the name (a new inode for what the store shows)
            self.drop_path(path)
            if store is None:
                raise NotFound(f"{path}: no such file or directory")
            found = store
        else:
            found = await self.folders.resolve(parent, name)
        if self.writes is not None and self.writes.hides(path, found[0], found[1]):
            raise NotFound(f"{path}: no such file or directory")
        return found

    async def getattr(self, ino: int) -> Node:
        if ino == CONTROL_INO:
            raise InvalidArgument("control file attributes come from the control layer")
        node = self.node(ino)
        if node.is_dir and node.ino != ROOT_INO and self._by_path.get(node.path) is node:
            await self.folder_meta.load(node.path)
        if node.ino != ROOT_INO and not self._fresh(node.confirmed, self.clock()):
            if self._by_path.get(node.path) is not node:
                return node  # unlinked or replaced while held: it keeps what it was
            if self.writes is not None and self.writes.overlay(node.path) is not None:
                return node  # this mount's own version: nothing to ask the store
            try:
                await self._revalidate(node)
            except NotFound:
                if not self._is_open(node):
                    raise
                # removed (or replaced by a folder) by another writer while open here: the
                # name is gone, the descriptors keep the file they opened (nlink 0)
                self.drop_path(node.path)
                return node
        if self._to_settle and node.info is not None:
            self._settle_next(node)
        if self.unsettled(node):
            await self._settle(node)
        return node

    async def _revalidate(self, node: Node) -> None:
        """Bring a node's metadata up to date through its folder's ranges (a LIST per range
        block, shared by its neighbours), never a request per file."""
        parent, _, name = node.path.rpartition("/")
        try:
            is_dir, info, seen = await self.resolve(parent, name)
        except NotFound:
            node.confirmed = -math.inf
            raise
        if self._by_path.get(node.path) is not node:
            return  # it lost its name while this asked: it keeps what it was
        if seen_type(node, is_dir, info) != file_type(node.info):
            raise NotFound(f"{node.path}: replaced by a {'folder' if is_dir else 'file'}")
        self._observe(node, info, seen)

    async def refresh_file(self, node: Node) -> None:
        """Re-read a file's metadata from the store (one HEAD)."""
        sent = self.clock()
        try:
            info = await threads.run_sync(self.store.head, node.path,
                                          limiter=self.folders.meta_limiter)
            self.folders.attrs.remember(info)
        except NotFound:
            node.confirmed = -math.inf
            raise
        self._observe(node, info, sent)

    async def readlink(self, ino: int) -> bytes:
        """A link's target: its object's content (staged, or through the block cache)."""
        node = await self.getattr(ino)
        info = node.info
        sf = self.writes.file_of(node) if self.writes is not None else None
        if sf is not None:
            assert self.writes is not None
            info = self.writes.info_of(sf)
        if not is_link(info):
            raise InvalidArgument(f"{node.path or '/'} is not a symbolic link")
        assert info is not None
        if sf is not None:
            assert self.writes is not None
            return bytes(await self.writes.read(sf, 0, info.size))
        return bytes(await self.reader.read(info, 0, info.size, SeqState()))

    async def opendir(self, ino: int) -> int:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory(f"{node.path} is not a directory")
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = DirHandle(node)
        return fh

    async def readdir(self, fh: int, start: int) -> int:
        """Make sure an open directory has its snapshot (made anew when read from offset 0);
        returns the number of entries. :meth:`dir_entry` then hands them out."""
        h = self._dir_handles.get(fh)
        if h is None:
            raise FusefsError(f"unknown directory handle {fh}")
        if h.entries is None or start == 0:
            h.entries, h.listed = await self.folders.listing(h.node.path)
            if self.writes is not None:
                h.entries = self.writes.merge(h.node.path, h.entries, h.listed)
            self._queue_settles(h.node.path, h.entries)
            self.folders.list_ahead(h.node.path, [name for name, is_dir, _ in h.entries if is_dir])
        return len(h.entries)

    def _queue_settles(self, path: str, entries: list[tuple[str, bool, ObjectInfo | None]]
                       ) -> None:
        """Keep the files of a folder snapshot whose metadata is unknown, for :meth:`_settle_next`
        (the last SETTLE_FOLDERS folders)."""
        if self.folders.settle_mode == "off":
            return
        todo: list[ObjectInfo] = []
        for _, is_dir, info in entries:
            if not is_dir and info is not None and self.folders.unsettled(info):
                todo.append(info)
                if len(todo) >= SETTLE_FILES:
                    break
        self._to_settle.pop(path, None)
        if todo:
            self._to_settle[path] = _SettleQueue(todo)
            total = sum(len(q.infos) for q in self._to_settle.values())
            while len(self._to_settle) > SETTLE_FOLDERS or total > SETTLE_FILES:
                total -= len(self._to_settle.popitem(last=False)[1].infos)

    def dir_entry(self, fh: int, i: int) -> tuple[str, Node]:
        """Entry ``i`` of an open directory's snapshot and its node (the caller counts the
        kernel's reference, or calls :meth:`unused` if it could not hand the entry over)."""
        h = self._dir_handles[fh]
        assert h.entries is not None
        name, is_dir, info = h.entries[i]
        path = info.key if info is not None else join(h.node.path, name)
        return name, self._node(path, is_dir, info, h.listed)

    def unused(self, node: Node) -> None:
        """Free a node made for the kernel that the kernel did not take."""
        if node.lookups == 0 and node.ino != ROOT_INO and not self._is_open(node):
            if self._nodes[node.ino] is node:
                self._free(node)

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def entries(self, path: str, *, typed: bool = False) -> list[Entry]:
        """The entries of folder ``path`` for internal users (no nodes are made); ``typed``:
        see :meth:`Folders.listing`."""
        return [Entry(join(path, name), is_dir, info)
                for name, is_dir, info in (await self.folders.listing(path, typed=typed))[0]]

    async def resolve_path(self, path: str) -> Entry:
        """The file or folder at ``path`` (relative to the root) for internal users."""
        if not path:
            return Entry("", True)
        parent, _, name = path.rpartition("/")
        if not valid_name(name):  # the parents are checked as they are resolved below
            raise NotFound(f"{path}: no such file or directory")
        node = self._by_path.get(path)
        if node is not None and self._fresh(node.confirmed, self.clock()):
            return Entry(path, node.is_dir, node.info)
        if parent:
            up = await self.resolve_path(parent)
            if not up.is_dir:
                raise NotFound(f"{path}: no such file or directory")
        is_dir, info, seen = await self.resolve(parent, name)
        if node is not None and node.is_dir == is_dir:
            self._observe(node, info, seen)
        return Entry(path, is_dir, info)

    # --- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; returns (handle, keep_cache). Writing, or reading a file being
        written, goes through the write side (its staged file)."""
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT))
        if writing and (self.writes is None or self.settings.read_only):
            raise ReadOnly("read-only file system")
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
        if self.writes is not None and (writing or self.writes.staged(node.path)):
            if writing and self.writes.staged(node.path) is None and not self._fresh(
                    node.confirmed, self.clock()):
                await self._revalidate(node)  # the version a change is based on
            fh = await self.writes.open(node, flags)
            self._kernel_version.pop(node.ino, None)
            return fh, False
        if not self._fresh(node.confirmed, self.clock()):
            await self._revalidate(node)
        info = node.info
        assert info is not None
        had = self._kernel_version.get(node.ino)
        keep_cache = had == info.version
        if had is not None and not keep_cache and self.on_changed is not None:
            # the kernel may hold the old size: drop it before the program reads
            await self.on_changed(node.ino)
        self._kernel_version[node.ino] = info.version
        return self.new_handle(node, info), keep_cache

    def new_handle(self, node: Node, info: ObjectInfo, staged: StagedFile | None = None,
                   writable: bool = False) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, info, staged=staged, writable=writable)
        return fh

    def handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FusefsError(f"unknown file handle {fh}")
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FusefsError(f"unknown file handle {fh}")
        node = handle.node
        try:
            if self.writes is not None:
                # a handle reads the file it opened: its staged file, or (once this node is
                # being written by another handle) the node's own, never another file's
                sf = handle.staged or self.writes.file_of(node)
                if sf is not None:  # (its unchanged ranges come from the object it is based on)
                    return await self.writes.read(sf, offset, size)
            if node.info is not None and node.info.version != handle.info.version:
                # a newer version was seen: an old handle must not refill the kernel's pages of
                # this inode with old bytes
                raise StaleVersion(f"{node.path}: changed since it was opened")
            return await self.reader.read(handle.info, offset, size, handle.seq)
        except StaleVersion:
            self._kernel_version.pop(node.ino, None)  # the next open drops the kernel's pages
            raise
        except NotFound as exc:  # another writer removed the object this handle reads
            self._kernel_version.pop(node.ino, None)
            raise StaleVersion(f"{node.path}: removed since it was opened") from exc

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        node = handle.node
        if self.writes is not None:
            if handle.staged is not None:
                await self.writes.release(handle.staged, handle.writable)
            if self.writes.deletes.entries:
                self.writes.deletes.kick()  # a delete may have waited for this handle
        if node.lookups == 0 and not self._is_open(node):
            if self._nodes[node.ino] is node:
                self._free(node)

    # --- changes made by this mount (the write side) --------------------------------------

    def is_open(self, node: Node) -> bool:
        return self._is_open(node)

    def reading(self, key: str, version: str) -> bool:
        """Does an open handle read version ``version`` of object ``key`` from the store?"""
        return any(h.staged is None and h.info.key == key and h.info.version == version
                   for h in self._handles.values())

    def staged_of(self, node: Node) -> StagedFile | None:
        """The staged file an open handle of ``node`` holds, if any."""
        for h in self._handles.values():
            if h.node is node and h.staged is not None:
                return h.staged
        return None

    def attach_handles(self, node: Node, staged: StagedFile) -> None:
        """``node`` is staged now: its handles opened before read the staged file (the file's
        bytes as changed by its writers, which is what POSIX readers see), and hold it."""
        for h in self._handles.values():
            if h.node is node and h.staged is None:
                h.staged = staged
                staged.handles += 1

    def retarget_handles(self, old: ObjectInfo, new: ObjectInfo) -> None:
        """Object ``old`` was copied to ``new`` (a rename): handles reading it read the copy."""
        for h in self._handles.values():
            if h.staged is None and h.info.key == old.key and h.info.version == old.version:
                h.info = new

    def file_node(self, path: str, info: ObjectInfo | None) -> Node:
        """The node of a file at ``path`` (made if needed) with ``info``."""
        if info is None:
            info = ObjectInfo(path, 0, time.time(), "")
        return self._node(path, False, info, self.clock())

    def dir_node(self, path: str) -> Node:
        return self._node(path, True, None, self.clock())

    def observed(self, path: str, info: ObjectInfo, sent: float, *, same_bytes: bool) -> None:
        """This mount made ``info`` the object at ``path``. ``same_bytes``: the kernel's
        pages of the file are still right (our own upload, a metadata change)."""
        node = self._by_path.get(path)
        if node is None or node.is_dir:
            return
        if same_bytes:
            if node.ino in self._kernel_version:
                self._kernel_version[node.ino] = info.version
                node.info = info  # no invalidation: the bytes did not change
            # handles of this file read what it now holds, which is this version (an old
            # handle reading the file this mount just wrote is no stale reader)
            for h in self._handles.values():
                if h.node is node and h.staged is None:
                    h.info = info
        self._observe(node, info, max(sent, node.confirmed))

    def drop_path(self, path: str) -> None:
        """``path`` is gone (unlink, rmdir): its node leaves the namespace (the kernel may
        still hold it, and open handles keep it)."""
        node = self._by_path.pop(path, None)
        if node is not None:
            node.confirmed = -math.inf
        self.folder_meta.drop(path)

    def move_path(self, old: str, new: str) -> None:
        """``old`` (a file, or a folder and everything below it) is now ``new``."""
        self.folder_meta.move(old, new)
        for path in [p for p in self._by_path if p == old or p.startswith(old + "/")]:
            node = self._by_path.pop(path)
            moved = new + path[len(old):]
            gone = self._by_path.pop(moved, None)
            if gone is not None:
                gone.confirmed = -math.inf
            if node.info is not None:
                node.info = dataclasses.replace(node.info, key=moved, token=None)
                node._path = None
            else:
                node._path = moved
            self._by_path[moved] = node

    @property
    def open_handles(self) -> int:
        return len(self._handles)
