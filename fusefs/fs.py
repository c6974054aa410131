"""The filesystem core: inodes, the metadata and listing cache, open handles. No pyfuse3 here.

Directories are key prefixes split on ``/``. Inode numbers are stable for the life of the mount:
a (path, is_dir) pair keeps its number even after the kernel forgets it. Metadata and listings
are trusted for ``metadata_ttl`` seconds; missing names for ``negative_ttl``.

Concurrency: every method runs on the trio thread; store calls run in worker threads, so other
requests may interleave at each ``await``. Node fields are replaced whole (``node.info = ...``),
never half-updated, so an interleaved reader sees either the old or the new version.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from . import threads
from .backends.base import ObjectInfo, ObjectStore
from .config import LIST_AHEAD_PARALLEL, Settings
from .errors import (
    FusefsError,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    ReadOnly,
    StaleVersion,
)
from .reader import Reader, SeqState

log = logging.getLogger(__name__)

ROOT_INO = 1
#: The control file's inode; never handed out to an object.
CONTROL_INO = 2
CONTROL_NAME = ".fusefs"
#: Sub-directories listed ahead of a tree walker (per directory read), and how many at once.
LIST_AHEAD_MAX = 1024
LIST_AHEAD_KEYS = 1000
_FIRST_INO = 3


@dataclass
class Node:
    """One file or directory the kernel may know about."""

    ino: int
    path: str  # key relative to the mount root, no trailing slash; "" for the root
    is_dir: bool
    info: ObjectInfo | None = None  # files only
    confirmed: float = 0.0  # monotonic time the store last confirmed this entry
    kernel_version: str | None = None  # version whose pages the kernel may still cache
    listing: dict[str, tuple[bool, ObjectInfo | None]] | None = None  # dirs: name -> entry
    listed: float = 0.0
    lookups: int = 0
    big: bool = False  # dirs: more entries than one listing page (lookups probe names)

    @property
    def size(self) -> int:
        return self.info.size if self.info else 0


@dataclass
class Attr:
    """Attributes as the kernel sees them; converted to pyfuse3's type in fuse_ops."""

    ino: int
    mode: int
    size: int
    mtime_ns: int
    blocks: int
    blksize: int
    nlink: int
    uid: int
    gid: int


@dataclass
class Handle:
    node: Node
    info: ObjectInfo
    seq: SeqState = field(default_factory=SeqState)


