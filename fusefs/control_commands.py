"""The commands of the control file: what each one does, and the paths they take.

:class:`ControlCommands` is a part of :class:`fusefs.control.Control` (a base class of it);
the protocol around it (handles, command lines, errors as documents) is in ``control.py``.
Each ``_cmd_*`` takes the command's words after its name and returns a JSON-able dict, or
raises a :class:`~fusefs.errors.FusefsError` (its errno fails the write). Paths are relative
to the mount root (:meth:`ControlCommands.relative`); ``..`` may not leave the mount.
Concurrency: runs on the trio thread; listings and cache scans await worker threads, so
commands on several handles interleave.
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .backends.base import ObjectInfo
from .cache.blocks import parse_cache_key
from .config import human_size, parse_size
from .control_stats import ControlStats
from .errors import InvalidArgument, IsADirectory, NotFound, single_error
from .fs import Entry

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


class ControlCommands(ControlStats):
    """The commands (``execute``) and their path helpers, over the control object's state."""

    #: Mount point spellings (longest first) an absolute path argument may start with
    _mountpoints: list[str]


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
