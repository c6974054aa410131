"""The program of one worker process: ``python -m fusefs.workers.worker REQ_FD REP_FD``.

It reads an :class:`~.protocol.Init` and then requests from ``REQ_FD``, builds its own store
(its own SDK clients) and block cache from the mount's source and settings, and answers each
request on ``REP_FD`` with the block (fetched, verified and stored in the cache directory by
:func:`fusefs.cache.fetch.fetch_block`), the uploaded object (a :class:`~.protocol.Put`: it
reads the staged file and sends it with the store's own upload, multipart and all), or the
kind of error it met.

Invariants: requests run in up to ``workers + prefetch_concurrency(workers)`` threads (as
many as the mount admits fetches at once, so none waits here behind another); a reply is
written whole under one lock (replies never interleave). End of file on ``REQ_FD`` (the FUSE
process closed it or died) ends the worker at once, abandoning requests in flight (their cache
writes are crash-safe: diskcache records a block only once its file is complete). SIGINT,
SIGHUP and SIGTERM are ignored (a terminal's Ctrl-C or a ``kill`` of the process group reach
the FUSE process, which stops gracefully): the FUSE process decides when its workers stop.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import pickle
import resource
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..backends import open_store
from ..backends.base import ObjectInfo, Upload, check_version
from ..cache.blocks import BlockStore, DiskBlockStore, NullBlockStore
from ..cache.fetch import fetch_block
from ..cache.keys import BlockKey
from ..config import Settings, prefetch_concurrency
from ..errors import BackendError, error_kind
from . import protocol as P

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the FUSE process dies (EOF would tell us too, unless a
    request thread is stuck)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _setup_logging(settings: Settings, number: int) -> None:
    handler: logging.Handler
    if settings.log_file:
        handler = logging.handlers.WatchedFileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s fetch-worker-{number}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "google", "s3transfer", "azure"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def serve(req_fd: int, rep_fd: int) -> None:
    """Answer requests until end of file on ``req_fd``."""
    first = P.read_frame(req_fd)
    if first is None:
        return
    init = first[1]
    assert isinstance(init, P.Init)
    settings: Settings = init.settings
    _setup_logging(settings, init.number)
    store = open_store(init.source, settings)
    blocks: BlockStore
    corrupt: list[int] = []  # one item per damaged block found (list.append is atomic)
    if settings.cache_enabled:
        blocks = DiskBlockStore(settings.cache_dir, settings.cache_size, owner=False,
                                on_corrupt=lambda: corrupt.append(1))
    else:
        blocks = NullBlockStore()
    lock = threading.Lock()

    def reply(rid: int, status: int, payload: bytes) -> None:
        try:
            with lock:  # the cache's figures as of this reply: replies carry them in order
                head = P.REPLY.pack(rid, status, _cpu(), blocks.volume(), blocks.count(),
                                    len(corrupt), len(payload))
                P.write_all(rep_fd, head, payload)
        except OSError:
            os._exit(0)  # the FUSE process is gone

    #: uploads waiting for the FUSE process to journal their multipart upload: id -> [the
    #: event set by its answer, the answer]
    waiting: dict[int, list[Any]] = {}

    def started(rid: int, upload_id: str) -> None:
        box: list[Any] = [threading.Event(), False]
        waiting[rid] = box
        reply(rid, P.STARTED, upload_id.encode())
        box[0].wait()  # end of file on the requests ends the process, waiting or not
        if not box[1]:
            raise BackendError(f"the multipart upload {upload_id} could not be journaled")

    def put(rid: int, req: P.Put) -> tuple[ObjectInfo, bool]:
        if req.check is not None:
            check_version(store, req.key, req.check)
        info: ObjectInfo = store.put_file(  # type: ignore[attr-defined]
            req.key, Upload(req.path, req.size, started=lambda uid: started(rid, uid)),
            condition=req.condition, attrs=req.attrs)
        return info, req.seed is not None and info.size == req.size and seed(req, info)

    def seed(req: P.Put, info: ObjectInfo) -> bool:
        """The bytes just sent (the file does not change while its upload reads it) into the
        block cache as the blocks of ``info``; False if the cache took not all of them."""
        assert req.seed is not None
        source, size = req.seed
        try:
            with open(req.path, "rb") as f:
                for idx in range((info.size + size - 1) // size):
                    data = os.pread(f.fileno(), min(size, info.size - idx * size), idx * size)
                    if not blocks.put(BlockKey(source, info.key, info.version, size, idx),
                                      data):
                        return False
        except OSError as exc:  # a cache that cannot take them: they are fetched when read
            log.warning("%r: not put into the block cache: %s", info.key, exc)
            return False
        return True

    def listing(req: P.List) -> tuple[list[ObjectInfo], list[str], bool]:
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        more = False
        for page in store.list(req.prefix, max_keys=req.max_keys, start_after=req.start_after):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
            more = page.more
        return objects, prefixes, more

    def fetch(req: P.Request) -> tuple[int, bytes]:
        key, version, start, length, source, block_size, index = req
        if start < 0:  # a small object whole, for its metadata
            got, data = store.get_small(key, version, length)  # type: ignore[attr-defined]
            whole = len(data) == got.size == length <= block_size and got.version == version
            kept = whole and blocks.put(BlockKey(source, key, version, block_size, 0), data)
            # its bytes go back too: the read that follows the stat (or the prefetch's
            # reader) is answered from memory, not from the cache directory
            answer = P.SMALL, pickle.dumps((got, kept, data if whole else b""),
                                           pickle.HIGHEST_PROTOCOL)
        else:
            data, hit, stored = fetch_block(
                store, blocks, key, version,
                BlockKey(source, key, version, block_size, index), start, length)
            answer = (P.HIT if hit else P.STORED if stored else P.FETCHED), data
        blocks.maybe_touch()  # access times of hits too (no maintenance thread here)
        return answer

    def one(rid: int, req: P.Request | P.Put | P.List) -> None:
        status: int
        payload: bytes
        try:
            if isinstance(req, P.List):
                status, payload = P.LISTED, pickle.dumps(listing(req), pickle.HIGHEST_PROTOCOL)
            elif isinstance(req, P.Put):
                status, payload = P.PUT, pickle.dumps(put(rid, req))
            else:
                status, payload = fetch(req)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, by kind
            log.debug("%r failed: %r", req, exc)
            status, payload = P.FAILED, f"{error_kind(exc)}\0{exc}".encode("utf-8", "replace")
        reply(rid, status, payload)

    P.widen_pipe(rep_fd)
    P.write_all(rep_fd, P.REPLY.pack(0, P.READY, _cpu(), 0, 0, 0, 0))
    log.debug("fetch worker %d serving %s", init.number, store.source_id)
    # as many threads as the mount admits fetches (demand and background pools) and uploads:
    # a read never waits in this process behind held prefetches or long uploads
    threads = (settings.workers + prefetch_concurrency(settings.workers)
               + (0 if settings.read_only else settings.uploads))
    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        while (frame := P.read_frame(req_fd)) is not None:
            rid, obj = frame
            if isinstance(obj, bool):  # the answer to a STARTED
                box = waiting.pop(rid, None)
                if box is not None:
                    box[1] = obj
                    box[0].set()
                continue
            pool.submit(one, rid, obj)
        os._exit(0)  # end of requests: abandon what is in flight, at once


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    serve(int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
