"""Hint streams: the files a program will read next, in order, fetched ahead within a window.

A training loop knows the order of an epoch in advance (its sampler's). It opens a stream
(``hint-open``), appends relative paths in that order (``hint``), and tells the mount how far it
has read (``hint-at N``: files before position N are consumed). The stream keeps the files of
``[N, N + window_files)`` -- and at most ``window_bytes`` of them -- queued on the
:class:`~fusefs.prefetch.Prefetcher`, in order, behind every program read. ``hint-cancel``
(or opening the same stream again: a new order) drops all its queued work at once.

Cache bound: hinted files that are not read yet must not be evicted by the hints themselves.
The cache evicts least recently used first; everything used after the oldest unread hinted
block is at most the window plus the files read since it was queued (at most another window),
so a window of at most ``(cache_size - 4 blocks) / 2`` keeps every unread hinted block cached.
A larger window asked for is cut to that (``limited_by_cache``, and a warning). When the cache
is that close to its bound, files in the window that are cached already are opened ahead
(:meth:`BlockStore.warm`), which also marks them recently used, so hinting the next files
never evicts them.

Paths are resolved (a lookup, which also fills the metadata the program's ``open`` will use)
only when they enter the window, several at once, and queued strictly in stream order. A folder
holding many of the stream's paths (``LIST_FOLDER_MIN``) is listed first, at most once per
metadata TTL, so its lookups are answered from that listing instead of one request each; while
files of the window wait in it, the listing is renewed as it expires (the program's lookups
then never wait on the network, even in epochs longer than the TTL).

Concurrency: everything runs on the trio thread; one pump task per stream does the lookups and
cache checks (worker threads) and queues files; commands only update the stream and wake it.
The streams' lookups together run at most ``resolve_slots`` at once (a quarter of the mount's
metadata slots; at most two store calls each): half the slots are never held by hints. The
files' blocks are fetched in the scheduler's background pool, behind programs' reads.
A pump contains its errors: a path that cannot be resolved is counted as missing; anything
else is logged, shown in ``stats`` and ends that stream's hinting, never the mount.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .backends.base import ObjectInfo
from .cache.blocks import BlockStore
from .config import human_size
from .errors import FusefsError, InvalidArgument
from .prefetch import Prefetcher, PrefetchRequest
from .reader import Reader

log = logging.getLogger(__name__)

#: Defaults of ``hint-open`` when the window is not given.
DEFAULT_WINDOW_FILES = 256
#: Lookups one stream runs at once while filling its window.
RESOLVE_PARALLEL = 16
#: Open streams per mount, and paths one stream may hold not yet in its window.
MAX_STREAMS = 64
MAX_PENDING_PATHS = 1_000_000
_STREAM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

Resolve = Callable[[str], Awaitable[ObjectInfo]]
ListFolder = Callable[[str], Awaitable[None]]
#: A stream with at least this many paths in one folder has the folder listed (every
#: metadata TTL while it resolves paths there): one listing answers all their lookups.
LIST_FOLDER_MIN = 256


@dataclass(eq=False)
class HintStream:
    """One ordered stream of hinted files and its window."""

    id: str
    window_files: int
    window_bytes: int  # effective: at most what the cache can hold without evicting hints
    asked_bytes: int | None
    limited_by_cache: bool  # the cache cannot hold the window asked for (in files or bytes)
    at_cap: bool  # window_bytes is the cache's cap: reaching it means the cache limits us
    req: PrefetchRequest
    paths: deque[str] = field(default_factory=deque)  # appended, not yet in the window
    folders: collections.Counter[str] = field(default_factory=collections.Counter)  # appended
    next_index: int = 0  # stream index of paths[0]
    appended: int = 0
    position: int = 0  # files before it are consumed
    window: deque[tuple[int, int, str]] = field(default_factory=deque)  # (index, size, folder)
    window_size: int = 0  # bytes of ``window``
    ready: deque[tuple[int, ObjectInfo | None, str]] = field(default_factory=deque)  # resolved
    hinted: int = 0  # files that entered the window (queued, or found cached)
    missing: int = 0
    skipped: int = 0  # passed by the reader before they were hinted
    error: str | None = None
    closed: bool = False
    wake: trio.Event = field(default_factory=trio.Event)

    def kick(self) -> None:
        self.wake.set()

    def room(self) -> bool:
        """May one more file enter the window (if it is small enough)?"""
        return not self.window or (
            len(self.window) < self.window_files and self.window_size < self.window_bytes
        )

    def fits(self, size: int) -> bool:
        """May a file of ``size`` bytes enter the window? (always, when it is empty)"""
        return not self.window or (
            len(self.window) < self.window_files and self.window_size + size <= self.window_bytes
        )

    def as_dict(self) -> dict[str, Any]:
        r = self.req.as_dict()
        return {
            "id": self.id,
            "state": "failed" if self.error else "open",
            "files": self.appended,
            "position": self.position,
            "window_files": self.window_files,
            "window_bytes": self.window_bytes,
            "window_bytes_asked": self.asked_bytes,
            "limited_by_cache": self.limited_by_cache,
            "files_in_window": len(self.window),
            "bytes_in_window": self.window_size,
            "files_hinted": self.hinted,
            "files_missing": self.missing,
            "files_skipped": self.skipped,
            **{k: r[k] for k in r if k.startswith(("files_", "bytes_"))},
            "error": self.error,
        }


class HintStreams:
    """The hint streams of one mount, built on its prefetch queue."""

    def __init__(
        self,
        prefetcher: Prefetcher,
        reader: Reader,
        blocks: BlockStore,
        resolve: Resolve,
        list_folder: ListFolder,
        *,
        cache_size: int,
        metadata_ttl: float,
        resolve_slots: int = RESOLVE_PARALLEL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``resolve_slots``: lookups all streams together run at once (the mount passes a
        quarter of its metadata slots: a lookup makes at most two store calls at once, so the
        hints never hold more than half of them)."""
        self.prefetcher, self.reader, self.blocks = prefetcher, reader, blocks
        self.resolve, self.list_folder = resolve, list_folder
        self._resolving = trio.CapacityLimiter(max(1, resolve_slots))
        self.cache_size, self.ttl, self.clock = cache_size, metadata_ttl, clock
        self._streams: dict[str, HintStream] = {}
        self._listed: dict[str, float] = {}  # folder -> when the hints last listed it

    def max_window_bytes(self) -> int:
        """The largest window whose unread files the hints themselves never evict."""
        return max(self.reader.block_size, (self.cache_size - 4 * self.reader.block_size) // 2)

    # --- commands --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Is a stream open (a program reads what it hinted)?"""
        return bool(self._streams)

    def open(self, sid: str, files: int | None, nbytes: int | None) -> dict[str, Any]:
        """A new stream ``sid`` (replacing one of that name: its queued work is cancelled)."""
        if not _STREAM_ID.fullmatch(sid):
            raise InvalidArgument(f"stream id {sid!r}: 1-64 letters, digits, '_.:-'")
        window_files = DEFAULT_WINDOW_FILES if files is None else files
        if window_files < 1:
            raise InvalidArgument("the window must hold at least one file")
        cancelled = self.cancel(sid) if sid in self._streams else None
        if len(self._streams) >= MAX_STREAMS:
            raise InvalidArgument(f"{MAX_STREAMS} hint streams are open: cancel one first")
        cap = self.max_window_bytes()
        window_bytes = cap if nbytes is None else min(nbytes, cap)
        limited = nbytes is not None and nbytes > cap
        req = self.prefetcher.open_request([f"hint:{sid}"])
        st = HintStream(sid, window_files, window_bytes, nbytes, limited, window_bytes == cap, req)
        try:
            self.reader.start_soon(lambda: self._pump(st))
        except FusefsError:
            self.prefetcher.close_request(req)
            raise
        self._streams[sid] = st
        out: dict[str, Any] = {
            "id": sid,
            "window_files": window_files,
            "window_bytes": window_bytes,
            "window_bytes_str": human_size(window_bytes),
            "limited_by_cache": limited,
        }
        if cancelled is not None:
            out["replaced"] = cancelled
        if limited:
            out["warning"] = (
                f"a window of {human_size(nbytes or 0)} does not fit the cache "
                f"({human_size(self.cache_size)}) without evicting hinted files not read yet; "
                f"the window is {human_size(window_bytes)}"
            )
            log.warning("hint stream %s: %s", sid, out["warning"])
        return out

    def append(self, sid: str, paths: list[str]) -> dict[str, Any]:
        st = self._get(sid)
        if len(st.paths) + len(paths) > MAX_PENDING_PATHS:
            raise InvalidArgument(
                f"stream {sid}: more than {MAX_PENDING_PATHS} paths ahead of the window"
            )
        st.paths.extend(paths)
        st.appended += len(paths)
        st.folders.update(p.rpartition("/")[0] for p in paths)
        st.kick()
        return {"id": sid, "files": st.appended, "appended": len(paths)}

    def advance(self, sid: str, position: int) -> dict[str, Any]:
        """The reader has consumed the files before ``position``: move the window on."""
        st = self._get(sid)
        if position < 0:
            raise InvalidArgument("position must be 0 or more")
        if position > st.position:
            st.position = position
            while st.window and st.window[0][0] < position:
                st.window_size -= st.window.popleft()[1]
            while st.ready and st.ready[0][0] < position:  # resolved, but read already
                st.ready.popleft()
                st.skipped += 1
            behind = min(len(st.paths), max(0, position - st.next_index))
            for _ in range(behind):  # passed before they were even resolved
                st.paths.popleft()
            st.next_index += behind
            st.skipped += behind
            st.kick()
        return st.as_dict()

    def cancel(self, sid: str) -> dict[str, int]:
        """Close stream ``sid`` and drop all its queued work at once."""
        st = self._get(sid)
        del self._streams[sid]
        st.closed = True
        st.kick()
        out = self.prefetcher.cancel_request(st.req)
        self.prefetcher.close_request(st.req)
        log.info("hint stream %s cancelled: %s", sid, out)
        return out

    def _get(self, sid: str) -> HintStream:
        st = self._streams.get(sid)
        if st is None:
            raise InvalidArgument(f"no hint stream {sid!r} (open it with hint-open)")
        return st

    # --- state -----------------------------------------------------------------------------

    def as_list(self) -> list[dict[str, Any]]:
        return [st.as_dict() for st in self._streams.values()]

    # --- the pump --------------------------------------------------------------------------

    async def _pump(self, st: HintStream) -> None:
        """Fill the window in order until the stream is closed; errors end only this stream."""
        try:
            while not st.closed:
                st.wake = trio.Event()
                await self._fill(st)
                if st.closed:
                    break
                with trio.move_on_at(self._next_refresh(st)):
                    await st.wake.wait()
                if not st.wake.is_set():  # keep the listings of the window's folders fresh
                    for folder in self._big_folders(st):
                        await self._maybe_list(st, folder)
        except Exception as exc:  # background task: never let an error end the mount
            log.exception("hint stream %s stopped", st.id)
            st.error = f"{type(exc).__name__}: {exc}"

    async def _fill(self, st: HintStream) -> None:
        while not st.closed and st.room() and (st.ready or st.paths):
            if not st.ready:
                await self._resolve_batch(st)
                continue
            head = st.ready[0][1]
            if not st.fits(head.size if head else 0):
                self._bytes_bound(st)
                return  # the next file waits for the reader to move on
            batch: list[tuple[int, ObjectInfo]] = []
            while st.ready:
                index, info, folder = st.ready[0]
                if info is None:
                    st.ready.popleft()
                    st.missing += 1
                    continue
                if not st.fits(info.size):
                    self._bytes_bound(st)
                    break
                st.ready.popleft()
                st.window.append((index, info.size, folder))
                st.window_size += info.size
                st.hinted += 1
                batch.append((index, info))
            if batch:
                # near its bound, the cache may evict: mark cached window files used
                touch = self.blocks.volume() + 2 * st.window_bytes >= self.cache_size
                todo = await trio.to_thread.run_sync(
                    self._uncached, [i for _, i in batch], touch
                )
                if st.closed:
                    return
                self.prefetcher.add(st.req, todo)

    def _bytes_bound(self, st: HintStream) -> None:
        """The window is full by bytes before files: if the cache set that bound, say so."""
        if st.at_cap and not st.limited_by_cache and len(st.window) < st.window_files:
            st.limited_by_cache = True
            log.warning(
                "hint stream %s: the cache (%s) holds only %d of the %d files asked for ahead "
                "(%s) without evicting hinted files not read yet; use a bigger --cache-size",
                st.id,
                human_size(self.cache_size),
                len(st.window),
                st.window_files,
                human_size(st.window_size),
            )

    async def _resolve_batch(self, st: HintStream) -> None:
        """Look up the next paths (several at once); results are kept in stream order."""
        n = min(len(st.paths), RESOLVE_PARALLEL, max(1, st.window_files - len(st.window)))
        first = st.next_index
        paths = [st.paths.popleft() for _ in range(n)]
        st.next_index += n
        for folder in dict.fromkeys(p.rpartition("/")[0] for p in paths):
            await self._maybe_list(st, folder)
        infos: list[ObjectInfo | None] = [None] * n

        async def one(i: int) -> None:
            try:
                async with self._resolving:
                    infos[i] = await self.resolve(paths[i])
            except FusefsError as exc:
                log.info("hint stream %s: %s: %s", st.id, paths[i], exc)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        for i, info in enumerate(infos):
            if first + i >= st.position:
                st.ready.append((first + i, info, paths[i].rpartition("/")[0]))
            else:
                st.skipped += 1

    def _big_folders(self, st: HintStream) -> list[str]:
        """Folders of files in the window that the stream has many files in."""
        folders = {f for _, _, f in st.window}
        return [f for f in folders if st.folders[f] >= LIST_FOLDER_MIN and f in self._listed]

    def _next_refresh(self, st: HintStream) -> float:
        """When the first listing of the window's folders expires (trio time), or never."""
        listed = [self._listed[f] for f in self._big_folders(st)]
        if not listed or self.ttl <= 0:
            return math.inf
        return trio.current_time() + max(0.0, min(listed) + self.ttl - self.clock()) + 0.01

    async def _maybe_list(self, st: HintStream, folder: str) -> None:
        """List a folder many of the stream's files are in, once per metadata TTL: then their
        lookups (the hints' and the program's) are answered from memory, not one by one."""
        now = self.clock()
        last = self._listed.get(folder)
        if st.folders[folder] < LIST_FOLDER_MIN or (last is not None and now - last < self.ttl):
            return
        self._listed[folder] = now
        if len(self._listed) > 4 * MAX_STREAMS:
            self._listed = {k: v for k, v in self._listed.items() if now - v < self.ttl}
        try:
            await self.list_folder(folder)
        except FusefsError as exc:  # the lookups will each ask; say why once
            log.info("hint stream %s: listing %r failed: %s", st.id, folder or ".", exc)
        else:
            self._listed[folder] = self.clock()  # the listing is fresh from its end

    def _uncached(
        self, objs: list[ObjectInfo], touch: bool
    ) -> list[tuple[ObjectInfo, list[int]]]:
        """Worker thread: per object, the blocks to fetch. With ``touch``, cached blocks are
        opened ahead, which marks them recently used (so newer hints do not evict them); a
        cache far from its bound is only asked (no SQLite write per block)."""
        has = self.blocks.warm if touch else self.blocks.contains
        return [
            (obj, [i for i in range(self.reader.block_count(obj.size))
                   if not has(self.reader.block_key(obj, i))])
            for obj in objs
        ]  # fmt: skip
