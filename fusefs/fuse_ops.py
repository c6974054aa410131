"""The thin pyfuse3 adapter: converts types and errors, and nothing else."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from . import threads
from .backends.attrs import SPECIAL_TYPES
from .control import Control
from .errors import IsADirectory, NameTooLong, NotPermitted, ReadOnly, to_errno
from .folders import NAME_MAX
from .fs import CONTROL_INO, CONTROL_NAME, ROOT_INO, FileSystem
from .kinds import LINK_MAX
from .nodes import Attr
from .write.writes import Writes

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

#: The control file's name as the kernel sends it (encoded once, not per LOOKUP).
_CONTROL_NAME = CONTROL_NAME.encode()


def _errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn every exception into a FUSEError through :func:`fusefs.errors.to_errno`; count
    the request by kind (``Stats.requests``) and report its duration to the adapter's
    ``observe`` hook, if one is set (metrics)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        ops = args[0]
        ops.requests[name] += 1  # type: ignore[attr-defined]
        observe = ops.observe  # type: ignore[attr-defined]
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


def _owner(ctx: Any) -> tuple[int, int] | None:
    """The (uid, gid) of the process a request comes from (a new file's owner)."""
    uid, gid = getattr(ctx, "uid", None), getattr(ctx, "gid", None)
    return (uid, gid) if isinstance(uid, int) and isinstance(gid, int) else None


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
        #: FUSE requests by kind (counted by :func:`_errors`), shown in the statistics
        self.requests = control.stats.requests
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

    def _entry(self, a: Attr, timeout: float | None = None,
               attr_timeout: float | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.timeout if timeout is None else timeout
        if attr_timeout is not None:  # a file whose metadata is not known yet (S3): 0
            e.attr_timeout = min(e.attr_timeout, attr_timeout)
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns if a.ctime_ns >= 0 else a.mtime_ns
        e.st_atime_ns = a.atime_ns if a.atime_ns >= 0 else a.mtime_ns
        return e

    @_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == _CONTROL_NAME:
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
        return self._entry(self.fs.attr(node), attr_timeout=self.fs.attr_timeout(node))

    async def forget(self, inode_list: Any) -> None:
        self.requests["forget"] += 1
        try:
            for ino, n in inode_list:
                self.fs.forget(ino, n)
        except Exception as exc:  # FORGET has no reply: log, never end the main loop
            to_errno(exc)

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_INO:
            return self._entry(self.control.attr(), 0)
        node = await self.fs.getattr(inode)
        return self._entry(self.fs.attr(node), attr_timeout=self.fs.attr_timeout(node))

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.fs.opendir(inode)

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        count = await self.fs.readdir(fh, start_id)
        for i in range(start_id, count):
            name, node = self.fs.dir_entry(fh, i)
            if node.path == CONTROL_NAME:  # an object under the control name: never shown
                self.fs.unused(node)
                continue
            # a sub-folder whose marker was not read: the defaults, asked again at its stat
            timeout = None if self.fs.attr_known(node) else 0
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name),
                self._entry(self.fs.attr(node), timeout, attr_timeout=self.fs.attr_timeout(node)),
                i + 1
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
        h = self.fs.handle(fh)
        if h.staged is None or not h.writable or self.writes is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        n = await self.writes.write(h.staged, off, buf)
        self.fs.folder_meta.changed(h.node.path)  # a write moves the ctime too
        return n

    @property
    def writes(self) -> Writes | None:
        return self.fs.writes

    def _writes(self) -> Writes:
        w = self.fs.writes
        if w is None or self.fs.settings.read_only:
            raise ReadOnly("read-only file system")
        return w

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode == ROOT_INO and name == _CONTROL_NAME:
            raise pyfuse3.FUSEError(errno.EEXIST)
        fh, node = await self._writes().create(
            parent_inode, os.fsdecode(name), mode & ~getattr(ctx, "umask", 0), flags,
            _owner(ctx))
        return (pyfuse3.FileInfo(fh=fh, keep_cache=False),
                self._entry(self.fs.attr(node)))  # type: ignore[arg-type]

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            self._writes()  # EROFS first, on a read-only mount
            if stat.S_IFMT(mode) not in SPECIAL_TYPES or stat.S_ISLNK(mode):
                raise NotPermitted("only files, folders, links, FIFOs, sockets and device "
                                   "nodes are stored")
            node = await self._writes().special(
                parent_inode, os.fsdecode(name), mode & ~getattr(ctx, "umask", 0), b"",
                _owner(ctx), rdev)
            return self._entry(self.fs.attr(node))  # type: ignore[arg-type]
        fh, node = await self._writes().create(
            parent_inode, os.fsdecode(name), mode & ~getattr(ctx, "umask", 0), os.O_EXCL,
            _owner(ctx))
        await self.fs.release(fh)
        return self._entry(self.fs.attr(node))  # type: ignore[arg-type]

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == _CONTROL_NAME:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = await self._writes().namespace.mkdir(
            parent_inode, os.fsdecode(name), mode & ~getattr(ctx, "umask", 0), _owner(ctx))
        return self._entry(self.fs.attr(node))  # type: ignore[arg-type]

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._writes().namespace.rmdir(parent_inode, os.fsdecode(name))

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._writes().namespace.unlink(parent_inode, os.fsdecode(name))

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        await self._writes().namespace.rename(parent_inode_old, os.fsdecode(name_old),
                                              parent_inode_new, os.fsdecode(name_new), flags)

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        self._writes()
        raise NotPermitted("hard links cannot be stored in a bucket")

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == _CONTROL_NAME:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if len(target) > LINK_MAX:
            raise NameTooLong(f"a link target of {len(target)} bytes (at most {LINK_MAX})")
        node = await self._writes().special(parent_inode, os.fsdecode(name),
                                            stat.S_IFLNK | 0o777, target, _owner(ctx))
        return self._entry(self.fs.attr(node))  # type: ignore[arg-type]

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.control.owns(fh):
            return
        h = self.fs.handle(fh)
        if h.staged is not None and self.writes is not None:
            await self.writes.fsync(h.staged)

    @_errors
    async def release(self, fh: int) -> None:
        if self.control.owns(fh):
            try:  # once FLUSH is off (below), a last line without a newline runs here
                await self.control.flush(fh)
            except Exception as exc:  # nobody can see an error at release: log it
                log.info("control command at close failed: %s", exc)
            self.control.release(fh)
        else:
            await self.fs.release(fh)

    @_errors
    async def flush(self, fh: int) -> None:
        if self.control.owns(fh):
            await self.control.flush(fh)  # a command written without a final newline
            return
        if self.writes is None:
            # Read-only mounts have nothing to flush. ENOSYS makes the kernel stop sending
            # FLUSH for this mount: one request less on every close().
            raise pyfuse3.FUSEError(errno.ENOSYS)
        h = self.fs.handle(fh)
        if h.staged is not None and h.writable:
            await self.writes.flush(h.staged)

    @_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if (
            inode == CONTROL_INO
            and fields.update_size
            and not (fields.update_mode or fields.update_uid or fields.update_gid)
        ):
            return self._entry(self.control.attr(), 0)  # `echo cmd > .fusefs` truncates first
        if inode == CONTROL_INO:
            raise NotPermitted("the control file's attributes cannot change")
        w = self._writes()
        node = self.fs.node(inode)
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        mtime = attr.st_mtime_ns / 1e9 if fields.update_mtime else None
        atime = attr.st_atime_ns / 1e9 if fields.update_atime else None
        if node.is_dir:
            if fields.update_size:
                raise IsADirectory(f"{node.path} is a directory")
            # kept in the folder's marker (sticky kept: it only restricts; no setuid/gid)
            mode = attr.st_mode & 0o1777 if fields.update_mode else None
            await w.attributes.set_folder(node, mode=mode, uid=uid, gid=gid, mtime=mtime,
                                          atime=atime)
            return self._entry(self.fs.attr(node))
        if fields.update_uid or fields.update_gid:
            await w.attributes.chown(node, uid, gid)
        staged = None
        if fh is not None:
            h = self.fs.handle(fh) if not self.control.owns(fh) else None
            staged = h.staged if h is not None else None
        if fields.update_size:
            await w.truncate(node, attr.st_size, staged)
        if fields.update_mtime or fields.update_mode:
            mode = attr.st_mode & 0o777 if fields.update_mode else None  # no setuid/gid/sticky
            await w.attributes.set_times(node, mtime, mode)
        # ctime: any change of attributes or size (kept in memory); atime as utimensat says
        self.fs.folder_meta.changed(node.path, atime=atime)
        return self._entry(self.fs.attr(node))

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
        w = self.fs.writes
        if w is not None and not self.fs.settings.read_only:
            # what can be written: the staging area's free space (a bucket has no limit)
            disk = await threads.run_sync(lambda: os.statvfs(w.staging.disk_path()))
            free = disk.f_bavail * disk.f_frsize // bsize
            s.f_bfree = s.f_bavail = free
            s.f_blocks = max(total, used + free)
            s.f_files = self.fs.node_count + (1 << 30)
            s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = NAME_MAX
        return s

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return True

    # Objects carry no extended attributes: answered as a filesystem without them (ext4
    # without user_xattr): an empty list, ENODATA for a name, ENOTSUP for a change. `getfattr
    # -d`, `cp -p`, `rsync -X` and `tar --xattrs` take that as "none" and go on.
    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)
