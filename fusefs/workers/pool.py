"""The FUSE process's side of the worker processes: sends block fetches, uploads and
listings, hands back the bytes, the uploaded objects and the listed entries.

Concurrency rules:
- Everything here runs on the trio thread except each worker's reply thread, which only reads
  its pipe and hands every reply (and the end of file) to the trio thread with
  ``TrioToken.run_sync_soon``: ``_inflight`` of each worker and ``_workers`` are touched by
  the trio thread only.
- Requests are written on the trio thread. They are small and the reader's scheduler bounds
  how many are in flight (``workers`` plus the background pool), so a pipe never fills.
- A request belongs to one worker until its reply arrives. A worker that dies (end of file on
  its reply pipe) is reaped by its reply thread and replaced; the requests it held are sent
  again to a live worker, each at most ``MAX_TRIES`` times in all (then EIO). An upload is
  never sent again by the pool: it fails (the upload queue retries it, under its condition;
  the caller aborts the multipart upload the dead worker began, if any). No
  reply is ever matched to another request: ids are never reused.
- Workers start at the first fetch (a mount that never reads cold data starts none); until
  one has built its store and said READY, fetches run in-process (no read waits for a start).
  Requests sent again after a death may wait in a new worker's pipe for its start.
  ``MAX_BAD_STARTS`` deaths in a row with no reply at all mark the pool broken: the reader
  then fetches in-process, as with ``--fetch-workers 0``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..backends.base import ObjectInfo
from ..cache.keys import BlockKey
from ..config import Settings
from ..errors import BackendError, error_from_kind
from . import protocol as P

log = logging.getLogger(__name__)

#: Sends of one request (the first and the retries after its worker died).
MAX_TRIES = 3
#: Worker deaths in a row without a single reply before the pool gives up.
MAX_BAD_STARTS = 5
#: Seconds a worker gets to exit after its request pipe is closed, before it is killed.
EXIT_GRACE = 2.0


class WorkerDied(BackendError):
    """The worker process sending an upload died: whether the store got it is unknown (the
    upload queue retries it under its condition)."""


class PoolUnavailable(Exception):
    """No worker takes requests (none has started yet, or they die as they start): fetch
    in-process instead."""


@dataclass
class _Pending:
    req: P.Request | P.Put | P.List
    done: trio.Event = field(default_factory=trio.Event)
    tries: int = 0
    status: int = -1
    payload: bytes = b""
    usage: tuple[int, int] = (0, 0)
    #: an upload's ``started(upload_id)``: a multipart upload exists
    on_started: Callable[[str], None] | None = None


class _Worker:
    """One worker process, its two pipe ends and its reply thread."""

    def __init__(self, proc: subprocess.Popen[bytes], req_w: int, rep_r: int) -> None:
        self.proc = proc
        self.req_w = req_w
        self.rep_r = rep_r
        self.inflight: dict[int, _Pending] = {}
        self.replied = False
        self.ready = False  # it has built its store: new requests may go to it
        self.alive = True
        self.cpu = 0.0
        self.corrupt = 0


class FetchPool:
    """``count`` worker processes fetching blocks of ``source`` into the cache directory."""

    def __init__(self, source: str, settings: Settings, count: int,
                 on_corrupt: Callable[[int], None] | None = None) -> None:
        """``on_corrupt(n)``: workers found ``n`` more damaged cached blocks (trio thread)."""
        self._on_corrupt = on_corrupt
        self.source = source
        self.settings = settings
        self.count = count
        self._workers: list[_Worker] = []
        self._ids = itertools.count(1)
        self._numbers = itertools.count(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = False
        self._bad_starts = 0
        self.broken = False
        #: counters shown in the stats
        self.fetches = 0  # blocks a worker fetched from the store
        self.hits = 0  # blocks a worker found in the cache
        self.restarts = 0
        self.retries = 0
        self.puts = 0  # uploads a worker made
        self.lists = 0  # listings a worker sent and parsed
        self._dead_cpu = 0.0  # CPU seconds of workers that ended

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.broken and not self._closing

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.alive]

    def ready(self) -> int:
        """Workers that take requests now."""
        return sum(1 for w in self._workers if w.alive and w.ready)

    def cpu_s(self) -> float:
        """CPU seconds of the workers, as each last reported it with a reply."""
        return self._dead_cpu + sum(w.cpu for w in self._workers)

    def _spawn(self) -> _Worker:
        """Start one worker (trio thread: the parent-death signal follows the thread that
        started the child, and the trio thread lives as long as the mount)."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fusefs.workers.worker", str(req_r), str(rep_w)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(req_r, rep_w),
            )
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        P.widen_pipe(rep_r)
        worker = _Worker(proc, req_w, rep_r)
        try:
            P.send_frame(req_w, 0, P.Init(self.source, self.settings, next(self._numbers)))
        except OSError:
            pass  # it died at once: its reply thread reports that
        assert self._token is not None
        threading.Thread(target=self._replies, args=(worker, self._token), daemon=True,
                         name=f"fetch-worker-{proc.pid}").start()
        log.debug("started fetch worker %d", proc.pid)
        return worker

    def _ensure_started(self) -> None:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        while len(self._workers) < self.count:
            self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop every worker: close its request pipe (it exits at end of file), kill it if it
        has not exited within ``EXIT_GRACE`` seconds, and reap it. Any thread may call this."""
        self._closing = True
        workers, self._workers = self._workers, []
        for w in workers:
            w.alive = False
            _close(w.req_w)
        for w in workers:
            try:
                w.proc.wait(timeout=EXIT_GRACE)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()

    # --- replies (the reply threads) -------------------------------------------------------

    def _replies(self, worker: _Worker, token: trio.lowlevel.TrioToken) -> None:
        """Reply thread of one worker: every reply, then its end, to the trio thread."""
        try:
            while (reply := P.read_reply(worker.rep_r)) is not None:
                token.run_sync_soon(self._deliver, worker, *reply)
        except OSError as exc:
            log.debug("fetch worker %d: reply pipe failed: %s", worker.proc.pid, exc)
        except trio.RunFinishedError:
            pass
        finally:
            _close(worker.rep_r)
            if worker.proc.poll() is None and not self._closing:
                worker.proc.kill()  # it closed its pipe but lingers: it is of no use
            if not self._closing:
                worker.proc.wait()
            try:
                token.run_sync_soon(self._died, worker)
            except trio.RunFinishedError:
                pass

    def _deliver(self, worker: _Worker, rid: int, status: int, cpu: float,
                 usage: tuple[int, int], corrupt: int, payload: bytes) -> None:
        worker.cpu = max(worker.cpu, cpu)
        if corrupt > worker.corrupt:  # damaged cached blocks it found (and dropped) since
            if self._on_corrupt is not None:
                self._on_corrupt(corrupt - worker.corrupt)
            worker.corrupt = corrupt
        worker.replied = True
        self._bad_starts = 0
        if status == P.READY:
            worker.ready = True
            return
        if status == P.STARTED:  # an upload began a multipart upload; its answer follows
            began = worker.inflight.get(rid)
            go = began is not None  # else its waiter is gone: nobody would journal it
            if began is not None and began.on_started is not None:
                try:
                    began.on_started(payload.decode())
                except Exception as exc:  # noqa: BLE001 - a full disk: the upload is refused
                    log.warning("could not journal a multipart upload: %s", exc)
                    go = False
            try:  # the worker sends no part before this answer
                P.send_frame(worker.req_w, rid, go)
            except OSError:
                with contextlib.suppress(OSError):
                    worker.proc.kill()
            return
        pending = worker.inflight.pop(rid, None)
        if pending is None:
            return  # its waiter was cancelled and the request forgotten
        pending.status, pending.payload, pending.usage = status, payload, usage
        if status in (P.STORED, P.FETCHED, P.SMALL):
            self.fetches += 1
        elif status == P.HIT:
            self.hits += 1
        elif status == P.PUT:
            self.puts += 1
        elif status == P.LISTED:
            self.lists += 1
        pending.done.set()

    def _died(self, worker: _Worker) -> None:
        """Trio thread: a worker ended. Replace it and send its requests again."""
        if not worker.alive:
            return  # closed on purpose
        worker.alive = False
        _close(worker.req_w)
        self._dead_cpu += worker.cpu
        if worker in self._workers:
            self._workers.remove(worker)
        if self._closing:
            return
        log.warning("fetch worker %d ended (status %s) with %d request(s) in flight: "
                    "restarting it", worker.proc.pid, worker.proc.returncode,
                    len(worker.inflight))
        if not worker.replied:
            self._bad_starts += 1
        if self._bad_starts >= MAX_BAD_STARTS:
            log.error("fetch workers die as they start: fetching in the FUSE process instead")
            self.broken = True
            for pending in worker.inflight.values():
                pending.done.set()  # status -1: the waiter falls back to an in-process fetch
            return
        self.restarts += 1
        try:
            self._workers.append(self._spawn())
        except OSError as exc:  # no process can start (out of memory, of descriptors)
            log.error("cannot restart a fetch worker (%s): fetching in the FUSE process", exc)
            self.broken = True
            for pending in worker.inflight.values():
                pending.done.set()
            return
        for rid, pending in worker.inflight.items():
            if isinstance(pending.req, P.Put):  # never sent twice by the pool: see above
                pending.status = P.FAILED
                pending.payload = (f"WorkerDied\0{pending.req.key}: the worker process "
                                   f"uploading it died").encode()
                pending.done.set()
                continue
            self.retries += 1
            self._send(rid, pending)

    # --- requests (trio thread) ------------------------------------------------------------

    def _send(self, rid: int, pending: _Pending) -> None:
        pending.tries += 1
        if pending.tries > MAX_TRIES:
            pending.status = P.FAILED
            req = pending.req
            key = (req.key if isinstance(req, P.Put) else req.prefix if isinstance(req, P.List)
                   else req[0])
            pending.payload = (f"BackendError\0{key}: the fetch worker died "
                               f"{MAX_TRIES} times fetching it").encode()
            pending.done.set()
            return
        live = [w for w in self._workers if w.alive]
        worker = min([w for w in live if w.ready] or live, key=lambda w: len(w.inflight))
        worker.inflight[rid] = pending
        try:
            P.send_frame(worker.req_w, rid, pending.req)
        except OSError:
            # it died, or its pipe is full (stuck): either way it ends, its reply thread
            # reports that, and its requests (this one too) are sent again
            with contextlib.suppress(OSError):
                worker.proc.kill()

    async def _ask(self, req: P.Request | P.Put | P.List,
                   on_started: Callable[[str], None] | None = None) -> _Pending:
        """Send ``req`` to a worker and wait for its answer (PoolUnavailable if the workers
        cannot run, or are starting: about half a second, for which no read waits)."""
        if not self.usable:
            raise PoolUnavailable()
        self._ensure_started()
        if not any(w.ready for w in self._workers):
            raise PoolUnavailable()
        pending = _Pending(req, on_started=on_started)
        rid = next(self._ids)
        self._send(rid, pending)
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set():  # cancelled: a late reply is dropped
                for w in self._workers:
                    w.inflight.pop(rid, None)
        if pending.status == P.FAILED:
            kind, _, message = pending.payload.decode("utf-8", "replace").partition("\0")
            raise error_from_kind(kind, message)
        return pending

    async def list(self, prefix: str, max_keys: int | None, start_after: str
                   ) -> tuple[list[ObjectInfo], list[str], bool]:
        """One listing of ``prefix`` (every page) by a worker: (objects, prefixes, whether
        it would go on). Raises as :meth:`fetch`."""
        pending = await self._ask(P.List(prefix, max_keys, start_after))
        if pending.status != P.LISTED:
            raise PoolUnavailable()
        objects, prefixes, more = pickle.loads(pending.payload)
        return objects, prefixes, more

    async def put(self, req: P.Put, started: Callable[[str], None] | None = None
                  ) -> tuple[ObjectInfo, bool]:
        """Upload in a worker, which reads ``req.path`` itself; the new object, and whether
        the worker put its bytes into the block cache (``req.seed``). ``started``
        is called (trio thread) with the id of a multipart upload once it exists: if the
        worker then dies, nobody aborts that upload but the caller. Raises the worker's error
        rebuilt; PoolUnavailable if the workers cannot run."""
        pending = await self._ask(req, started)
        if pending.status != P.PUT:
            raise PoolUnavailable()
        info, seeded = pickle.loads(pending.payload)
        return info, bool(seeded)

    async def get_small(self, bkey: BlockKey, key: str, version: str, size: int
                        ) -> tuple[ObjectInfo, tuple[int, int] | None, bytes]:
        """A small object's ``ObjectInfo`` with its metadata, from one GET of the whole object
        in a worker, which stores its bytes in the cache as block 0 of ``bkey``'s size;
        with, if it did, the cache's (volume, items) just after; and its bytes if they are
        that block whole (of ``version``, ``size`` bytes), else b"". Raises as
        :meth:`fetch`."""
        pending = await self._ask((key, version, -1, size, bkey.source, bkey.block_size, 0))
        if pending.status != P.SMALL:
            raise PoolUnavailable()
        info, kept, data = pickle.loads(pending.payload)
        if not (len(data) == size == info.size <= bkey.block_size and info.version == version):
            data = b""  # never keep bytes of the wrong size or version
        return info, (pending.usage if kept else None), data

    async def fetch(self, bkey: BlockKey, key: str, version: str, start: int,
                    length: int) -> tuple[bytes, bool, tuple[int, int] | None]:
        """(the block, found in the cache, and if the worker stored it in the cache: the
        cache's (volume, items) just after) from a worker.
        Raises the error the worker met, rebuilt (same errno); PoolUnavailable if the workers
        cannot run."""
        pending = await self._ask((key, version, start, length, bkey.source,
                                   bkey.block_size, bkey.index))
        if pending.status in (P.STORED, P.HIT, P.FETCHED):
            if len(pending.payload) != length:  # never serve a block of the wrong size
                raise BackendError(f"{key}: a fetch worker answered {len(pending.payload)} "
                                   f"of {length} bytes")
            return (pending.payload, pending.status == P.HIT,
                    pending.usage if pending.status == P.STORED else None)
        raise PoolUnavailable()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
