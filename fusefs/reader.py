"""Turns (object, offset, size) into cached blocks: single-flight fetches, readahead, prefetch.

Concurrency rules (all on the trio thread unless stated):
- ``_inflight`` maps a block's cache key to its one running or queued fetch; a second reader of
  the same block waits on that fetch (boosting its priority) instead of starting another.
- Store calls and cache writes run in fetch worker processes (``pool``, see
  :mod:`fusefs.workers`) or, without them, in worker threads (``_fetch_sync``), admitted by
  the :class:`~fusefs.scheduler.Scheduler`: at most ``workers`` demand fetches (reads,
  readahead) in priority order, and besides them at most ``prefetch_workers`` background
  fetches (prefetch, hints), which start only while no demand fetch waits and never hold a
  demand slot. (Each worker process runs as many threads as both together: a demand fetch
  never queues behind held background fetches inside a worker either.)
- Cache hits on blocks the store holds open run inline (a ``pread``, no SQLite); opening a
  cached block (which asks the cache's SQLite index) runs in a worker thread, as do warming a
  block ahead of a reader and every cache write: SQLite never runs on the event loop.
Memory: at most ``workers + prefetch_workers`` blocks are held by running fetches; queued
fetches hold none.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import stats as S
from . import threads
from .backends.base import ObjectInfo, ObjectStore
from .cache.blocks import BlockKey, BlockStore
from .cache.fetch import fetch_block
from .config import prefetch_concurrency
from .errors import FusefsError, StaleVersion, single_error
from .scheduler import FOREGROUND, READAHEAD, Scheduler, Ticket
from .workers.pool import FetchPool, PoolUnavailable

log = logging.getLogger(__name__)

#: The kernel sends readahead requests concurrently, so a sequential reader's requests may
#: arrive slightly out of order; reads this close to the expected offset count as sequential.
_SEQ_SLACK = 4 * 1024 * 1024

#: Seconds a block whose fetch failed (EIO, after every retry) fails again at once: the
#: kernel asks again for a page whose read failed, and the store just gave up on it.
FAILED_MEMORY = 1.0
#: Cache keys of blocks fetched lately that the reader remembers (``got_recently``), ~100 B each
GOT_MAX = 65536

#: Fetch unit of a handle in random-access mode: small reads at random offsets fetch this much
#: (aligned) instead of a whole block. Cached under its own keys, which carry the version too.
RANDOM_UNIT = 128 * 1024


@dataclass
class SeqState:
    """Per open file: where the next sequential read would start, and the readahead window."""

    next_offset: int = 0
    window: int = 0  # blocks ahead to keep requested
    requested_upto: int = -1  # highest block index readahead has asked for
    random: bool = False  # reads jump around: fetch small units, no readahead
    streak: int = 0  # consecutive sequential reads (two end random mode)


@dataclass
class _Flight:
    ticket: Ticket
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class RecentBlocks:
    """A small in-memory LRU of blocks, bounded in bytes (used when the disk cache is off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._d: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __contains__(self, ck: str) -> bool:
        return ck in self._d

    def get(self, ck: str) -> bytes | None:
        data = self._d.get(ck)
        if data is not None:
            self._d.move_to_end(ck)
        return data

    def put(self, ck: str, data: bytes) -> None:
        if ck in self._d:
            return
        self._d[ck] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._d) > 1:
            _, old = self._d.popitem(last=False)
            self._bytes -= len(old)

    def clear(self) -> None:
        self._d.clear()
        self._bytes = 0


