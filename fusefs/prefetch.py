"""Background prefetch: a cancellable queue of files, drained block by block at low priority.

A ``prefetch`` command (or a hint stream) hands :meth:`Prefetcher.submit` the files it resolved
and, per file, the blocks not yet cached; it returns at once. At most ``concurrency`` tasks
(:func:`~fusefs.config.prefetch_concurrency`) take blocks from the head of the queue and fetch
them through :meth:`~fusefs.reader.Reader.fetch_block` at ``PREFETCH`` priority: the scheduler
runs them in
its background pool, besides the ``workers`` slots of programs' reads, and starts one only while
no program's read waits for a slot (see :mod:`fusefs.scheduler`). So a prefetch never holds a
slot a read needs. Queued blocks are not tasks: ``cancel`` simply drops them.

Concurrency: every method runs on the trio thread. Queue and counter updates happen between
awaits, never across one; a worker awaits only the fetch of one block, and the file it works on
counts that block in ``running`` until the fetch ends, so a cancel that races with it finishes
the file's accounting when the last running block returns.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import stats as S
from . import threads
from .backends.base import ObjectInfo
from .cache.blocks import BlockStore
from .reader import Reader
from .scheduler import PREFETCH

log = logging.getLogger(__name__)

#: Finished requests kept for ``stats`` (so ``fusefs prefetch --wait`` can read the outcome).
KEEP_FINISHED = 16
#: Error messages kept per request, and paths shown per request.
KEEP_ERRORS = 5
SHOW_PATHS = 10


@dataclass
class PrefetchRequest:
    """Progress of one ``prefetch`` command, in files and bytes."""

    id: int
    paths: list[str]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    files_queued: int = 0
    bytes_queued: int = 0
    files_cached: int = 0  # already fully cached when the command ran: nothing to do
    bytes_cached: int = 0
    files_done: int = 0
    bytes_done: int = 0
    files_failed: int = 0
    bytes_failed: int = 0
    files_cancelled: int = 0
    bytes_cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    streaming: bool = False  # more files may be added (a hint stream): not finished yet

    @property
    def files_pending(self) -> int:
        return self.files_queued - self.files_done - self.files_failed - self.files_cancelled

    @property
    def bytes_pending(self) -> int:
        return self.bytes_queued - self.bytes_done - self.bytes_failed - self.bytes_cancelled

    def as_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.time()
        return {
            "id": self.id,
            "paths": self.paths[:SHOW_PATHS]
            + ([f"... {len(self.paths)} paths"] if len(self.paths) > SHOW_PATHS else []),
            "state": "running" if self.finished is None else "finished",
            "files_queued": self.files_queued,
            "bytes_queued": self.bytes_queued,
            "files_cached": self.files_cached,
            "bytes_cached": self.bytes_cached,
            "files_done": self.files_done,
            "bytes_done": self.bytes_done,
            "files_failed": self.files_failed,
            "bytes_failed": self.bytes_failed,
            "files_cancelled": self.files_cancelled,
            "bytes_cancelled": self.bytes_cancelled,
            "files_pending": self.files_pending,
            "bytes_pending": self.bytes_pending,
            "elapsed_s": round(end - self.started, 2),
            "errors": self.errors,
        }


@dataclass(eq=False)
class _File:
    """One queued file: the block indices still to fetch, and how many are unfinished."""

    req: PrefetchRequest
    obj: ObjectInfo
    todo: list[int]
    nbytes: int
    next: int = 0  # todo[next:] are still queued
    running: int = 0
    failed: bool = False
    cancelled: bool = False

    @property
    def queued(self) -> int:
        return len(self.todo) - self.next


class Prefetcher:
    """The prefetch queue of one mount and the few tasks that drain it."""

    def __init__(
        self, reader: Reader, blocks: BlockStore, stats: S.Stats, *, concurrency: int
    ) -> None:
        self.reader, self.blocks, self.stats = reader, blocks, stats
        self.concurrency = max(1, concurrency)
        self._queue: deque[_File] = deque()
        self._workers = 0
        self._ids = itertools.count(1)
        self._requests: OrderedDict[int, PrefetchRequest] = OrderedDict()
        self.bytes = {"queued": 0, "done": 0, "failed": 0, "cancelled": 0}
        self.files_cancelled = 0
        self.internal_errors = 0  # failures outside a fetch (logged with a traceback)

    # --- commands --------------------------------------------------------------------------

    def submit(
        self, paths: list[str], files: list[tuple[ObjectInfo, list[int]]]
    ) -> PrefetchRequest:
        """Queue ``files`` as (object, its uncached block indices); returns at once."""
        req = self.open_request(paths)
        self.add(req, files)
        req.streaming = False
        self._maybe_finish(req)
        log.info(
            "prefetch #%d %s: %d files (%d bytes) queued, %d already cached",
            req.id,
            paths,
            req.files_queued,
            req.bytes_queued,
            req.files_cached,
        )
        return req

    def open_request(self, paths: list[str]) -> PrefetchRequest:
        """A request that files are added to later (:meth:`add`); it stays ``running`` until
        :meth:`close_request` (a hint stream)."""
        req = PrefetchRequest(next(self._ids), paths, streaming=True)
        self._requests[req.id] = req
        self._prune()
        return req

    def add(self, req: PrefetchRequest, files: list[tuple[ObjectInfo, list[int]]]) -> None:
        """Queue more files of ``req``, after everything queued so far (FIFO)."""
        files_queued = bytes_queued = 0
        for obj, todo in files:
            nbytes = sum(self.reader.block_bytes(obj, i) for i in todo)
            req.bytes_cached += obj.size - nbytes
            if not todo:
                req.files_cached += 1
                continue
            files_queued += 1
            bytes_queued += nbytes
            self._queue.append(_File(req, obj, todo, nbytes))
        req.files_queued += files_queued
        req.bytes_queued += bytes_queued
        self.stats.add(S.PREFETCH_QUEUED, files_queued)
        self.bytes["queued"] += bytes_queued
        self._start_workers()

    def close_request(self, req: PrefetchRequest) -> None:
        """No more files will be added to ``req``: it finishes when its queue is drained."""
        req.streaming = False
        self._maybe_finish(req)

    def cancel(self, prefix: str) -> dict[str, int]:
        """Drop queued blocks of files at or under ``prefix`` ("" = all); running ones finish."""
        return self._cancel(
            lambda f: not prefix or f.obj.key == prefix or f.obj.key.startswith(prefix + "/")
        )

    def cancel_request(self, req: PrefetchRequest) -> dict[str, int]:
        """Drop every queued block of one request at once; blocks already downloading finish."""
        return self._cancel(lambda f: f.req is req)

    def _cancel(self, match: Callable[[_File], bool]) -> dict[str, int]:
        files = blocks = nbytes = 0
        keep: deque[_File] = deque()
        for f in self._queue:
            if not match(f):
                keep.append(f)
                continue
            dropped = f.todo[f.next :]
            f.next = len(f.todo)
            f.cancelled = True
            b = sum(self.reader.block_bytes(f.obj, i) for i in dropped)
            files += 1
            blocks += len(dropped)
            nbytes += b
            f.req.bytes_cancelled += b
            self.bytes["cancelled"] += b
            self._file_progress(f)
        self._queue = keep
        return {"files_cancelled": files, "blocks_cancelled": blocks, "bytes_cancelled": nbytes}

    # --- state -----------------------------------------------------------------------------

    def requests(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._requests.values()]

    def totals(self) -> dict[str, int]:
        c = self.stats.snapshot()
        pending_files = sum(r.files_pending for r in self._requests.values())
        b = self.bytes
        return {
            "prefetch_queued": c[S.PREFETCH_QUEUED],
            "prefetch_done": c[S.PREFETCH_DONE],
            "prefetch_failed": c[S.PREFETCH_FAILED],
            "prefetch_cancelled": self.files_cancelled,
            "prefetch_pending": pending_files,
            "prefetch_bytes_queued": b["queued"],
            "prefetch_bytes_done": b["done"],
            "prefetch_bytes_failed": b["failed"],
            "prefetch_bytes_cancelled": b["cancelled"],
            "prefetch_bytes_pending": b["queued"] - b["done"] - b["failed"] - b["cancelled"],
            "prefetch_internal_errors": self.internal_errors,
        }

    # --- workers ---------------------------------------------------------------------------

    def _start_workers(self) -> None:
        while self._workers < self.concurrency and self._workers < self._queued_blocks():
            self.reader.start_soon(self._worker)
            self._workers += 1

    def _queued_blocks(self) -> int:
        n = 0
        for f in self._queue:
            n += f.queued
            if n >= self.concurrency:
                break
        return n

    async def _worker(self) -> None:
        """Drain the queue. Every failure is contained here (logged, counted on its file): an
        exception leaving a background task would end the serving nursery, and the mount."""
        try:
            while self._queue:
                f = self._queue[0]
                idx = f.todo[f.next]
                f.next += 1
                if f.next == len(f.todo):
                    self._queue.popleft()
                f.running += 1
                try:
                    ok, err = await self._fetch(f.obj, idx)
                finally:
                    f.running -= 1
                try:
                    self._account(f, idx, ok, err)
                except Exception:  # a bug in the bookkeeping: log it, keep prefetching
                    self.internal_errors += 1
                    log.exception("prefetch bookkeeping of %s block %d failed", f.obj.key, idx)
        finally:
            self._workers -= 1

    def _account(self, f: _File, idx: int, ok: bool, err: str) -> None:
        nb = self.reader.block_bytes(f.obj, idx)
        if ok:
            f.req.bytes_done += nb
            self.bytes["done"] += nb
        else:
            f.failed = True
            f.req.bytes_failed += nb
            self.bytes["failed"] += nb
            if len(f.req.errors) < KEEP_ERRORS:
                f.req.errors.append(f"{f.obj.key}: {err}")
        self._file_progress(f)

    async def _fetch(self, obj: ObjectInfo, idx: int) -> tuple[bool, str]:
        """Fetch one block unless cached; (ok, error message). Never raises but Cancelled."""
        try:
            bkey = self.reader.block_key(obj, idx)
            if self.reader.in_memory(bkey) or (
                    self.reader.got_recently(bkey)
                    and self.blocks.volume() < self.blocks.size_limit // 2):
                return True, ""  # a reader (or another prefetch) got it lately: still cached
            # where a worker process fetches, it looks the block up in the cache itself (a hit
            # costs this process a reply, not a thread and a SQLite query); else ask here
            if not self.reader.fetches_elsewhere and await threads.run_sync(
                    self.blocks.contains, bkey):
                return True, ""  # a reader (or another prefetch) got it meanwhile
            await self.reader.fetch_block(obj, idx, PREFETCH)
        except Exception as exc:  # background work: record and log, never crash the mount
            log.warning("prefetch of %s block %d failed: %r", obj.key, idx, exc)
            return False, str(exc) or type(exc).__name__
        return True, ""

    def _file_progress(self, f: _File) -> None:
        """Account a file once nothing of it is queued or running."""
        if f.queued or f.running:
            return
        req = f.req
        if f.failed:
            req.files_failed += 1
            self.stats.add(S.PREFETCH_FAILED)
        elif f.cancelled:
            req.files_cancelled += 1
            self.files_cancelled += 1
        else:
            req.files_done += 1
            self.stats.add(S.PREFETCH_DONE)
        self._maybe_finish(req)

    def _maybe_finish(self, req: PrefetchRequest) -> None:
        if req.finished is None and not req.streaming and req.files_pending == 0:
            req.finished = time.time()
            log.info(
                "prefetch #%d finished: %d files done, %d failed, %d cancelled",
                req.id,
                req.files_done,
                req.files_failed,
                req.files_cancelled,
            )

    def _prune(self) -> None:
        finished = [i for i, r in self._requests.items() if r.finished is not None]
        for i in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._requests[i]
