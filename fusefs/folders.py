"""What fusefs knows of folders, and how a name in one is resolved: listed ranges, fills,
list-ahead; probes in :mod:`fusefs.probes`. No inodes here (see :mod:`fusefs.fs`), no pyfuse3.

A lookup whose name falls in a fresh listed range (:mod:`fusefs.listing`) is answered from
memory, present or absent, without a request. A lookup that misses lists the folder starting just
before the name (one LIST of up to 1,000 keys, kept as a range); a folder looked up in is filled
in the background, page after page, so opening K names by path in a folder of N objects costs
about min(K, N/1000) LISTs. Lookups in one folder wait for a fill page that may answer them (up
to ``FILL_WAIT_PAGES``) before listing on their own.

Freshness: a range is trusted for ``ttl`` seconds (``inf``: forever), a name absent from it for
``negative_ttl``; an expired range is re-listed block by block (one LIST per 1,000 entries),
never with a request per file. Observations carry the time their request was sent.

Memory: listed ranges of at most MAX_LISTED_ENTRIES entries over all folders; the least recently
used folders' ranges are dropped first.

Concurrency: every method runs on the trio thread; store calls run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from . import threads
from .attrmemory import AttrMemory
from .backends.base import ObjectInfo, ObjectStore
from .config import LIST_AHEAD_PARALLEL, Settings
from .errors import FusefsError, NameTooLong, NotFound
from .listing import PAGE, DirListing, Flight, Range, page_items, range_end
from .probes import READ_PROBE_MAX, Found, Probes
from .workers.pool import FetchPool, PoolUnavailable

log = logging.getLogger(__name__)

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

#: Longest file name, in bytes (as on ext4).
NAME_MAX = 255


def valid_name(name: str) -> bool:
    """Can this key segment be a file name? (no empty, '.', '..', NUL, or > NAME_MAX bytes)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "\x00" not in name
        and len(os.fsencode(name)) <= NAME_MAX
    )


def check_length(name: str) -> None:
    """NameTooLong (ENAMETOOLONG, as ext4 answers) for a name over NAME_MAX bytes."""
    if len(os.fsencode(name)) > NAME_MAX:
        raise NameTooLong(f"{name[:40]!r}...: a name longer than {NAME_MAX} bytes")