class Reader:
    """Serves byte ranges of objects from the block cache, fetching missing blocks."""

    def __init__(
        self,
        store: ObjectStore,
        blocks: BlockStore,
        stats: S.Stats,
        *,
        block_size: int,
        workers: int,
        readahead_max: int,
        prefetch_workers: int | None = None,
        recent_bytes: int = 0,
        on_stale: Callable[[str], None] | None = None,
        pool: FetchPool | None = None,
    ) -> None:
        """``prefetch_workers``: background fetches at once, besides the ``workers`` demand
        fetches (None: :func:`~fusefs.config.prefetch_concurrency` of ``workers``)."""
        self.store = store
        #: Worker processes that fetch blocks (``--fetch-workers``); None: worker threads here.
        self.pool = pool
        self.blocks = blocks
        self.stats = stats
        self.block_size = block_size
        if prefetch_workers is None:
            prefetch_workers = prefetch_concurrency(workers)
        self.scheduler = Scheduler(workers, prefetch_workers)
        self._limiter = trio.CapacityLimiter(workers + self.scheduler.background_slots)
        self._max_window = max(1, readahead_max // block_size)
        self._inflight: dict[str, _Flight] = {}
        #: Blocks whose fetch just failed after all its retries, and when: the kernel retries a
        #: failed page read once at once, which would make a program wait twice as long
        self._failed: dict[str, tuple[float, FusefsError]] = {}
        self._recent = RecentBlocks(recent_bytes) if recent_bytes > 0 else None
        #: cache keys of the blocks this mount fetched (or was handed) lately, at most GOT_MAX
        #: (see :meth:`got_recently`); forgotten with the window by ``clear``
        self._got: OrderedDict[str, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._on_stale = on_stale
        #: ``learn(obj)``: fetch an object's first block the way that also learns metadata a
        #: listing lacked (S3, see :meth:`fusefs.folders.Folders.settle`), putting it into the
        #: cache; False if that does not apply (then the block is fetched as any other). Set
        #: by the filesystem.
        self.learn: Callable[[ObjectInfo], Awaitable[bool]] | None = None

    def in_memory(self, bkey: BlockKey) -> bool:
        """Is block ``bkey`` in the window of just-fetched blocks? (No I/O.)"""
        return self._recent is not None and bkey.cache_key in self._recent

    def got_recently(self, bkey: BlockKey) -> bool:
        """Did this mount fetch block ``bkey`` lately? Then the cache holds it unless it
        evicted it since (only a cache at its bound evicts, or ``clear``): a hint for it in
        a cache far from its bound needs no fetch, and no SQLite query. (No I/O.)"""
        return bkey.cache_key in self._got

    def _got_block(self, ck: str) -> None:
        self._got[ck] = None
        if len(self._got) > GOT_MAX:
            self._got.popitem(last=False)

    @property
    def fetches_elsewhere(self) -> bool:
        """Do worker processes fetch blocks now (they look each up in the cache first)?"""
        return self.pool is not None and self.pool.usable and self.pool.ready() > 0

    def remember(self, bkey: BlockKey, data: bytes) -> None:
        """Keep block ``bkey`` (its whole bytes, just fetched elsewhere) in the window of
        just-fetched blocks, where reads look first."""
        if self._recent is not None:
            self._recent.put(bkey.cache_key, data)
        self._got_block(bkey.cache_key)

    def forget_recent(self) -> None:
        """Drop the in-memory window of just-fetched blocks, and which blocks were fetched
        lately (a ``clear``)."""
        if self._recent is not None:
            self._recent.clear()
        self._got.clear()

    def start(self, nursery: trio.Nursery) -> None:
        """Give the reader a nursery for background readahead and prefetch tasks."""
        self._nursery = nursery

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background task (a prefetch worker) in the reader's nursery."""
        if self._nursery is None:
            raise FusefsError("background tasks are not running (the mount is not serving)")
        self._nursery.start_soon(fn)

    def block_key(self, obj: ObjectInfo, index: int, unit: int | None = None) -> BlockKey:
        """Cache key of block ``index`` of ``obj`` for blocks of ``unit`` bytes."""
        return BlockKey(self.store.source_id, obj.key, obj.version, unit or self.block_size, index)

    def block_count(self, size: int) -> int:
        return (size + self.block_size - 1) // self.block_size

    def block_bytes(self, obj: ObjectInfo, idx: int) -> int:
        """Length of block ``idx`` of ``obj`` (the last one may be short)."""
        return max(0, min(self.block_size, obj.size - idx * self.block_size))

    # --- the read path ---------------------------------------------------------------------

    async def read(
        self, obj: ObjectInfo, offset: int, size: int, seq: SeqState | None = None
    ) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of ``obj`` (short at the end of the object)."""
        end = min(offset + size, obj.size)
        if offset >= end or size <= 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if seq is not None:
            self._readahead(obj, seq, offset, end, last)
        parts: list[bytes | memoryview] = []
        for idx in range(first, last + 1):
            base = idx * bs
            lo, hi = max(offset, base) - base, min(end, base + bs) - base
            bkey = self.block_key(obj, idx)
            part = self._cached(bkey, lo, hi)
            if part is None and obj.size > bs:
                # a block of a big object: open it from the cache for just [lo, hi) (a small
                # object's one block is looked up by its fetch instead: one thread hop)
                part = await self._cached_on_disk(bkey, lo, hi)
            if part is None:
                if seq is not None and seq.random:
                    part = await self._random_slice(obj, base + lo, base + hi)
                else:
                    data, hit = await self._block(obj, idx, FOREGROUND, bkey=bkey)
                    self.stats.add(S.HITS if hit else S.MISSES)
                    part = memoryview(data)[lo:hi]
            parts.append(part)
        self.stats.add(S.BYTES_SERVED, end - offset)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _cached(self, bkey: BlockKey, lo: int, hi: int) -> bytes | memoryview | None:
        """``[lo, hi)`` of a block from the in-memory window of just-fetched blocks (no copy)
        or a block file the disk cache holds open (a hit; never SQLite)."""
        data: bytes | memoryview | None = None
        if self._recent is not None:
            block = self._recent.get(bkey.cache_key)
            data = memoryview(block)[lo:hi] if block is not None else None
        if data is None:
            data = self.blocks.read_open(bkey, lo, hi - lo)
        if data is not None and len(data) == hi - lo:
            self.stats.add(S.HITS)
            return data
        return None

    async def _cached_on_disk(self, bkey: BlockKey, lo: int, hi: int) -> bytes | None:
        """``[lo, hi)`` of a block the disk cache holds but has not open (a hit): opening it
        asks SQLite, so it runs in a worker thread."""
        if not self.blocks.persistent:
            return None
        data = await threads.run_sync(self.blocks.read, bkey, lo, hi - lo)
        if data is not None and len(data) == hi - lo:
            self.stats.add(S.HITS)
            return data
        return None

    async def _random_slice(self, obj: ObjectInfo, start: int, end: int) -> bytes | memoryview:
        """Serve ``[start, end)`` from RANDOM_UNIT-sized units, fetching missing ones at once."""
        u = RANDOM_UNIT
        units: dict[int, bytes | memoryview] = {}
        missing = []
        for idx in range(start // u, (end - 1) // u + 1):
            lo, hi = max(start, idx * u) - idx * u, min(end, (idx + 1) * u) - idx * u
            bkey = self.block_key(obj, idx, u)
            part = self._cached(bkey, lo, hi)
            if part is None:
                part = await self._cached_on_disk(bkey, lo, hi)
            if part is None:
                missing.append((idx, lo, hi))
            else:
                units[idx] = part
        if missing:
            self.stats.add(S.MISSES, len(missing))

            async def one(idx: int, lo: int, hi: int) -> None:
                units[idx] = memoryview(await self.fetch_block(obj, idx, FOREGROUND, u))[lo:hi]

            with single_error():  # trio wraps errors in groups: keep StaleVersion visible
                async with trio.open_nursery() as nursery:
                    for args in missing:
                        nursery.start_soon(one, *args)
        parts = [units[i] for i in sorted(units)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _readahead(self, obj: ObjectInfo, seq: SeqState, offset: int, end: int, last: int) -> None:
        """Grow the window on sequential reads (1, 2, 4... blocks); random reads reset it."""
        if abs(offset - seq.next_offset) > _SEQ_SLACK:
            seq.window = 0
            seq.requested_upto = last
            seq.next_offset = end
            seq.random, seq.streak = True, 0
            return
        if seq.random:
            seq.streak += 1
            seq.next_offset = max(seq.next_offset, end)
            if seq.streak < 2:
                return
            seq.random = False  # reading on sequentially again: back to blocks and readahead
        if last > seq.requested_upto - seq.window // 2 or seq.window == 0:
            seq.window = min(max(1, seq.window * 2), self._max_window)
            want_upto = min(last + seq.window, self.block_count(obj.size) - 1)
            for idx in range(max(last + 1, seq.requested_upto + 1), want_upto + 1):
                self._spawn_readahead(obj, idx)
            seq.requested_upto = max(seq.requested_upto, want_upto)
        seq.next_offset = max(seq.next_offset, end)

    def _spawn_readahead(self, obj: ObjectInfo, idx: int) -> None:
        """Fetch a block in the background unless cached or in flight."""
        if self._nursery is None:
            return
        bkey = self.block_key(obj, idx)
        if bkey.cache_key in self._inflight or self.blocks.is_open(bkey):
            return  # being fetched, or cached and open
        self._nursery.start_soon(self._readahead_fetch, obj, idx, bkey)

    async def _readahead_fetch(self, obj: ObjectInfo, idx: int, bkey: BlockKey) -> None:
        try:
            if self.blocks.persistent and await threads.run_sync(self.blocks.warm, bkey):
                return  # cached: now open, and being loaded from disk ahead of the reader
            await self.fetch_block(obj, idx, READAHEAD)
            self.stats.add(S.READAHEAD_BLOCKS)
        except Exception as exc:  # background: log, never crash the mount
            log.info("readahead of %s block %d failed: %s", obj.key, idx, exc)

    # --- fetching --------------------------------------------------------------------------

    async def fetch_block(
        self, obj: ObjectInfo, idx: int, priority: int, unit: int | None = None
    ) -> bytes:
        """The whole block ``idx`` of ``obj``, fetching it once however many ask at once."""
        return (await self._block(obj, idx, priority, unit))[0]

    async def _block(
        self, obj: ObjectInfo, idx: int, priority: int, unit: int | None = None,
        bkey: BlockKey | None = None,
    ) -> tuple[bytes, bool]:
        """:meth:`fetch_block`, and whether the block came from the disk cache (a hit);
        ``bkey``: the block's key, if the caller has it already."""
        bkey = bkey or self.block_key(obj, idx, unit)
        ck = bkey.cache_key
        failed = self._failed.get(ck)
        if failed is not None:
            if trio.current_time() - failed[0] < FAILED_MEMORY:
                raise failed[1]
            del self._failed[ck]
        while (flight := self._inflight.get(ck)) is not None:
            self.scheduler.boost(flight.ticket, priority)
            await flight.done.wait()
            if flight.data is not None:
                return flight.data, True
            if flight.error is not None and not isinstance(flight.error, trio.Cancelled):
                raise flight.error
        flight = _Flight(Ticket(priority))
        self._inflight[ck] = flight
        try:
            async with self.scheduler.slot(flight.ticket):
                self.stats.in_flight(+1)
                try:
                    got = (await self._learnt(obj, bkey)
                           if idx == 0 and self.learn is not None
                           and bkey.block_size == self.block_size else None)
                    data, hit = got if got is not None else await self._fetch(
                        obj, idx, bkey, priority)
                finally:
                    self.stats.in_flight(-1)
            flight.data = data
            if self._recent is not None:
                self._recent.put(ck, data)
            self._got_block(ck)
            return data, hit
        except BaseException as exc:
            flight.error = exc
            if isinstance(exc, StaleVersion) and self._on_stale is not None:
                self._on_stale(obj.key)
            elif isinstance(exc, FusefsError) and exc.errno == errno.EIO:
                if len(self._failed) > 1024:
                    self._failed.clear()
                self._failed[ck] = (trio.current_time(), exc)
            raise
        finally:
            del self._inflight[ck]
            flight.done.set()

    async def _learnt(self, obj: ObjectInfo, bkey: BlockKey) -> tuple[bytes, bool] | None:
        """Block 0 of ``obj`` fetched by :attr:`learn` (one GET that also brings the object's
        metadata: a hint's prefetch teaches it, so the program's ``stat`` asks nothing), as
        (the block, False); None if that does not apply or the block is not in the cache
        after it."""
        assert self.learn is not None
        if not await self.learn(obj):
            return None
        length = min(bkey.block_size, obj.size)
        data = self._recent.get(bkey.cache_key) if self._recent is not None else None
        if data is None:
            data = await threads.run_sync(self.blocks.read, bkey, 0, length)
        return (data, False) if data is not None and len(data) == length else None

    async def _fetch(
        self, obj: ObjectInfo, idx: int, bkey: BlockKey, priority: int
    ) -> tuple[bytes, bool]:
        """The block from a fetch worker process, or (no workers, or they cannot run) from
        :meth:`_fetch_sync` in a worker thread."""
        pool = self.pool
        if pool is not None and pool.usable:
            start = idx * bkey.block_size
            length = min(bkey.block_size, obj.size - start)
            try:
                data, hit, stored = await pool.fetch(bkey, obj.key, obj.version, start,
                                                     length)
            except PoolUnavailable:
                pass
            except Exception:
                self.stats.add(S.ERRORS)
                raise
            else:
                if not hit:
                    self.stats.add(S.FETCHES)
                    self.stats.add(S.BYTES_FETCHED, len(data))
                if stored is not None:
                    self.blocks.stored_elsewhere(*stored)
                return data, hit
        return await threads.run_sync(  # abandoned on shutdown, never waited
            self._fetch_sync, obj, idx, bkey, priority, limiter=self._limiter
        )

    def _fetch_sync(
        self, obj: ObjectInfo, idx: int, bkey: BlockKey, priority: int
    ) -> tuple[bytes, bool]:
        """Worker thread: (the block, True) from the cache if it holds it, else (the block,
        False) from the store.

        Every fetch asks the cache first: a small object's read looks its block up only here,
        and a fetch of the same block may have stored it since a reader last looked."""
        start = idx * bkey.block_size
        length = min(bkey.block_size, obj.size - start)
        try:
            data, hit, _ = fetch_block(self.store, self.blocks, obj.key, obj.version, bkey,
                                       start, length)
        except Exception:
            self.stats.add(S.ERRORS)
            raise
        if not hit:
            self.stats.add(S.FETCHES)
            self.stats.add(S.BYTES_FETCHED, len(data))
        return data, hit
