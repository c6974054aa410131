"""The control file ``MOUNT/.fusefs``: statistics as JSON, and commands written to it.

Protocol (one handle = one conversation):
- a read returns the JSON result of the last command written on this handle, or, when none was,
  the mount's statistics. The first read after open or after a command starts the document at
  its own offset (``pread`` from 0, or the position a ``write`` left), and later reads continue
  in the same snapshot;
- a write appends to the handle's command buffer; each complete line (a newline outside quotes)
  is run at once; a line left without a newline runs at ``flush`` (close). Words are split like
  a shell does (:func:`shlex.split`), so paths with spaces can be quoted;
- a failed command fails the ``write`` (or ``close``) with its errno, and the next read returns
  ``{"error": ..., "errno": ..., "code": ...}``. The mount keeps serving.
Only the user who mounted (or root) may open the file for writing; other users read the
counters only (no paths, prefetch requests or hint streams).

Paths are relative to the mount root, or absolute paths inside the mount point; ``..`` may not
leave the mount. Concurrency: everything runs on the trio thread; commands await listings
(worker threads) and cache scans (worker threads), so commands on several handles interleave.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import shlex
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from . import stats as S
from .backends.base import ObjectInfo
from .cache.blocks import BlockStore, parse_cache_key
from .cmdline import CommandLines
from .config import Settings, human_size, parse_size
from .errors import (
    AccessDenied,
    FusefsError,
    InvalidArgument,
    IsADirectory,
    NotFound,
    first_error,
    single_error,
)
from .fs import CONTROL_INO, Attr, Entry, FileSystem
from .hints import HintStreams
from .prefetch import Prefetcher
from .reader import Reader

log = logging.getLogger(__name__)

#: Longest command line accepted (a prefetch of many quoted paths fits easily).
MAX_COMMAND = 1 << 20
#: Listings run in parallel while walking a folder.
_WALK_PARALLEL = 8

COMMANDS = (
    "stats",
    "clear",
    "prefetch",
    "cancel-prefetch",
    "sync",
    "hint-open",
    "hint",
    "hint-at",
    "hint-cancel",
)

@dataclass
class _CtlHandle:
    uid: int
    lines: CommandLines = field(default_factory=CommandLines)  # bytes written, not yet run
    result: bytes | None = None  # the last command's JSON; None -> fresh stats on read
    answer: dict[str, Any] = field(default_factory=dict)  # the last command's result
    doc: bytes = b""  # the document being read
    origin: int | None = None  # file offset where ``doc`` starts; None: the next read starts one


class Control:
    """State behind the control file; one handle per ``open``."""

    def __init__(
        self,
        fs: FileSystem,
        reader: Reader,
        blocks: BlockStore,
        stats: S.Stats,
        settings: Settings,
        source: str,
        *,
        mountpoint: str = "",
        owner_uid: int | None = None,
        owner_gid: int | None = None,
    ) -> None:
        self.fs, self.reader, self.blocks, self.stats = fs, reader, blocks, stats
        self.settings, self.source = settings, source
        #: The mounting user: owns the control file and may write commands (as may root).
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.owner_gid = os.getgid() if owner_gid is None else owner_gid
        mp = posixpath.normpath(mountpoint) if mountpoint else ""
        self._mountpoints = sorted({mp, os.path.realpath(mp)} if mp else set(), key=len)[::-1]
        # one prefetch task per background slot of the reader's scheduler
        self.prefetcher = Prefetcher(
            reader, blocks, stats, concurrency=reader.scheduler.background_slots
        )
        self.hints = HintStreams(
            self.prefetcher,
            reader,
            blocks,
            self._file_info,
            self._list_folder,
            cache_size=settings.cache_size,
            metadata_ttl=settings.metadata_ttl,
            resolve_slots=settings.metadata_workers // 4,  # <= 2 store calls each: half
        )
        # a hint stream prefetches what its program opens next, within the cache's bound:
        # the filesystem's own metadata fetches ahead of a stat walk stay out of its way
        fs.hinting = lambda: self.hints.active
        self._handles: dict[int, _CtlHandle] = {}
        self._next = 1 << 40  # distinct from file handles
        self._cleared = 0  # blocks removed by ``clear``: not evictions
        #: The mount's control socket (read-only mounts), shown in the statistics
        self.socket_path: str | None = None

    def attr(self) -> Attr:
        return Attr(
            CONTROL_INO,
            stat.S_IFREG | 0o644,
            0,
            time.time_ns(),
            0,
            4096,
            1,
            self.owner_uid,
            self.owner_gid,
        )

    # --- handles ---------------------------------------------------------------------------

    def owns(self, fh: int) -> bool:
        return fh in self._handles

    def may_write(self, uid: int) -> bool:
        return uid in (0, self.owner_uid)

    def open(self, uid: int, flags: int = os.O_RDONLY) -> int:
        if (flags & os.O_ACCMODE) != os.O_RDONLY and not self.may_write(uid):
            raise AccessDenied(f"uid {uid} may not write commands (only the mounting user)")
        fh = self._next
        self._next += 1
        self._handles[fh] = _CtlHandle(uid)
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """The first read (after open, or after a command) starts a document at its offset.

        So a result can be read from 0 (``pread``) or from where the write left the file
        position (``exec 3<>.fusefs; echo stats >&3; cat <&3``). Reading the start again gives
        a fresh statistics snapshot, or the same command result.
        """
        h = self._handles[fh]
        rel = -1 if h.origin is None else offset - h.origin
        if rel < 0 or (rel == 0 and h.result is None):
            h.doc = h.result if h.result is not None else self.render(
                self.stats_dict() if self.may_write(h.uid) else self.counters())
            h.origin, rel = offset, 0
        return h.doc[rel : rel + size]

    async def write(self, fh: int, data: bytes) -> int:
        """Buffer ``data``; run every complete command line in it. Returns ``len(data)``."""
        h = self._handles[fh]
        if not self.may_write(h.uid):  # the kernel checks too (mode 0644, default_permissions)
            raise AccessDenied(f"uid {h.uid} may not write commands (only the mounting user)")
        h.lines.feed(data)
        if len(h.lines) > MAX_COMMAND:
            h.lines.clear()
            self._fail(h, InvalidArgument(f"command longer than {MAX_COMMAND} bytes"), "")
        while (line := h.lines.take()) is not None:
            await self._run(h, line)
        return len(data)

    async def flush(self, fh: int) -> None:
        """Run a last command written without a newline (``printf clear > .fusefs``)."""
        h = self._handles.get(fh)
        if h is None or not len(h.lines):
            return
        text = h.lines.rest()
        await self._run(h, text)

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    async def _run(self, h: _CtlHandle, raw: bytes) -> None:
        try:
            words = shlex.split(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._fail(h, InvalidArgument("command is not UTF-8"), "")
        except ValueError as exc:
            self._fail(h, InvalidArgument(f"cannot parse command: {exc}"), "")
        if not words:
            return
        try:
            result = await self.execute(words)
        except Exception as exc:
            self._fail(h, exc, words[0])
        h.answer = result
        h.result, h.origin = self.render(result), None

    async def answer(self, fh: int, raw: bytes) -> dict[str, Any]:
        """Run one command line (without its newline) on handle ``fh``, as the control socket
        does for each line it receives: the command's result, or its error document
        (``error``, ``errno``, ``code``). A blank line is answered with the statistics."""
        h = self._handles[fh]
        if not raw.strip():
            return self.stats_dict()
        h.answer = {}
        try:
            await self._run(h, raw)
        except Exception:  # noqa: BLE001 - _fail recorded it in h.answer (and logged a bug)
            pass
        return h.answer

    def _fail(self, h: _CtlHandle, exc: BaseException, command: str) -> NoReturn:
        """Record the error for the next read on this handle, then fail the write with it.

        Lines after the failed one are dropped: a script's later commands never run on a
        broken premise. An exception group (from a nursery) is reported as its real error.
        """
        h.lines.clear()
        err = first_error(exc)
        if isinstance(err, FusefsError):
            code, message = err.errno, str(err)
        elif isinstance(err, OSError) and err.errno:
            code, message = err.errno, str(err)
        else:  # a bug or an unexpected library error (e.g. SQLite): log where it came from
            log.error("control command %r failed", command, exc_info=err)
            code, message = errno.EIO, f"internal error: {err!r}"
            err = FusefsError(message)  # EIO; the traceback is logged once, here
        h.answer = {
            "command": command,
            "error": message,
            "errno": code,
            "code": errno.errorcode.get(code, str(code)),
        }
        h.result, h.origin = self.render(h.answer), None
        raise err

    @staticmethod
    def render(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

    # --- commands --------------------------------------------------------------------------

    async def execute(self, words: list[str]) -> dict[str, Any]:
        """Run one command (``["prefetch", "a/b"]``); its JSON-able result."""
        cmd, args = words[0], words[1:]
        handlers: dict[str, Callable[[list[str]], Awaitable[dict[str, Any]]]] = {
            "stats": self._cmd_stats,
            "clear": self._cmd_clear,
            "prefetch": self._cmd_prefetch,
            "cancel-prefetch": self._cmd_cancel,
            "hint-open": self._cmd_hint_open,
            "hint": self._cmd_hint,
            "hint-at": self._cmd_hint_at,
            "hint-cancel": self._cmd_hint_cancel,
            "sync": self._cmd_sync,
        }
        handler = handlers.get(cmd)
        if handler is None:
            raise InvalidArgument(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")
        return await handler(args)

    async def _cmd_sync(self, args: list[str]) -> dict[str, Any]:
        """``sync [PATH]``: wait for every pending upload under PATH (failed ones are tried
        again once); reports what failed."""
        path = self._one_path(args, "sync")
        w = self.fs.writes
        if w is None:
            return {"synced": 0, "failed": []}
        prefix = ""
        if path:
            node = await self.resolve(path)
            prefix = node.path + "/" if node.is_dir else node.path
        before = w.uploads.done
        failed = await w.uploads.wait_all(prefix)
        return {
            "synced": w.uploads.done - before,
            "failed": [{"path": sf.key, "error": sf.rec.error} for sf in failed],
            # removed names whose object is still in the store (an open handle reads it,
            # or its delete failed and is retried)
            "deletes_pending": await w.deletes.wait_idle(prefix),
        }

    def upload_state(self, path: str) -> dict[str, Any]:
        """A file's upload state for ``stats PATH``."""
        w = self.fs.writes
        sf = w.staged(path) if w is not None else None
        if sf is None:
            return {"upload": "none"}
        if sf.rec.state in ("failed", "conflict"):
            state = sf.rec.state
        elif sf.busy is not None:
            state = "uploading"
        elif sf.needs_upload:
            state = "open" if sf.writers else "pending"
        else:
            state = "uploaded"
        out: dict[str, Any] = {"upload": state, "staged_size": sf.size}
        if sf.rec.error:
            out["upload_error"] = sf.rec.error
        return out

    async def _cmd_stats(self, args: list[str]) -> dict[str, Any]:
        path = self._one_path(args, "stats")
        if path is None:
            return self.stats_dict()
        w = self.fs.writes
        if w is not None and w.staged(path) is not None:
            sf = w.staged(path)
            assert sf is not None
            return {"path": path, "type": "file", "files": 1, "size": sf.size,
                    "size_str": human_size(sf.size), **self.upload_state(path)}
        node = await self.resolve(path)
        files = await self.walk(node)
        cached = await self.cached_blocks([n.info for n in files if n.info is not None])
        total = cached_bytes = blocks = cached_count = 0
        for n in files:
            assert n.info is not None
            total += n.info.size
            blocks += self.reader.block_count(n.info.size)
            have = cached.get((n.info.key, n.info.version), set())
            cached_count += len(have)
            cached_bytes += sum(self.reader.block_bytes(n.info, i) for i in have)
        return {
            "path": node.path or ".",
            "type": "directory" if node.is_dir else "file",
            "files": len(files),
            "size": total,
            "size_str": human_size(total),
            "cached_bytes": cached_bytes,
            "cached_bytes_str": human_size(cached_bytes),
            "blocks": blocks,
            "cached_blocks": cached_count,
            "fraction_cached": round(cached_bytes / total, 4) if total else 1.0,
            **(self.upload_state(node.path) if not node.is_dir else {}),
        }

    async def _cmd_clear(self, args: list[str]) -> dict[str, Any]:
        path = self._one_path(args, "clear")
        before = self.blocks.volume()
        self.reader.forget_recent()  # nothing cleared may be served from memory either
        if path is None:
            removed = await trio.to_thread.run_sync(self.blocks.clear)
            what, kind = "", "cache"
        else:
            node = await self.resolve(path)
            source = self.reader.store.source_id
            if node.is_dir:
                prefix = node.path + "/" if node.path else ""
                removed = await trio.to_thread.run_sync(self.blocks.evict_matching, source, prefix)
            else:
                removed = await trio.to_thread.run_sync(self.blocks.evict_object, source, node.path)
            what, kind = node.path or ".", "directory" if node.is_dir else "file"
        self._cleared += removed
        freed = max(0, before - self.blocks.volume())
        return {
            "cleared": kind,
            "path": what or None,
            "blocks_removed": removed,
            "bytes_freed": freed,
            "bytes_freed_str": human_size(freed),
            "current_size": self.blocks.volume(),
        }

    async def _cmd_prefetch(self, args: list[str]) -> dict[str, Any]:
        if not args:
            raise InvalidArgument("usage: prefetch PATH [PATH...]")
        if not self.settings.cache_enabled:
            raise InvalidArgument("prefetch needs the disk cache, which is disabled (cache size 0)")
        rels = [self.relative(a) for a in args]
        nodes = [await self.resolve(r) for r in rels]  # all paths valid, or nothing is queued
        seen: set[str] = set()
        files: list[Entry] = []
        for node in nodes:
            for f in await self.walk(node, typed=True):
                if f.path not in seen and f.info is not None:
                    seen.add(f.path)
                    files.append(f)
        files.sort(key=lambda n: n.path)
        infos = [f.info for f in files if f.info is not None]
        cached = await self.cached_blocks(infos)
        todo = [
            (
                obj,
                [
                    i
                    for i in range(self.reader.block_count(obj.size))
                    if i not in cached.get((obj.key, obj.version), ())
                ],
            )
            for obj in infos
        ]
        req = self.prefetcher.submit([r or "." for r in rels], todo)
        out = {
            "id": req.id,
            "files": len(infos),
            "files_queued": req.files_queued,
            "bytes_queued": req.bytes_queued,
            "bytes_queued_str": human_size(req.bytes_queued),
            "files_cached": req.files_cached,
            "bytes_cached": req.bytes_cached,
        }
        if req.bytes_queued + self.blocks.volume() > self.settings.cache_size:
            out["warning"] = (
                f"{human_size(req.bytes_queued)} queued but the cache holds "
                f"{human_size(self.settings.cache_size)}: the least recently used blocks "
                "(perhaps prefetched ones) will be evicted"
            )
        return out

    async def _cmd_cancel(self, args: list[str]) -> dict[str, Any]:
        path = self._one_path(args, "cancel-prefetch")
        return self.prefetcher.cancel("" if path is None else path)

    async def _cmd_hint_open(self, args: list[str]) -> dict[str, Any]:
        if not 1 <= len(args) <= 3:
            raise InvalidArgument("usage: hint-open ID [WINDOW_FILES [WINDOW_BYTES]]")
        self._need_cache("hints")
        try:
            files = int(args[1]) if len(args) > 1 else None
            nbytes = parse_size(args[2]) if len(args) > 2 else None
        except ValueError as exc:
            raise InvalidArgument(f"hint-open: {exc}") from None
        if nbytes is not None and nbytes < 1:
            raise InvalidArgument("hint-open: the window must hold at least one byte")
        return self.hints.open(args[0], files, nbytes)

    async def _cmd_hint(self, args: list[str]) -> dict[str, Any]:
        if len(args) < 2:
            raise InvalidArgument("usage: hint ID PATH [PATH...]")
        return self.hints.append(args[0], [self.relative(a) for a in args[1:]])

    async def _cmd_hint_at(self, args: list[str]) -> dict[str, Any]:
        if len(args) != 2 or not args[1].isdigit():
            raise InvalidArgument("usage: hint-at ID POSITION (files consumed so far)")
        return self.hints.advance(args[0], int(args[1]))

    async def _cmd_hint_cancel(self, args: list[str]) -> dict[str, Any]:
        if len(args) != 1:
            raise InvalidArgument("usage: hint-cancel ID")
        return {"id": args[0], **self.hints.cancel(args[0])}

    async def _file_info(self, rel: str) -> ObjectInfo:
        """A hinted path's object. Resolving it fills what the program's lookup will find, so
        its ``open`` is answered from memory."""
        entry = await self.resolve(rel)
        if entry.is_dir:
            raise IsADirectory(f"{rel} is a directory")
        if entry.info is None:
            raise NotFound(f"{rel}: no such file")
        return entry.info

    async def _list_folder(self, rel: str) -> None:
        """List a whole folder: every lookup in it is then answered from the listing."""
        await self.fs.entries(rel)

    def _need_cache(self, what: str) -> None:
        if not self.settings.cache_enabled:
            raise InvalidArgument(f"{what} need the disk cache, which is disabled (cache size 0)")

    # --- paths -----------------------------------------------------------------------------

    def _one_path(self, args: list[str], cmd: str) -> str | None:
        if len(args) > 1:
            raise InvalidArgument(f"usage: {cmd} [PATH] (one path; quote names with spaces)")
        return self.relative(args[0]) if args else None

    def relative(self, arg: str) -> str:
        """A command's path argument -> key relative to the mount root ("" for the root)."""
        if not arg or "\x00" in arg:
            raise InvalidArgument(f"invalid path {arg!r}")
        if arg.startswith("/"):
            p = posixpath.normpath(arg)
            for mp in self._mountpoints:
                if p == mp or p.startswith(mp.rstrip("/") + "/"):
                    return p[len(mp) :].strip("/")
            where = self._mountpoints[-1] if self._mountpoints else "the mount"
            raise InvalidArgument(f"{arg}: not inside {where} (give a path relative to the mount)")
        p = posixpath.normpath(arg)
        if p == ".." or p.startswith("../"):
            raise InvalidArgument(f"{arg}: '..' leads outside the mount")
        return "" if p == "." else p

    async def resolve(self, rel: str) -> Entry:
        """The file or directory at ``rel`` (from :meth:`relative`); NotFound if missing."""
        return await self.fs.resolve_path(rel)

    async def walk(self, node: Entry, *, typed: bool = False) -> list[Entry]:
        """Every file at or under ``node`` (listing folders fills the metadata cache).
        ``typed``: learn each small S3 object's type as a lookup would (one GET each, whose
        bytes are then cached: a prefetch's business anyway)."""
        if not node.is_dir:
            return [node]
        files: list[Entry] = []
        limit = trio.Semaphore(_WALK_PARALLEL)

        async def visit(d: Entry, nursery: trio.Nursery) -> None:
            async with limit:
                entries = await self.fs.entries(d.path, typed=typed)
            for child in entries:
                if child.is_dir:
                    nursery.start_soon(visit, child, nursery)
                else:
                    files.append(child)

        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(visit, node, nursery)
        return files

    async def cached_blocks(self, objs: list[ObjectInfo]) -> dict[tuple[str, str], set[int]]:
        """(key, version) -> indices of its blocks in the cache, for the current block size."""
        return await trio.to_thread.run_sync(self._cached_blocks_sync, objs)

    def _cached_blocks_sync(self, objs: list[ObjectInfo]) -> dict[tuple[str, str], set[int]]:
        """Worker thread: ask per block, or scan the cache's keys once if that is fewer."""
        out: dict[tuple[str, str], set[int]] = {}
        wanted = sum(self.reader.block_count(o.size) for o in objs)
        if not objs or self.blocks.count() == 0:
            return out
        if wanted <= self.blocks.count():
            for o in objs:
                have = {
                    i
                    for i in range(self.reader.block_count(o.size))
                    if self.blocks.contains(self.reader.block_key(o, i))
                }
                if have:
                    out[(o.key, o.version)] = have
            return out
        keys = {(o.key, o.version) for o in objs}
        source, bs = self.reader.store.source_id, self.reader.block_size
        for ck in self.blocks.iter_keys():
            p = parse_cache_key(ck)
            if p and p[0] == source and p[3] == bs and (p[1], p[2]) in keys:
                out.setdefault((p[1], p[2]), set()).add(p[4])
        return out

    # --- statistics ------------------------------------------------------------------------

    def stats_dict(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        volume = self.blocks.volume()
        size_limit = self.settings.cache_size if self.settings.cache_enabled else 0
        lookups = c[S.HITS] + c[S.MISSES]
        streams = self.hints.as_list()
        return {
            "source": self.source,
            "cache_dir": self.blocks.directory or None,
            "control_socket": self.socket_path,
            "cache_size": size_limit,
            "cache_size_str": human_size(size_limit),
            "current_size": volume,
            "current_size_str": human_size(volume),
            "current_count": self.blocks.count(),
            "load_factor": round(volume / size_limit, 4) if size_limit else 0.0,
            "block_size": self.settings.block_size,
            "hits": c[S.HITS],
            "misses": c[S.MISSES],
            "hit_ratio": round(c[S.HITS] / lookups, 4) if lookups else 0.0,
            "bytes_served": c[S.BYTES_SERVED],
            "bytes_fetched": c[S.BYTES_FETCHED],
            "fetches": c[S.FETCHES],
            "fetches_in_flight": self.stats.fetches_in_flight,
            "evictions": max(0, self.blocks.evictions() - self._cleared),
            "readahead_blocks": c[S.READAHEAD_BLOCKS],
            "corrupt_blocks": c[S.CORRUPT_BLOCKS],
            **self.prefetcher.totals(),
            "errors": c[S.ERRORS],
            "open_files": self.fs.open_handles,
            "uptime_s": round(time.monotonic() - self.stats.started, 1),
            **self.request_stats(),
            **self.worker_stats(),
            "prefetch_requests": self.prefetcher.requests(),
            "hint_window_limited": any(st["limited_by_cache"] for st in streams),
            "hint_streams": streams,
            **self.write_stats(),
        }

    def counters(self) -> dict[str, Any]:
        """The statistics another user (not the mounting user, not root) may read: counters
        and sizes only, no path, prefetch request or hint stream (they may not be allowed to
        list them), no cache directory."""
        out = {k: v for k, v in self.stats_dict().items()
               if not isinstance(v, (list, dict)) and k != "hint_window_limited"}
        return {**out, "cache_dir": None}

    def request_stats(self) -> dict[str, Any]:
        """FUSE requests by kind and the daemon's CPU time (a reader of the stats sees its own
        LOOKUP/OPEN/READ of the control file counted)."""
        requests = self.stats.request_counts()
        cpu, loop = self.stats.cpu()
        return {
            "fuse_requests": requests,
            "fuse_requests_total": sum(requests.values()),
            "cpu_s": round(cpu, 4),
            "cpu_loop_s": None if loop is None else round(loop, 4),
        }

    def worker_stats(self) -> dict[str, Any]:
        """The fetch worker processes (``--fetch-workers``): how many serve, their pids, the
        blocks they fetched or found cached, restarts, requests sent again after a worker
        died, and their CPU seconds (as of each one's last reply)."""
        pool = self.reader.pool
        if pool is None:
            return {"fetch_workers": 0, "workers_ready": 0, "worker_pids": [], "worker_fetches": 0,
                    "worker_hits": 0, "worker_restarts": 0, "worker_retries": 0,
                    "worker_cpu_s": 0.0}
        return {
            "fetch_workers": 0 if pool.broken else pool.count,
            "workers_ready": pool.ready(),
            "worker_pids": pool.pids(),
            "worker_fetches": pool.fetches,
            "worker_hits": pool.hits,
            "worker_restarts": pool.restarts,
            "worker_retries": pool.retries,
            "worker_cpu_s": round(pool.cpu_s(), 4),
        }

    def write_stats(self) -> dict[str, Any]:
        w = self.fs.writes
        if w is None:
            return {"staged_bytes": 0, "uploads_pending": 0, "uploads_done": 0,
                    "uploads_failed": 0, "upload_bytes": 0, "conflicts": 0,
                    "deletes_pending": 0}
        u = w.uploads
        return {
            "staged_bytes": w.staging.staged_bytes(),
            "uploads_pending": u.pending,
            "uploads_in_flight": u.in_flight,
            "uploads_done": u.done,
            "uploads_failed": len(u.failed),
            "upload_bytes": u.bytes,
            "conflicts": u.conflicts,
            "deletes_pending": len(w.deletes.entries),
        }
