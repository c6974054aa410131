"""The filesystem core: inodes, lookups, freshness, open handles. No pyfuse3 here.

Directories are key prefixes split on ``/``. Names are resolved by :mod:`fusefs.folders` (listed
key ranges: most lookups make no request). A file's metadata is the newest observation of it (a
listing or a HEAD, by the time the request was sent): an older one never replaces it, and a new
version makes the kernel drop the inode's cached size and pages (``on_changed``).

Inodes: a node exists while the kernel holds it (its lookup count, from LOOKUP replies and
READDIRPLUS entries, is above zero) or a handle is open on it; ``forget`` frees it, and its
number may be given to another path later. Internal users (the control file) resolve paths to
:class:`Entry` values, which are not nodes and hold nothing.

Parts, mixed into :class:`FileSystem`: :mod:`fusefs.fs_resolve` (a name as the store shows it,
reconciled with this mount's staged files and pending deletes), :mod:`fusefs.fs_settle` (the
metadata listings lack, probed per file), :mod:`fusefs.fs_attrs` (what ``stat`` shows) and
:mod:`fusefs.fs_changes` (what the write side tells the nodes and handles).

Concurrency: every method runs on the trio thread; store calls run in worker threads, so other
requests may interleave at each ``await``. Node fields are replaced whole, never half-updated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

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
from .fs_attrs import StatAttrs
from .fs_changes import MountChanges
from .fs_resolve import Resolving
from .fs_settle import SettleQueue, Settling
from .kinds import file_type, is_link
from .nodes import (
    ROOT_INO,
    DirHandle,
    Entry,
    Handle,
    Node,
    seen_type,
)
from .reader import Reader, SeqState

if TYPE_CHECKING:
    from .write.staged import StagedFile
    from .write.writes import Writes

log = logging.getLogger(__name__)

#: The control file's inode; never handed out to an object.
CONTROL_INO = 2
CONTROL_NAME = ".fusefs"
#: Longest entry/attribute timeout given to the kernel (a "forever" TTL becomes this).
MAX_KERNEL_TIMEOUT = 365 * 86400.0


class FileSystem(Settling, StatAttrs, Resolving, MountChanges):
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
        self._to_settle: OrderedDict[str, SettleQueue] = OrderedDict()

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

    def attr_timeout(self, node: Node) -> float:
        """How long the kernel may cache ``node``'s attributes."""
        return 0.0 if self.unsettled(node) else self.kernel_timeout

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

    @property
    def open_handles(self) -> int:
        return len(self._handles)