def prefix_of(path: str) -> str:
    return path + "/" if path else ""


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Folders(Probes):
    """The listed ranges of every folder and the listings in flight, for one mount."""

    def __init__(
        self,
        store: ObjectStore,
        settings: Settings,
        clock: Callable[[], float],
        start_soon: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self.store = store
        self.clock = clock
        #: Runs a background task (fills, list-ahead); raises FusefsError when not serving.
        self.start_soon = start_soon
        self._dirs: OrderedDict[str, DirListing] = OrderedDict()  # by path, LRU order
        self._listed_entries = 0
        self._negative: dict[str, float] = {}
        self.meta_limiter = trio.CapacityLimiter(settings.metadata_workers)
        self._ahead_limiter = trio.CapacityLimiter(LIST_AHEAD_PARALLEL)
        self.lists = 0  # LISTs sent (for stats and tests)
        #: the worker processes that send and parse listings, if any (set by the mount)
        self.pool: FetchPool | None = None
        self._lists_after: bool = getattr(store, "lists_after", True)
        self.ttl = settings.metadata_ttl
        self.negative_ttl = min(settings.negative_ttl, settings.metadata_ttl)
        #: mtime/mode of versions whose listings lack them (S3); see fusefs.attrmemory
        self.attrs = AttrMemory()
        #: listed objects up to this size with unknown metadata are HEADed (fusefs.kinds)
        #: (-1: none; ``--link-probe-size 0`` turns it off, empty objects — FIFOs — included)
        self.probe_size = (settings.link_probe_size
                           if settings.link_probe_size > 0
                           and not getattr(store, "lists_metadata", True) else -1)
        self.type_heads = 0  # requests sent to learn a listed object's type (stats, tests)
        #: how a file's metadata a listing lacks is learnt on its first stat (``settle``):
        #: "auto", "head" or "off" (always "off" where listings carry metadata)
        self.settle_mode = (settings.metadata_probe
                            if not getattr(store, "lists_metadata", True) else "off")
        self.read_probe_max = min(READ_PROBE_MAX, settings.block_size)
        self.settles = 0  # requests sent to learn a file's metadata on stat (stats, tests)
        #: the block cache keeps what ``seed`` gets (not without a disk cache): settle may GET
        self.keeps_bytes = True
        #: ``seed(info, data)``: a small object's whole bytes into the block cache (worker
        #: thread); set by the filesystem. With it, a store that ``gets_small`` (S3) learns
        #: a type with the GET a read would send anyway, instead of a HEAD.
        self.seed: Callable[[ObjectInfo, bytes], None] | None = None
        #: ``fetch_small(info)``: that fetch made by a fetch worker process (its GET, checks
        #: and cache write out of the FUSE process), or None where the workers cannot run;
        #: set by the filesystem
        self.fetch_small: Callable[[ObjectInfo], Awaitable[ObjectInfo | None]] | None = None
        #: typed() fetches in flight, by (key, version): one per object version at a time
        self._typing: dict[tuple[str, str], trio.Event] = {}

    def set_ttls(self, metadata_ttl: float, negative_ttl: float) -> None:
        self.ttl = metadata_ttl
        self.negative_ttl = min(negative_ttl, metadata_ttl)

    def fresh(self, t: float, now: float) -> bool:
        return now - t < self.ttl

    def mark_stale(self, key: str) -> None:
        """The store said ``key`` changed: distrust the range that holds it."""
        self._distrust(key.rpartition("/")[0], key)

    def mark_stale_above(self, key: str) -> None:
        """An object under folders that may now be empty is gone (a delete that waited):
        distrust the listed ranges that show those folders (each is listed again when asked
        for, and shows them only if something is left in them)."""
        folder = key.rpartition("/")[0]
        while folder:
            parent = folder.rpartition("/")[0]
            self._distrust(parent, folder + "/")
            folder = parent

    def _distrust(self, path: str, key: str) -> None:
        """The listed range of folder ``path`` that holds ``key`` is to be listed again."""
        d = self._dirs.get(path)
        if d is not None:
            r = d.find(key)
            if r is not None:
                r.listed = -math.inf

    def note(self, key: str, value: ObjectInfo | None | bool) -> None:
        """This mount changed ``key`` (see :meth:`DirListing.note`): the listed ranges say
        so at once, without a request. A sub-folder's key ends with ``/``."""
        while True:
            parent = key.rstrip("/").rpartition("/")[0]
            d = self._dirs.get(parent)
            if d is not None:
                before = d.entries()
                d.note(key, value, self.clock())
                self._listed_entries += d.entries() - before
            self._negative.pop(key.rstrip("/"), None)
            # something exists below ``parent``: so does ``parent`` itself, in its own parent
            # (an upload of a/b/c/f makes a/b/ appear in a listing of a taken before it)
            if value is False or not parent:
                return
            key, value = parent + "/", None

    def note_empty(self, path: str) -> None:
        """Folder ``path`` was just made: it is known to be empty (no LIST needed)."""
        d = self._dir(path)
        if not d.ranges and not d.flights:
            d.insert(Range("", None, self.clock(), [], []), merge_within=0)

    def forget_tree(self, path: str) -> None:
        """Drop what is known of folder ``path`` and every folder below it."""
        pre = prefix_of(path)
        for p in [p for p in self._dirs if p == path or p.startswith(pre)]:
            self._listed_entries -= self._dirs.pop(p).clear()

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
            r = await self._fetch(path, start, max_keys, sent,
                                  None if ahead else self.meta_limiter)
        finally:
            if flight in d.flights:
                d.flights.remove(flight)
            flight.done.set()
        self.lists += 1
        if self._dirs.get(path) is not d:
            return r  # forgotten meanwhile (a folder renamed away): its answer is not kept
        self._dirs.move_to_end(path)  # recently used
        d.replay(r)  # what this mount changed while the LIST flew
        self._listed_entries += d.insert(r, merge_within=max(1.0, min(self.ttl, 60.0) / 4))
        self._negative_clear(path)
        self.bound_listings(keep=path)
        return r

    async def _fetch(self, path: str, start: str, max_keys: int | None, sent: float,
                     limiter: trio.CapacityLimiter | None) -> Range:
        """One LIST (all pages if ``max_keys`` is None) as a range: sent and parsed by a
        worker process where there is one (the SDK's parsing of a page of 1,000 keys is
        milliseconds of CPU), else in a thread here."""
        pool = self.pool
        if pool is not None and pool.usable:
            try:
                async with limiter if limiter is not None else contextlib.nullcontext():
                    objects, prefixes, more = await pool.list(prefix_of(path), max_keys, start)
            except PoolUnavailable:
                pass
            else:
                return await threads.run_sync(self._range, path, start, sent, objects,
                                              prefixes, more)
        return await threads.run_sync(self._fetch_range, path, start, max_keys, sent,
                                      limiter=limiter)

    def _fetch_range(self, path: str, start: str, max_keys: int | None, sent: float) -> Range:
        """Worker thread: one LIST (all pages if ``max_keys`` is None) as a range."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        more = False
        for page in self.store.list(prefix_of(path), max_keys=max_keys, start_after=start):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
            more = page.more
        return self._range(path, start, sent, objects, prefixes, more)

    def _range(self, path: str, start: str, sent: float, objects: list[ObjectInfo],
               prefixes: list[str], more: bool) -> Range:
        """Worker thread: a listing's answer as a range (names that are not valid file
        names skipped, what this mount knows of objects' metadata applied)."""
        prefix = prefix_of(path)
        objects = list(map(self.attrs.apply, objects))
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

    def bound_listings(self, keep: str) -> None:
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
            pre = prefix_of(path)
            for k in [k for k in self._negative if k.startswith(pre)]:
                del self._negative[k]

    async def _resolve(self, dir_path: str, name: str) -> Found:
        """(is_dir, info, seen) of ``name`` in folder ``dir_path``; NotFound if absent.

        Answers from a fresh range when one covers the name; otherwise waits for a listing in
        flight that may answer it, re-lists an expired range's block, or lists from just
        before the name. The first miss in a folder starts a fill of the whole folder."""
        prefix = prefix_of(dir_path)
        okey, dkey = prefix + name, prefix + name + "/"
        waited_fill = waited_other = 0
        listed_here = 0
        while True:
            now = self.clock()
            d = self._dir(dir_path)
            r = d.find(okey)
            covered = r is not None and r.covers(dkey)
            if r is not None and covered and self.fresh(r.listed, now):
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
                        return await self._probe(join(dir_path, name))
                    listed_here += 1
                    await self.listing(dir_path)
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
                return await self._probe(join(dir_path, name))  # and the folder key)
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
            self.start_soon(fill)
        except FusefsError:  # not serving: lookups list on their own
            d.filling = False
            d.flights.remove(first)
            first.done.set()
            return False
        return True

    async def resolve(
        self, dir_path: str, name: str
    ) -> Found:
        """(is_dir, info, seen) of ``name`` in ``dir_path``, its type known (:meth:`typed`)."""
        try:
            is_dir, info, seen = await self._resolve(dir_path, name)
        except NotFound:
            raise
        except FusefsError as exc:  # e.g. listing not allowed: ask about the name itself
            log.debug("listing %r for a lookup failed: %s", dir_path, exc)
            return await self._probe(join(dir_path, name))
        if info is not None:
            info = await self.typed(info)
        return is_dir, info, seen

    async def listing(
        self, path: str, *, typed: bool = True
    ) -> tuple[list[tuple[str, bool, ObjectInfo | None]], float]:
        """All entries of folder ``path`` as (name, is_dir, info), from a fresh complete range
        or one complete listing (shared by concurrent callers); and when it was listed.
        ``typed``: each entry's file type known (:meth:`typed`; internal users that only
        need names and sizes pass False: no request per small object)."""
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
        n = len(prefix_of(path))
        out: list[tuple[str, bool, ObjectInfo | None]] = []
        dirs = {k[n:-1] for k, i in zip(r.keys, r.infos, strict=True) if i is None}
        for key, info in zip(r.keys, r.infos, strict=True):
            if info is None:
                out.append((key[n:-1], True, None))
            elif key[n:] in dirs:
                log.warning("%s is both an object and a prefix; showing the directory", key)
            else:
                out.append((key[n:], False, info))
        if typed and self.probe_size >= 0:
            await self._typed_all(out)
        return out, r.listed


    def list_ahead(self, path: str, names: list[str]) -> None:
        """List sub-folders' first pages in the background, one level ahead of a tree walker:
        at most LIST_AHEAD_MAX per folder snapshot, on their own slots, never in the way of a
        program's own listing (which does not wait for a speculative one)."""
        todo = []
        for name in names:
            sub = join(path, name)
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
                self.start_soon(lambda sub=sub: one(sub))  # type: ignore[misc]
            except FusefsError:
                return  # not serving (no background nursery)
