"""The thin pyfuse3 adapter: converts types and errors, and nothing else."""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from . import threads
from .control import Control
from .errors import ReadOnly, to_errno
from .fs import CONTROL_INO, CONTROL_NAME, ROOT_INO, Attr, FileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


def _errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn every exception into a FUSEError through :func:`fusefs.errors.to_errno`; report
    the request's duration to the adapter's ``observe`` hook, if one is set (metrics)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        observe = args[0].observe  # type: ignore[attr-defined]
        start = time.perf_counter() if observe is not None else 0.0
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:  # the one place errors become errno
            raise pyfuse3.FUSEError(to_errno(exc)) from None
        finally:
            if observe is not None:
                observe(name, time.perf_counter() - start)

    return wrapper


def _read_only(*_: Any, **__: Any) -> Any:
    async def op(*args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return op


class FuseOperations(pyfuse3.Operations):  # type: ignore[misc]
    """Maps kernel requests onto :class:`FileSystem` and :class:`Control`.

    Invariant: no handler lets an exception other than ``FUSEError`` escape (pyfuse3 would end
    its main loop and the mount with it): every one is wrapped by :func:`_errors`, or, where the
    kernel expects no reply (``forget``), logs the error.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    #: ``observe(operation, seconds)`` after each request (metrics), or None
    observe: Callable[[str, float], None] | None = None

    def __init__(self, fs: FileSystem, control: Control) -> None:
        super().__init__()
        self.fs = fs
        self.control = control
        fs.on_changed = self.invalidate

    @property
    def timeout(self) -> float:
        return self.fs.kernel_timeout

    async def invalidate(self, ino: int) -> None:
        """Make the kernel drop an inode's cached attributes and pages (its object changed).

        In a worker thread: the kernel may wait for pages locked by reads of that inode, which
        this (trio) thread must answer; bounded, so a stuck kernel never holds a request."""

        def call() -> None:
            try:
                pyfuse3.invalidate_inode(ino, False)
            except OSError as exc:  # ENOENT: the kernel no longer knows the inode
                log.debug("invalidate inode %d: %s", ino, exc)

        with trio.move_on_after(5):
            await threads.run_sync(call)

    def _entry(self, a: Attr, timeout: float | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.timeout if timeout is None else timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    @_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == CONTROL_NAME.encode():
            return self._entry(self.control.attr(), 0)
        try:
            node = await self.fs.lookup(parent_inode, os.fsdecode(name))
        except Exception as exc:
            if to_errno(exc) == errno.ENOENT and self.fs.negative_ttl > 0:
                e = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
                e.st_ino = 0
                e.entry_timeout = self.fs.negative_ttl
                return e
            raise
        return self._entry(self.fs.attr(node))

    async def forget(self, inode_list: Any) -> None:
        try:
            for ino, n in inode_list:
                self.fs.forget(ino, n)
        except Exception as exc:  # FORGET has no reply: log, never end the main loop
            to_errno(exc)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_INO:
            return self._entry(self.control.attr(), 0)
        return self._entry(self.fs.attr(await self.fs.getattr(inode)))

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.fs.opendir(inode)

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        count = await self.fs.readdir(fh, start_id)
        for i in range(start_id, count):
            name, node = self.fs.dir_entry(fh, i)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._entry(self.fs.attr(node)), i + 1
            ):
                self.fs.unused(node)
                return
            node.lookups += 1  # READDIRPLUS: the kernel holds every entry it took

    @_errors
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == CONTROL_INO:
            fh = self.control.open(ctx.uid, flags)  # the uid is kept: write() gets no ctx
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        fh, keep_cache = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.control.owns(fh):
            return self.control.read(fh, off, size)
        # pyfuse3 replies from any contiguous buffer: a memoryview saves a copy per request
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.control.owns(fh):
            return await self.control.write(fh, buf)
        raise ReadOnly("read-only file system")

    @_errors
    async def release(self, fh: int) -> None:
        if self.control.owns(fh):
            try:  # once FLUSH is off (below), a last line without a newline runs here
                await self.control.flush(fh)
            except Exception as exc:  # nobody can see an error at release: log it
                log.info("control command at close failed: %s", exc)
            self.control.release(fh)
        else:
            self.fs.release(fh)

    @_errors
    async def flush(self, fh: int) -> None:
        if self.control.owns(fh):
            await self.control.flush(fh)  # a command written without a final newline
            return
        # Read-only files have nothing to flush. ENOSYS makes the kernel stop sending FLUSH
        # for this mount: one request less on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if (
            inode == CONTROL_INO
            and fields.update_size
            and not (fields.update_mode or fields.update_uid or fields.update_gid)
        ):
            return self._entry(self.control.attr(), 0)  # `echo cmd > .fusefs` truncates first
        raise ReadOnly("read-only file system")

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        bsize = 4096
        total = max(self.fs.settings.cache_size, 0) // bsize
        used = min(total, self.control.blocks.volume() // bsize)
        s.f_bsize = s.f_frsize = bsize
        s.f_blocks = total
        s.f_bfree = s.f_bavail = total - used
        s.f_files = self.fs.node_count
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # Objects carry no extended attributes. ENOSYS makes the kernel stop asking (it
        # answers EOPNOTSUPP itself): `ls -l` asks for two per file otherwise.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    mknod = mkdir = unlink = rmdir = symlink = rename = link = create = _read_only()
    setxattr = removexattr = _read_only()
