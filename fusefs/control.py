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
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import stats as S
from .cache.blocks import BlockStore
from .cmdline import CommandLines
from .config import Settings
from .control_commands import ControlCommands
from .errors import AccessDenied, FusefsError, InvalidArgument, first_error
from .fs import CONTROL_INO, FileSystem
from .hints import HintStreams
from .nodes import Attr
from .prefetch import Prefetcher
from .reader import Reader

log = logging.getLogger(__name__)

#: Longest command line accepted (a prefetch of many quoted paths fits easily).
MAX_COMMAND = 1 << 20


@dataclass
class _CtlHandle:
    uid: int
    lines: CommandLines = field(default_factory=CommandLines)  # bytes written, not yet run
    result: bytes | None = None  # the last command's JSON; None -> fresh stats on read
    answer: dict[str, Any] = field(default_factory=dict)  # the last command's result
    doc: bytes = b""  # the document being read
    origin: int | None = None  # file offset where ``doc`` starts; None: the next read starts one


class Control(ControlCommands):
    """State behind the control file; one handle per ``open``.

    This module is the protocol (handles, command lines, errors rendered as documents); the
    commands are in :mod:`fusefs.control_commands`, the statistics in
    :mod:`fusefs.control_stats` (base classes over the state set here).
    """

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
