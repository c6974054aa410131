"""The filesystem core: inodes, what is known of folders, open handles. No pyfuse3 here.

Directories are key prefixes split on ``/``. What fusefs knows of a folder's keys is a set of
listed key ranges (:mod:`fusefs.listing`): a lookup whose name falls in a fresh range is
answered from memory, present or absent, without a request. A lookup that misses lists the
folder starting just before the name (one LIST of up to 1,000 keys, kept as a range); a folder
looked up in more than once is filled in the background, page after page, so opening K names by
path in a folder of N objects costs about min(K, N/1000) LISTs. Lookups in one folder wait for a
fill page that may answer them (up to ``FILL_WAIT_PAGES``) before listing on their own.

Freshness: a range is trusted for ``metadata_ttl`` seconds (``inf``: forever), a name absent
from it for ``negative_ttl``; an expired range is re-listed block by block (one LIST per 1,000
entries), never with a request per file. A file's metadata is the newest observation of it
(a listing or a HEAD, by the time the request was sent): an older one never replaces it.

Inodes: a node exists while the kernel holds it (its lookup count, from LOOKUP replies and
READDIRPLUS entries, is above zero) or a handle is open on it; ``forget`` frees it, and its
number may be given to another path later. Internal users (the control file) resolve paths to
:class:`Entry` values, which are not nodes and hold nothing.

Concurrency: every method runs on the trio thread; store calls run in worker threads, so other
requests may interleave at each ``await``. Node fields are replaced whole, never half-updated.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
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
    single_error,
)
from .listing import PAGE, DirListing, Flight, Range, page_items, range_end
from .reader import Reader, SeqState

log = logging.getLogger(__name__)

ROOT_INO = 1
#: The control file's inode; never handed out to an object.
CONTROL_INO = 2
CONTROL_NAME = ".fusefs"
#: Fill pages a lookup waits for before it lists on its own (a folder of up to this many
#: thousand entries is listed once, in order, however its names are looked up).
FILL_WAIT_PAGES = 5
#: Entries a fill lists at most in one folder (the rest is listed range by range on demand).
FILL_MAX_ENTRIES = 200_000
#: Entries kept in listing ranges over all folders; beyond, the least recently used folders'
#: ranges are dropped (about 100-250 bytes an entry, most of it shared with nodes).
MAX_LISTED_ENTRIES = 1_000_000
#: Sub-folders listed ahead of a tree walker, per folder snapshot (LIST_AHEAD_PARALLEL at once).
LIST_AHEAD_MAX = 256
#: Longest entry/attribute timeout given to the kernel (a "forever" TTL becomes this).
MAX_KERNEL_TIMEOUT = 365 * 86400.0


class Node:
    """A file or directory the kernel holds (or an open handle refers to).

    Small on purpose (a walk of a million objects keeps a million nodes while the kernel
    holds them): a file's path is its info's key (the same string), a directory is a node
    without info."""

    __slots__ = ("ino", "_path", "info", "confirmed", "lookups")

    def __init__(self, ino: int, path: str, is_dir: bool, info: ObjectInfo | None,
                 confirmed: float) -> None:
        self.ino = ino
        # key relative to the mount root, no trailing slash ("" for the root): a file's is
        # ``info.key``, only folders keep their own
        self._path = path if is_dir or info is None or info.key != path else None
        self.info = None if is_dir else info
        self.confirmed = confirmed  # monotonic time of the observation ``info`` comes from
        self.lookups = 0

    @property
    def is_dir(self) -> bool:
        return self.info is None

    @property
    def path(self) -> str:
        if self._path is not None:
            return self._path
        assert self.info is not None
        return self.info.key

    @property
    def size(self) -> int:
        return self.info.size if self.info else 0


@dataclass(frozen=True, slots=True)
class Entry:
    """A path resolved for an internal user (the control file): not a node, holds nothing."""

    path: str
    is_dir: bool
    info: ObjectInfo | None = None


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


@dataclass
class DirHandle:
    """An open directory: a snapshot of its entries, so readdir offsets stay stable and a big
    folder is listed and sorted once per ``opendir``, not once per kernel request."""

    node: Node
    entries: list[tuple[str, bool, ObjectInfo | None]] | None = None
    listed: float = 0.0


def valid_name(name: str) -> bool:
    """Can this key segment be a file name? (no empty, '.', '..', NUL, or > 255 bytes)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "\x00" not in name
        and len(os.fsencode(name)) <= 255
    )


