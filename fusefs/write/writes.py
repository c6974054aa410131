"""File operations of a read-write mount, on top of the read-only core.

The namespace a program sees is the store's (through :class:`fusefs.fs.FileSystem` and its
listed ranges) overlaid with this mount's own changes that the store does not show yet:
staged files (shown with their local size and time, listed in their folder) and names with a
pending delete (hidden; see :mod:`.deletes`: an open handle keeps reading its bytes); the
overlay and its reconciliation with what the store lists are in :mod:`.overlay`, what follows
an upload (leaving the staging area) in :mod:`.retire`. mkdir, rmdir, unlink and rename are in
:mod:`.namespace`.

Identity: a staged file is one file (the inode the kernel knows), its key only its current
name. Handles hold the staged file (or the object version) they opened; a handle never reads
another file that took its name.

Every change of the bucket carries a condition on the version this mount last saw at that key
(``StagedFile.rec.expect`` for a staged file, the object's version otherwise, a pending
delete's version when the name is re-created): a failed condition is a conflict, and both
versions are kept.

What each operation costs the store: ``create``/``write``/``truncate``: nothing until the file
is closed (one upload then; :mod:`.uploads`); ``utimens``/``chmod``: a metadata update (or
nothing if staged).

Concurrency: everything runs on the trio thread; store calls in worker threads. Changes of a
staged file wait while an upload reads it (``StagedFile.idle``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator

from .. import threads
from ..attrmemory import AttrMemory
from ..backends.attrs import SPECIAL_TYPES
from ..backends.base import ObjectInfo, ObjectStore
from ..backends.local_meta import inside
from ..config import Settings
from ..errors import (
    Exists,
    FusefsError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotFound,
    NotPermitted,
    ReadOnly,
)
from ..folders import check_length, join, valid_name
from ..reader import SeqState
from .attributes import Attributes
from .conditions import MAX_KEY_BYTES
from .deletes import PendingDeletes
from .namespace import Namespace
from .overlay import Overlay
from .retire import Retiring
from .staged import StagedFile
from .staging import Staging
from .uploads import WRITE_BACK_DELAY, Uploads

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class Writes(Overlay, Retiring):
    """The write side of one mount: staging, uploads, file changes (``namespace``: mkdir,
    rmdir, unlink, rename)."""

    def __init__(self, fs: object, store: ObjectStore, settings: Settings, staging: Staging,
                 control_name: str) -> None:
        from ..fs import FileSystem

        assert isinstance(fs, FileSystem)
        self.fs = fs
        self.store = store
        self.settings = settings
        self.staging = staging
        self.control_name = control_name
        self.uploads = Uploads(store, staging, parallel=settings.uploads,
                               on_uploaded=self._uploaded, on_conflict=self._conflicted,
                               on_idle=self.maybe_retire,
                               read_base=self._read_base,
                               single_put_max=settings.upload_part_size,
                               pool=fs.reader.pool,
                               seed=((fs.reader.store.source_id, fs.reader.block_size)
                                     if settings.cache_enabled else None))
        #: deletes decided and not done yet (their names are hidden)
        self.deletes = PendingDeletes(
            store, save=lambda k, v: staging.journal.save_delete(k, v),
            forget=lambda k: staging.journal.remove_delete(k), needed=self._needed,
            limiter=fs.folders.meta_limiter, on_late=self._deleted_late)
        #: folders this mount removed or renamed away while deletes of objects in them
        #: still wait (an open file, an upload that copies from them): hidden until done
        self.gone_folders: set[str] = set()
        self.namespace = Namespace(self)
        self.attributes = Attributes(self)
        fs.writes = self
        fs.folders.attrs = AttrMemory(staging.attrs_path)

    def start(self, nursery: object) -> None:
        for sf in self.staging.recover():
            log.info("resuming the upload of %r (%d bytes) left by an earlier mount",
                     sf.key, sf.size)
        self.deletes.load(self.staging.recovered_deletes)
        self.uploads.start(nursery)  # type: ignore[arg-type]
        nursery.start_soon(self.deletes.run)  # type: ignore[attr-defined]

    def _needed(self, key: str, version: str) -> bool:
        """Does something still read version ``version`` of ``key`` (an open handle, or a
        staged file whose unchanged ranges come from it)? Its delete waits."""
        if self.fs.reading(key, version):
            return True
        for sf in self.staging.all():
            rec = sf.rec
            if (rec.base_key == key and rec.base_version == version
                    and (sf.handles or sf.needs_upload) and sf.copy_ranges()):
                return True
        return False

    def file_of(self, node: object) -> StagedFile | None:
        """The staged file of ``node`` (by identity: a node that lost its name to another
        file keeps its own, through its open handles)."""
        from ..fs import Node

        assert isinstance(node, Node)
        if self.fs.node_by_path(node.path) is node:
            return self.staging.files.get(node.path)
        return self.fs.staged_of(node)

    # --- staged files ----------------------------------------------------------------

    def staged(self, path: str) -> StagedFile | None:
        return self.staging.files.get(path)

    async def settled(self, path: str) -> StagedFile | None:
        """``path``'s staged file once no upload reads it; None if there is none, or if it
        left the staging area while we waited (the store's object is the file then)."""
        while (sf := self.staging.files.get(path)) is not None:
            await sf.idle()
            if self.staging.files.get(path) is sf:
                return sf
        return None

    @contextlib.asynccontextmanager
    async def held(self, path: str) -> AsyncIterator[StagedFile | None]:
        """``path``'s staged file (as :meth:`settled`), kept from leaving the staging area while
        the caller works on it across awaits (counted as a handle: ``_retire`` leaves it), and
        pinned: no upload starts until the caller is done (its key, base and condition are
        the caller's to change)."""
        sf = await self.settled(path)
        if sf is None:
            yield None
            return
        sf.handles += 1
        sf.pin()
        try:
            yield sf
        finally:
            sf.unpin()
            sf.handles -= 1
            self.maybe_retire(sf)

    # --- checks ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        if self.settings.read_only:
            raise ReadOnly("read-only file system")

    def check_name(self, parent_path: str, name: str) -> str:
        if not parent_path and name == self.control_name:
            raise NotPermitted(f"{name} is the control file")
        check_length(name)
        if not valid_name(name) or "/" in name:
            raise InvalidArgument(f"{name!r} cannot be an object name")
        path = join(parent_path, name)
        if len(os.fsencode(self._full_key(path))) > MAX_KEY_BYTES - 1:
            raise NameTooLong(f"{path}: longer than a key may be")
        return path

    def _full_key(self, path: str) -> str:
        return getattr(self.store, "prefix", "") + path

    # --- files -----------------------------------------------------------------------------

    async def create(self, parent_ino: int, name: str, mode: int, flags: int,
                     owner: tuple[int, int] | None = None) -> tuple[int, object]:
        """Create (or, without O_EXCL, open) ``name``; returns (fh, node). ``owner``: the
        creator's (uid, gid), kept in metadata where it is not the mount's default."""
        self.check_writable()
        parent = self.fs.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        path = self.check_name(parent.path, name)
        found = await self.exists(path)
        if found is not None:
            if flags & os.O_EXCL:
                raise Exists(f"{path}: exists")
            if found[0]:
                raise IsADirectory(f"{path} is a directory")
            node = self.fs.file_node(path, found[1])
            node.lookups += 1
            fh = await self.open(node, flags | os.O_TRUNC if flags & os.O_TRUNC else flags)
            return fh, node
        # re-created over a name this mount removed and the store still has: the new file
        # replaces that version (its upload's condition), the pending delete is absorbed
        taken = await self.deletes.take(path)
        perm = mode & 0o777  # never setuid, setgid or sticky
        kind = stat.S_IFMT(mode)
        keep: int | None = perm if perm != self.settings.file_mode else None
        if kind in SPECIAL_TYPES:  # a link, FIFO...: its type is in its metadata, always
            keep = kind | perm
        try:
            sf = self.staging.create(path, None, taken or "", keep)
            if owner is not None:
                sf.rec.uid = owner[0] if owner[0] != self.fs.uid else None
                sf.rec.gid = owner[1] if owner[1] != self.fs.gid else None
            sf.touch()  # an empty new file is a change to upload
            await self.changing(sf)
        except BaseException:
            if taken:
                await self.deletes.delete(path, taken)
            raise
        node = self.fs.file_node(path, self.info_of(sf))
        node.lookups += 1
        self.fs.folder_meta.drop(path)  # a new file: no times of an older one
        self.fs.folder_meta.entries_changed(parent.path)
        fh = self.fs.new_handle(node, self.info_of(sf), sf, writable=True)
        sf.writers += 1
        sf.handles += 1
        return fh, node

    async def special(self, parent_ino: int, name: str, mode: int, content: bytes,
                      owner: tuple[int, int] | None = None, rdev: int = 0) -> object:
        """``symlink`` (``S_IFLNK``, ``content`` the target) or ``mknod`` of a FIFO, socket
        or device node: a new object whose ``mode`` metadata names the type (s3fs's
        convention), staged and uploaded as any new file; its node. On a local source a
        link that could lead out of it is refused (NotPermitted), as it is never shown."""
        if stat.S_ISLNK(mode) and getattr(self.store, "links_inside", False):
            parent = self.fs.node(parent_ino)
            if not inside(join(parent.path, name), os.fsdecode(content)):
                raise NotPermitted(f"{name}: a link to {os.fsdecode(content)!r} could lead "
                                   "out of the source")
        fh, node = await self.create(parent_ino, name, mode, os.O_EXCL, owner)
        try:
            if stat.S_IFMT(mode) in (stat.S_IFCHR, stat.S_IFBLK):
                h = self.fs.handle(fh)
                assert h.staged is not None
                h.staged.rec.rdev = rdev
                h.staged.touch()  # a change: its journal row is saved again at release
            if content:
                h = self.fs.handle(fh)
                assert h.staged is not None
                await self.write(h.staged, 0, content)
        finally:
            await self.fs.release(fh)
        return node

    async def open(self, node: object, flags: int) -> int:
        """Open a file for writing (or reading, if it is staged)."""
        from ..fs import Node

        assert isinstance(node, Node)
        writing = bool(flags & WRITE_FLAGS)
        if writing:
            self.check_writable()
        sf = self.staging.files.get(node.path)
        if sf is None and writing:
            base = node.info
            assert base is not None
            sf = self.staging.create(node.path, base, base.version)
            sf.confirmed = node.confirmed  # its base: the store's version, as seen then
            self.fs.attach_handles(node, sf)
            if not flags & os.O_TRUNC and 0 < base.size <= self.settings.block_size:
                # a small file is read whole now (one block, through the cache): were it
                # changed by another writer before this one uploads, this mount still has
                # every byte of its own version to keep as a conflict copy
                try:
                    sf.fill(0, await self._read_base(base, 0, base.size))
                except BaseException:
                    await threads.run_sync(self.staging.remove, sf)
                    raise
        if sf is None:
            raise FusefsError("not staged")
        sf.handles += 1  # held before any wait: an open file is never retired
        if writing:
            sf.writers += 1
        try:
            if writing and flags & os.O_TRUNC and sf.size:
                await sf.idle()
                await self.changing(sf)
                sf.truncate(0)
                self.fs.folder_meta.changed(node.path)  # ctime moves with the mtime
        except BaseException:
            sf.handles -= 1
            if writing:
                sf.writers -= 1
            raise
        return self.fs.new_handle(node, self.info_of(sf), sf, writable=writing)

    async def changing(self, sf: StagedFile) -> None:
        """Before the first change after a close: journal the file as being changed (state
        ``open``), so a crash from here on leaves it failed and reported, never uploaded as a
        mix of two versions."""
        if sf.changing:
            return
        sf.changing = True
        rec, _ = self.staging.snapshot(sf, "open")
        try:
            await threads.run_sync(self.staging.sync, sf, rec, False)
        except BaseException:
            sf.changing = False
            raise

    async def read(self, sf: StagedFile, offset: int, size: int) -> bytes:
        parts = []
        for local, a, b in sf.segments(offset, size):
            if local:
                data = sf.read_local(a, b - a)
                if len(data) < b - a:
                    data += bytes(b - a - len(data))
                parts.append(data)
            else:
                parts.append(await self._read_base(sf.base_info(), a, b - a))
        return b"".join(parts)

    async def _read_base(self, base: ObjectInfo, offset: int, size: int) -> bytes:
        """Bytes of a base object for an upload, through the block cache."""
        return bytes(await self.fs.reader.read(base, offset, size, SeqState()))

    async def write(self, sf: StagedFile, offset: int, data: bytes) -> int:
        await sf.idle()
        await self.changing(sf)
        return sf.write(offset, data)

    async def flush(self, sf: StagedFile) -> None:
        """``close`` of a write handle: the data durable on local disk (with
        ``--sync-uploads``: in the store, else UploadFailed). The upload itself starts at the
        last close (``release``): a ``close`` of one of several descriptors (``dd`` dups its
        output and closes the original first) must not upload half a file."""
        if not sf.needs_upload:
            return
        await self.uploads.sync(sf)
        if self.settings.sync_uploads:
            await self.uploads.wait_file(sf)

    async def fsync(self, sf: StagedFile) -> None:
        if sf.needs_upload:
            await self.uploads.sync(sf)
        await self.uploads.wait_file(sf)

    async def release(self, sf: StagedFile, writable: bool) -> None:
        """The last close of a handle: when the last writer goes, the upload is queued
        (write-back); when the last handle goes, an uploaded file leaves the staging area."""
        sf.handles -= 1
        if writable:
            sf.writers -= 1
            if sf.writers == 0 and sf.needs_upload and not sf.unlinked:
                if sf.synced_gen != sf.gen:
                    await self.uploads.sync(sf)
                self.uploads.queue(sf, delay=WRITE_BACK_DELAY)
        if sf.handles > 0:
            return
        if sf.unlinked:
            await threads.run_sync(self.staging.remove, sf)
            self.deletes.kick()  # a delete may have waited for this file
        else:
            self.maybe_retire(sf)

    async def truncate(self, node: object, size: int, sf: StagedFile | None) -> None:
        """``truncate``/``ftruncate``: through the open handle's staged file, or a staged copy
        uploaded shortly after (unless a handle opens meanwhile: ``open(O_TRUNC)`` comes as a
        truncate and then an open)."""
        from ..fs import Node

        assert isinstance(node, Node)
        self.check_writable()
        if sf is not None:
            await sf.idle()
            await self._truncate(sf, size)
            return
        async with self.held(node.path) as sf:
            if sf is None:
                base = node.info
                assert base is not None
                if size == base.size:
                    return
                sf = self.staging.create(node.path, base, base.version)
                self.fs.attach_handles(node, sf)
            await self._truncate(sf, size)

    async def _truncate(self, sf: StagedFile, size: int) -> None:
        await self.changing(sf)
        sf.truncate(size)
        await self.settle_change(sf)

    async def settle_change(self, sf: StagedFile) -> None:
        """A change made through no write handle (truncate, chmod, touch, chown): journaled
        now (a crash within the write-back delay keeps it) and its upload queued. With a
        writer open, its close does both."""
        if sf.writers == 0:
            await self.uploads.sync(sf)
            self.uploads.queue(sf, delay=WRITE_BACK_DELAY)

    # --- store calls -----------------------------------------------------------------

    async def marker_metadata_dropped(self, key: str) -> bool:
        """Does the store keep no metadata on folder markers (``key``: one just written with
        a ``mode``, or one it refused to change though it lists it)? One HEAD; if so, the
        mount keeps folders' attributes in memory from now on (``FolderMeta.memory_only``),
        and says so once."""
        fm = self.fs.folder_meta
        if fm.memory_only:
            return True
        try:
            info = await threads.run_sync(self.store.head, key,
                                          limiter=self.fs.folders.meta_limiter)
        except NotFound:
            return False
        if info.mode is not None:
            return False
        fm.memory_only = True
        log.warning("this store keeps no metadata on folder markers (%r): folders' modes, "
                    "owners and times are kept in memory until unmount", key)
        return True

    async def delete_object(self, key: str) -> None:
        await threads.run_sync(self.store.delete, key, limiter=self.fs.folders.meta_limiter)