def valid_name(name: str) -> bool:
    """Can this key segment be a file name? (no empty, '.', '..', NUL, or > 255 bytes)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "\x00" not in name
        and len(os.fsencode(name)) <= 255
    )


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
        self.ttl = settings.metadata_ttl
        self.negative_ttl = min(settings.negative_ttl, settings.metadata_ttl)
        self.uid = settings.uid if settings.uid is not None else os.getuid()
        self.gid = settings.gid if settings.gid is not None else os.getgid()
        self.mount_time_ns = time.time_ns()
        self._inos: dict[tuple[str, bool], int] = {("", True): ROOT_INO}
        self._nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, "", True)}
        self._next_ino = _FIRST_INO
        self._negative: dict[str, float] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._meta_limiter = trio.CapacityLimiter(settings.metadata_workers)
        self._ahead_limiter = trio.CapacityLimiter(LIST_AHEAD_PARALLEL)
        self._listing_flights: dict[int, trio.Event] = {}
        reader._on_stale = self.mark_stale

    # --- nodes -----------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} unknown") from None

    def _node_for(self, path: str, is_dir: bool, info: ObjectInfo | None, now: float) -> Node:
        ino = self._inos.get((path, is_dir))
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._inos[(path, is_dir)] = ino
            self._nodes[ino] = Node(ino, path, is_dir)
        node = self._nodes[ino]
        if not is_dir:
            node.info = info
        node.confirmed = now
        return node

    def node_by_path(self, path: str) -> Node | None:
        for is_dir in (False, True):
            ino = self._inos.get((path, is_dir))
            if ino is not None:
                return self._nodes[ino]
        return None

    def attr(self, node: Node) -> Attr:
        ro = ~0o222 if self.settings.read_only else ~0
        if node.is_dir:
            mode = stat.S_IFDIR | (self.settings.dir_mode & ro)
            mtime_ns, size, nlink = self.mount_time_ns, 0, 2
        else:
            assert node.info is not None
            mode = stat.S_IFREG | (self.settings.file_mode & ro)
            mtime_ns, size, nlink = int(node.info.mtime * 1e9), node.info.size, 1
        return Attr(
            node.ino,
            mode,
            size,
            mtime_ns,
            (size + 511) // 512,
            128 * 1024,
            nlink,
            self.uid,
            self.gid,
        )

    def mark_stale(self, key: str) -> None:
        """The store said ``key`` changed: distrust what we know of it and its directory."""
        node = self.node_by_path(key)
        if node is not None:
            node.confirmed = 0.0
        parent = self.node_by_path(key.rpartition("/")[0]) if "/" in key else self._nodes[ROOT_INO]
        if parent is not None:
            parent.listed = 0.0

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is not None:
            node.lookups = max(0, node.lookups - n)

    # --- metadata --------------------------------------------------------------------------

    async def _thread(self, fn: Callable[..., object], *args: object) -> object:
        return await threads.run_sync(fn, *args, limiter=self._meta_limiter)

    def _fresh(self, t: float, now: float) -> bool:
        return t > 0 and now - t < self.ttl

    async def lookup(self, parent_ino: int, name: str) -> Node:
        """The child ``name`` of a directory; NotFound if it does not exist."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        if not valid_name(name):
            raise NotFound(f"{name!r}: not a valid name")
        path = f"{parent.path}/{name}" if parent.path else name
        now = self.clock()
        known = self.node_by_path(path)
        if known is not None and self._fresh(known.confirmed, now):
            known.lookups += 1
            return known
        # a folder of more than one page (``big``) is not listed for a lookup: names are probed
        if not parent.big and not (parent.listing is not None and self._fresh(parent.listed, now)):
            # One listing page answers this and every sibling's lookup in one round trip;
            # concurrent lookups in the same folder share it (single flight).
            try:
                await self._ensure_listing(parent, now, max_keys=LIST_AHEAD_KEYS)
            except FusefsError as exc:  # e.g. listing not allowed: ask about the name itself
                log.debug("listing %r for a lookup failed: %s", parent.path, exc)
            now = self.clock()
        if parent.listing is not None and self._fresh(parent.listed, now):
            entry = parent.listing.get(name)
            if entry is None:
                raise NotFound(f"{path}: no such file or directory")
            node = self._node_for(path, entry[0], entry[1], parent.listed)
            node.lookups += 1
            return node
        neg = self._negative.get(path)
        if neg is not None and now - neg < self.negative_ttl:
            raise NotFound(f"{path}: no such file or directory (cached)")
        node = await self._probe(path)
        node.lookups += 1
        return node

    async def _probe(self, path: str) -> Node:
        """Ask the store whether ``path`` is a directory (a prefix) or a file, in parallel."""
        result: dict[str, object] = {}

        async def head() -> None:
            try:
                result["file"] = await self._thread(self.store.head, path)
            except NotFound:
                pass

        async def is_dir() -> None:
            pages = await self._thread(
                lambda: next(iter(self.store.list(path + "/", max_keys=1)), None)
            )
            if pages is not None and (pages.objects or pages.prefixes):  # type: ignore[attr-defined]
                result["dir"] = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(head)
            nursery.start_soon(is_dir)
        now = self.clock()
        if "dir" in result:
            if "file" in result:
                log.warning("%s is both an object and a prefix; showing the directory", path)
            self._negative.pop(path, None)
            return self._node_for(path, True, None, now)
        info = result.get("file")
        if isinstance(info, ObjectInfo):
            self._negative.pop(path, None)
            return self._node_for(path, False, info, now)
        self._negative[path] = now
        if len(self._negative) > 100_000:
            self._negative.clear()
        raise NotFound(f"{path}: no such file or directory")

    async def getattr(self, ino: int) -> Node:
        if ino == CONTROL_INO:
            raise InvalidArgument("control file attributes come from the control layer")
        node = self.node(ino)
        if not node.is_dir and not self._fresh(node.confirmed, self.clock()):
            await self.refresh_file(node)
        return node

    async def refresh_file(self, node: Node) -> None:
        """Re-read a file's metadata from the store (one HEAD)."""
        try:
            info = await self._thread(self.store.head, node.path)
        except NotFound:
            node.confirmed = 0.0
            raise
        assert isinstance(info, ObjectInfo)
        node.info = info
        node.confirmed = self.clock()

    async def listdir(self, ino: int) -> list[tuple[str, Node]]:
        """Entries of a directory, sorted by name; fills the metadata cache for later lookups."""
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectory(f"{node.path} is not a directory")
        now = self.clock()
        await self._ensure_listing(node, now)
        assert node.listing is not None
        listed = node.listed
        out = []
        for name in sorted(node.listing):
            is_dir, info = node.listing[name]
            path = f"{node.path}/{name}" if node.path else name
            out.append((name, self._node_for(path, is_dir, info, listed)))
        self._list_ahead([n for _, n in out if n.is_dir])
        return out

    async def _ensure_listing(
        self, node: Node, now: float, *, max_keys: int | None = None, ahead: bool = False
    ) -> None:
        """Make ``node.listing`` fresh; one listing per directory at a time (single flight).

        ``max_keys``: list at most about that many entries (one page), and keep the listing
        only if that was the whole directory. ``ahead``: a speculative background listing
        (its own, smaller thread limit).
        """
        while not (node.listing is not None and self._fresh(node.listed, now)):
            flight = self._listing_flights.get(node.ino)
            if flight is None:
                break
            await flight.wait()  # then re-check: if that listing failed, try ourselves
            now = self.clock()
        else:
            return
        flight = self._listing_flights[node.ino] = trio.Event()
        try:
            prefix = node.path + "/" if node.path else ""
            limiter = self._ahead_limiter if ahead else self._meta_limiter
            result = await threads.run_sync(self._list_all, prefix, max_keys, limiter=limiter)
            listing, complete = result
            if complete:
                node.listing, node.listed = listing, self.clock()
            else:
                node.big = True
        finally:
            del self._listing_flights[node.ino]
            flight.set()

    def _list_ahead(self, dirs: list[Node]) -> None:
        """List sub-directories in the background, one level ahead of a tree walker."""
        now = self.clock()
        todo = [
            d
            for d in dirs
            if not (d.listing is not None and self._fresh(d.listed, now))
            and d.ino not in self._listing_flights
        ][:LIST_AHEAD_MAX]

        async def one(d: Node) -> None:
            try:
                await self._ensure_listing(d, self.clock(), max_keys=LIST_AHEAD_KEYS, ahead=True)
            except Exception as exc:  # speculative: the walker will list it and see the error
                log.debug("list-ahead of %s failed: %s", d.path, exc)

        for d in todo:
            try:
                self.reader.start_soon(functools.partial(one, d))
            except FusefsError:
                return  # not serving (no background nursery)

    def _list_all(
        self, prefix: str, max_keys: int | None = None
    ) -> tuple[dict[str, tuple[bool, ObjectInfo | None]], bool]:
        """Worker thread: a delimited listing as name -> (is_dir, info), all pages or about
        ``max_keys`` entries; and whether it is known to be complete."""
        entries: dict[str, tuple[bool, ObjectInfo | None]] = {}
        skipped: list[str] = []
        seen = 0
        for page in self.store.list(prefix, max_keys=max_keys):
            seen += len(page.objects) + len(page.prefixes)
            for p in page.prefixes:
                name = p[len(prefix) :].rstrip("/") if p.endswith("/") else p[len(prefix) :]
                if p[len(prefix) :].count("/") != 1 or not valid_name(name):
                    skipped.append(p)
                    continue
                if name in entries and not entries[name][0]:
                    log.warning(
                        "%s%s is both an object and a prefix; showing the directory", prefix, name
                    )
                entries[name] = (True, None)
            for o in page.objects:
                name = o.key[len(prefix) :]
                if name == "":
                    continue  # the folder marker of this directory itself
                if not valid_name(name) or "/" in name:
                    skipped.append(o.key)
                    continue
                if name in entries:
                    log.warning("%s is both an object and a prefix; showing the directory", o.key)
                    continue
                entries[name] = (False, o)
        complete = max_keys is None or seen < max_keys
        if skipped and complete:
            log.warning(
                "skipped %d key(s) under %r that are not valid file names, e.g. %r",
                len(skipped),
                prefix,
                skipped[0],
            )
        return entries, complete

    # --- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file for reading; returns (handle, keep_cache)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("read-only file system")
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
        if not self._fresh(node.confirmed, self.clock()):
            await self.refresh_file(node)
        info = node.info
        assert info is not None
        keep_cache = node.kernel_version == info.version
        node.kernel_version = info.version
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, info)
        return fh, keep_cache

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FusefsError(f"unknown file handle {fh}")
        try:
            return await self.reader.read(handle.info, offset, size, handle.seq)
        except StaleVersion:
            handle.node.kernel_version = None  # the next open drops the kernel's pages
            raise

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @property
    def open_handles(self) -> int:
        return len(self._handles)