def _prefix(path: str) -> str:
    return path + "/" if path else ""


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


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
        root = Node(ROOT_INO, "", True, None, math.inf)
        #: Indexed by inode number (a list: 8 bytes a node, numbers of freed nodes reused).
        self._nodes: list[Node | None] = [None, root, None]
        self._by_path: dict[str, Node] = {"": root}
        self._free_inos: list[int] = []
        self._count = 1
        #: Version whose pages the kernel may cache, per inode opened at least once.
        self._kernel_version: dict[int, str] = {}
        self._dirs: OrderedDict[str, DirListing] = OrderedDict()  # by path, LRU order
        self._listed_entries = 0
        self._negative: dict[str, float] = {}
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._meta_limiter = trio.CapacityLimiter(settings.metadata_workers)
        self._ahead_limiter = trio.CapacityLimiter(LIST_AHEAD_PARALLEL)
        #: Called (awaited) with an inode whose object changed version while the kernel may
        #: cache its attributes or pages; set by the FUSE adapter.
        self.on_changed: Callable[[int], Awaitable[None]] | None = None
        self.lists = 0  # LISTs sent (for stats and tests)
        self._lists_after: bool = getattr(store, "lists_after", True)
        self.set_ttls(settings.metadata_ttl, settings.negative_ttl)
        reader._on_stale = self.mark_stale

    def set_ttls(self, metadata_ttl: float, negative_ttl: float) -> None:
        self.ttl = metadata_ttl
        self.negative_ttl = min(negative_ttl, metadata_ttl)

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
        if node is not None and node.is_dir != is_dir:
            # a file became a folder or the other way round: a new inode; the kernel may still
            # hold the old one until it forgets it
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

    def _observe(self, node: Node, info: ObjectInfo | None, seen: float) -> None:
        """Take a newer observation of a node; an older one than what it has is ignored."""
        if seen < node.confirmed:
            return
        if not node.is_dir and info is not None:
            old = node.info
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

    def attr(self, node: Node) -> Attr:
        ro = ~0o222 if self.settings.read_only else ~0
        if node.is_dir:
            mode = stat.S_IFDIR | (self.settings.dir_mode & ro)
            mtime_ns, size, nlink = self.mount_time_ns, 0, 2
        else:
            assert node.info is not None
            mode = stat.S_IFREG | (self.settings.file_mode & ro)
            mtime_ns, size, nlink = int(node.info.mtime * 1e9), node.info.size, 1
        return Attr(node.ino, mode, size, mtime_ns, (size + 511) // 512, 128 * 1024, nlink,
                    self.uid, self.gid)

    def mark_stale(self, key: str) -> None:
        """The store said ``key`` changed: distrust what we know of it and of its folder."""
        node = self._by_path.get(key)
        if node is not None:
            node.confirmed = -math.inf
        d = self._dirs.get(key.rpartition("/")[0])
        if d is not None:
            r = d.find(key)
            if r is not None:
                r.listed = -math.inf

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` references: at zero the node is freed (unless open)."""
        node = self._nodes[ino] if 0 <= ino < len(self._nodes) else None
        if node is None or ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - n)
        if node.lookups == 0 and not any(h.node is node for h in self._open_on(node)):
            self._free(node)

    def _open_on(self, node: Node) -> list[Handle]:
        return [h for h in self._handles.values() if h.node is node] if self._handles else []

    def _free(self, node: Node) -> None:
        self._nodes[node.ino] = None
        self._count -= 1
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]
        self._kernel_version.pop(node.ino, None)
        self._free_inos.append(node.ino)

    # --- folders ---------------------------------------------------------------------------

    def _fresh(self, t: float, now: float) -> bool:
        return now - t < self.ttl

    def _dir(self, path: str) -> DirListing:
        d = self._dirs.get(path)
        if d is None:
            d = self._dirs[path] = DirListing()
        else:
            self._dirs.move_to_end(path)
        return d

    async def _list_range(
        self, path: str, start: str, max_keys: int | None, *, flight: Flight | None = None,
        ahead: bool = False,
    ) -> Range:
        """LIST folder ``path`` after key ``start`` (about ``max_keys`` entries, or all) and
        keep the page as a range. Concurrent lookups may wait on it (:meth:`_resolve`);
        ``flight``: already registered by the caller (a fill's next page)."""
        d = self._dir(path)
        sent = self.clock()
        if flight is None:
            flight = Flight(start, False)
            d.flights.append(flight)
        try:
            # speculative listings hold a slot of their own already (see _list_ahead)
            r = await threads.run_sync(self._fetch_range, path, start, max_keys, sent,
                                       limiter=None if ahead else self._meta_limiter)
        finally:
            if flight in d.flights:
                d.flights.remove(flight)
            flight.done.set()
        self.lists += 1
        d = self._dir(path)  # (it may have been evicted meanwhile)
        self._listed_entries += d.insert(r, merge_within=max(1.0, min(self.ttl, 60.0) / 4))
        self._negative_clear(path)
        self._bound_listings(keep=path)
        return r

    def _fetch_range(self, path: str, start: str, max_keys: int | None, sent: float) -> Range:
        """Worker thread: one LIST (all pages if ``max_keys`` is None) as a range."""
        prefix = _prefix(path)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        more = False
        for page in self.store.list(prefix, max_keys=max_keys, start_after=start):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
            more = page.more
        keys: list[str] = []
        infos: list[ObjectInfo | None] = []
        skipped: list[str] = []
        last = ""
        n = len(prefix)
        for key, info in page_items(objects, prefixes):
            last = key
            name = key[n:-1] if info is None else key[n:]
            if key == prefix or not name or (info is not None and "/" in name):
                continue  # this folder's own marker, or not directly below it
            if not valid_name(name):
                skipped.append(key)
                continue
            keys.append(key)
            infos.append(info)
        if skipped:
            log.warning("skipped %d key(s) under %r that are not valid file names, e.g. %r",
                        len(skipped), prefix, skipped[0])
        hi = (range_end(last) if last else start) if more else None
        return Range(start, hi, sent, keys, infos)

    def _bound_listings(self, keep: str) -> None:
        """Drop the ranges of the least recently used folders beyond MAX_LISTED_ENTRIES
        (never those of ``keep`` or of a folder with a listing in flight)."""
        if self._listed_entries <= MAX_LISTED_ENTRIES:
            return
        for path, d in list(self._dirs.items()):
            if self._listed_entries <= MAX_LISTED_ENTRIES:
                return
            if path == keep or d.flights or d.filling or d.full_flight is not None:
                continue
            self._listed_entries -= d.clear()
            del self._dirs[path]

    def _negative_clear(self, path: str) -> None:
        if self._negative:
            pre = _prefix(path)
            for k in [k for k in self._negative if k.startswith(pre)]:
                del self._negative[k]

    async def _resolve(self, dir_path: str, name: str) -> tuple[bool, ObjectInfo | None, float]:
        """(is_dir, info, seen) of ``name`` in folder ``dir_path``; NotFound if absent.

        Answers from a fresh range when one covers the name; otherwise waits for a listing in
        flight that may answer it, re-lists an expired range's block, or lists from just
        before the name. The first miss in a folder starts a fill of the whole folder."""
        prefix = _prefix(dir_path)
        okey, dkey = prefix + name, prefix + name + "/"
        waited_fill = waited_other = 0
        listed_here = 0
        while True:
            now = self.clock()
            d = self._dir(dir_path)
            r = d.find(okey)
            covered = r is not None and r.covers(dkey)
            if r is not None and covered and self._fresh(r.listed, now):
                as_dir, as_file = r.get(dkey), r.get(okey)
                if as_dir:
                    if as_file:
                        log.warning("%s is both an object and a prefix; showing the directory",
                                    okey)
                    return True, None, r.listed
                if as_file:
                    assert isinstance(as_file, ObjectInfo)
                    return False, as_file, r.listed
                if now - r.listed < self.negative_ttl:
                    raise NotFound(f"{okey}: no such file or directory")
                start = r.block_start(okey)  # absent for longer than the negative TTL: re-list
            else:
                flight = d.flight_for(okey)
                if flight is not None and (
                    (flight.fill and waited_fill < FILL_WAIT_PAGES)
                    or (not flight.fill and waited_other < 2)
                ):
                    if flight.fill:
                        waited_fill += 1
                    else:
                        waited_other += 1
                    await flight.done.wait()
                    continue
                if not self._lists_after:
                    # the store cannot list from a key (Azure): list the whole folder, once,
                    # shared by every lookup in it
                    if listed_here >= 2:
                        return await self._probe(_join(dir_path, name))
                    listed_here += 1
                    await self._listing(dir_path)
                    continue
                if r is not None and covered:
                    start = r.block_start(okey)  # expired: re-list the block that holds it
                elif not d.ranges and not d.flights:
                    start = ""  # a folder not seen yet: its first page (all of a small one)
                elif self._maybe_fill(dir_path):
                    continue  # a fill page is now in flight: wait for it
                else:
                    start = okey[:-1]  # list from just before the name
            if listed_here >= 3:  # the pages did not settle it (many keys between the file
                return await self._probe(_join(dir_path, name))  # and the folder key)
            listed_here += 1
            await self._list_range(dir_path, start, PAGE)

    def _maybe_fill(self, dir_path: str) -> bool:
        """Start listing the whole folder in the background, page after page, skipping what
        fresh ranges already cover (one fill per folder at a time). True if one started: its
        first page is registered as a flight before this returns, so lookups can wait on it."""
        d = self._dir(dir_path)
        pos = d.next_gap("", self.clock() - self.ttl)
        if d.filling or pos is None:
            return False
        d.filling = True
        first = Flight(pos, True)
        d.flights.append(first)

        async def fill() -> None:
            flight: Flight | None = first
            at: str | None = pos
            listed = 0
            try:
                while at is not None and listed < FILL_MAX_ENTRIES:
                    r = await self._list_range(dir_path, at, PAGE, flight=flight)
                    listed += len(r) or 1
                    if r.hi is None:
                        return
                    at = self._dir(dir_path).next_gap(r.hi, self.clock() - self.ttl)
                    flight = None
                    if at is not None:
                        flight = Flight(at, True)
                        self._dir(dir_path).flights.append(flight)
            except Exception as exc:  # background: lookups list on their own
                log.info("listing %r in the background failed: %s", dir_path, exc)
            finally:
                d = self._dir(dir_path)
                d.filling = False
                if flight is not None and flight in d.flights:
                    d.flights.remove(flight)
                    flight.done.set()

        try:
            self.reader.start_soon(fill)
        except FusefsError:  # not serving: lookups list on their own
            d.filling = False
            d.flights.remove(first)
            first.done.set()
            return False
        return True

    async def _probe(self, path: str) -> tuple[bool, ObjectInfo | None, float]:
        """Ask the store whether ``path`` is a folder (a prefix) or a file: a HEAD and a
        one-key LIST in parallel. Used where listing is refused or did not settle a name."""
        neg = self._negative.get(path)
        now = self.clock()
        if neg is not None and now - neg < self.negative_ttl:
            raise NotFound(f"{path}: no such file or directory (cached)")
        result: dict[str, object] = {}

        async def head() -> None:
            try:
                result["file"] = await threads.run_sync(self.store.head, path,
                                                        limiter=self._meta_limiter)
            except NotFound:
                pass

        async def is_dir() -> None:
            page = await threads.run_sync(
                lambda: next(iter(self.store.list(path + "/", max_keys=1)), None),
                limiter=self._meta_limiter,
            )
            if page is not None and (page.objects or page.prefixes):
                result["dir"] = True

        with single_error():  # a refusal stays EACCES, not an exception group
            async with trio.open_nursery() as nursery:
                nursery.start_soon(head)
                nursery.start_soon(is_dir)
        if "dir" in result:
            if "file" in result:
                log.warning("%s is both an object and a prefix; showing the directory", path)
            return True, None, now
        info = result.get("file")
        if isinstance(info, ObjectInfo):
            return False, info, now
        self._negative[path] = now
        if len(self._negative) > 100_000:
            self._negative.clear()
        raise NotFound(f"{path}: no such file or directory")

    async def _resolve_or_probe(
        self, dir_path: str, name: str
    ) -> tuple[bool, ObjectInfo | None, float]:
        try:
            return await self._resolve(dir_path, name)
        except NotFound:
            raise
        except FusefsError as exc:  # e.g. listing not allowed: ask about the name itself
            log.debug("listing %r for a lookup failed: %s", dir_path, exc)
            return await self._probe(_join(dir_path, name))

    # --- metadata --------------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Node:
        """The child ``name`` of a directory, with one more kernel reference; NotFound if it
        does not exist."""
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        if not valid_name(name):
            raise NotFound(f"{name!r}: not a valid name")
        path = _join(parent.path, name)
        known = self._by_path.get(path)
        if known is None or not self._fresh(known.confirmed, self.clock()):
            is_dir, info, seen = await self._resolve_or_probe(parent.path, name)
            known = self._node(path, is_dir, info, seen)
        known.lookups += 1
        return known

    async def getattr(self, ino: int) -> Node:
        if ino == CONTROL_INO:
            raise InvalidArgument("control file attributes come from the control layer")
        node = self.node(ino)
        if node.ino != ROOT_INO and not self._fresh(node.confirmed, self.clock()):
            await self._revalidate(node)
        return node

    async def _revalidate(self, node: Node) -> None:
        """Bring a node's metadata up to date through its folder's ranges (a LIST per range
        block, shared by its neighbours), never a request per file."""
        parent, _, name = node.path.rpartition("/")
        try:
            is_dir, info, seen = await self._resolve_or_probe(parent, name)
        except NotFound:
            node.confirmed = -math.inf
            raise
        if is_dir != node.is_dir:
            raise NotFound(f"{node.path}: replaced by a {'folder' if is_dir else 'file'}")
        self._observe(node, info, seen)

    async def refresh_file(self, node: Node) -> None:
        """Re-read a file's metadata from the store (one HEAD)."""
        sent = self.clock()
        try:
            info = await threads.run_sync(self.store.head, node.path, limiter=self._meta_limiter)
        except NotFound:
            node.confirmed = -math.inf
            raise
        self._observe(node, info, sent)

    async def _listing(
        self, path: str
    ) -> tuple[list[tuple[str, bool, ObjectInfo | None]], float]:
        """All entries of folder ``path`` as (name, is_dir, info), from a fresh complete range
        or one complete listing (shared by concurrent callers); and when it was listed."""
        while True:
            d = self._dir(path)
            r = d.complete(self.clock() - self.ttl)
            if r is not None:
                break
            if d.full_flight is not None:
                await d.full_flight.wait()
                continue
            head = next((f for f in d.flights if f.start == ""), None)
            if head is not None:  # a first page on its way (listed ahead, or by a lookup):
                await head.done.wait()  # all of a small folder; started, so never a delay
                if d.complete(self.clock() - self.ttl) is not None:
                    continue
            d.full_flight = trio.Event()
            try:
                r = await self._list_range(path, "", None)
            finally:
                d.full_flight.set()
                d.full_flight = None
            break
        n = len(_prefix(path))
        out: list[tuple[str, bool, ObjectInfo | None]] = []
        dirs = {k[n:-1] for k, i in zip(r.keys, r.infos, strict=True) if i is None}
        for key, info in zip(r.keys, r.infos, strict=True):
            if info is None:
                out.append((key[n:-1], True, None))
            elif key[n:] in dirs:
                log.warning("%s is both an object and a prefix; showing the directory", key)
            else:
                out.append((key[n:], False, info))
        return out, r.listed

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
            h.entries, h.listed = await self._listing(h.node.path)
            self._list_ahead(h.node.path, [name for name, is_dir, _ in h.entries if is_dir])
        return len(h.entries)

    def dir_entry(self, fh: int, i: int) -> tuple[str, Node]:
        """Entry ``i`` of an open directory's snapshot and its node (the caller counts the
        kernel's reference, or calls :meth:`unused` if it could not hand the entry over)."""
        h = self._dir_handles[fh]
        assert h.entries is not None
        name, is_dir, info = h.entries[i]
        path = info.key if info is not None else _join(h.node.path, name)
        return name, self._node(path, is_dir, info, h.listed)

    def unused(self, node: Node) -> None:
        """Free a node made for the kernel that the kernel did not take."""
        if node.lookups == 0 and node.ino != ROOT_INO and not self._open_on(node):
            if self._nodes[node.ino] is node:
                self._free(node)

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def entries(self, path: str) -> list[Entry]:
        """The entries of folder ``path`` for internal users (no nodes are made)."""
        return [Entry(_join(path, name), is_dir, info)
                for name, is_dir, info in (await self._listing(path))[0]]

    async def resolve_path(self, path: str) -> Entry:
        """The file or folder at ``path`` (relative to the root) for internal users."""
        if not path:
            return Entry("", True)
        parent, _, name = path.rpartition("/")
        if not valid_name(name) or any(not valid_name(p) for p in path.split("/")):
            raise NotFound(f"{path}: no such file or directory")
        node = self._by_path.get(path)
        if node is not None and self._fresh(node.confirmed, self.clock()):
            return Entry(path, node.is_dir, node.info)
        if parent:
            up = await self.resolve_path(parent)
            if not up.is_dir:
                raise NotFound(f"{path}: no such file or directory")
        is_dir, info, seen = await self._resolve_or_probe(parent, name)
        if node is not None and node.is_dir == is_dir:
            self._observe(node, info, seen)
        return Entry(path, is_dir, info)

    def _list_ahead(self, path: str, names: list[str]) -> None:
        """List sub-folders' first pages in the background, one level ahead of a tree walker:
        at most LIST_AHEAD_MAX per folder snapshot, on their own slots, never in the way of a
        program's own listing (which does not wait for a speculative one)."""
        todo = []
        for name in names:
            sub = _join(path, name)
            d = self._dirs.get(sub)
            if d is None or not (d.ranges or d.flights or d.full_flight):
                todo.append(sub)
                if len(todo) >= LIST_AHEAD_MAX:
                    break

        async def one(sub: str) -> None:
            async with self._ahead_limiter:  # a slot first: queued speculation holds nothing
                d = self._dirs.get(sub)
                if d is not None and (d.ranges or d.flights or d.full_flight is not None):
                    return  # listed meanwhile, by the walker itself
                try:
                    await self._list_range(sub, "", PAGE, ahead=True)
                except Exception as exc:  # speculative: the walker will list it and see it
                    log.debug("list-ahead of %s failed: %s", sub, exc)

        for sub in todo:
            try:
                self.reader.start_soon(lambda sub=sub: one(sub))  # type: ignore[misc]
            except FusefsError:
                return  # not serving (no background nursery)

    # --- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file for reading; returns (handle, keep_cache)."""
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise ReadOnly("read-only file system")
        node = self.node(ino)
        if node.is_dir:
            raise IsADirectory(f"{node.path} is a directory")
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
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node, info)
        return fh, keep_cache

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FusefsError(f"unknown file handle {fh}")
        node = handle.node
        if node.info is not None and node.info.version != handle.info.version:
            # a newer version was seen: an old handle must not refill the kernel's pages of
            # this inode with old bytes
            raise StaleVersion(f"{node.path}: changed since it was opened")
        try:
            return await self.reader.read(handle.info, offset, size, handle.seq)
        except StaleVersion:
            self._kernel_version.pop(node.ino, None)  # the next open drops the kernel's pages
            raise

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None and handle.node.lookups == 0 and not self._open_on(handle.node):
            if self._nodes[handle.node.ino] is handle.node:
                self._free(handle.node)

    @property
    def open_handles(self) -> int:
        return len(self._handles)
