"""Namespace operations of a read-write mount: mkdir, rmdir, unlink and rename.

Each works on the store and on :class:`~.writes.Writes`'s overlay (staged files, names unlinked
while open) and writes what the store now shows into the listed ranges at once
(``Folders.note``), so a lookup after it needs no request. Costs: ``mkdir`` one PUT of a
``dir/`` marker; ``rmdir`` a LIST (is it empty?) and a DELETE; ``unlink`` a DELETE (at the last
close if the file is open); ``rename`` of a file a server-side copy and a DELETE, or nothing if
it is still staged with all its bytes (its pending upload moves with it; one with unchanged
ranges of its object gets them copied to the new name first); of a folder the same for each
object under it, up to ``rename_limit`` (above: EXDEV, and ``mv`` copies by itself).

Deletes go through :class:`~.deletes.PendingDeletes`: journaled, conditional on the version
this mount saw, held while an open handle still reads it. A name another file takes (rename
over it, a new file) is "claimed" first: an upload of it in flight ends, and the taker's
condition is the version the store then holds there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .. import threads
from ..backends.base import Attrs, Condition, ObjectInfo, Upload
from ..errors import (
    Conflict,
    CrossDevice,
    Exists,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    StaleVersion,
)
from ..folders import join
from ..safety import clean_key
from .conditions import condition_for
from .uploads import WRITE_BACK_DELAY

if TYPE_CHECKING:
    from .staged import StagedFile
    from .writes import Writes

log = logging.getLogger(__name__)

#: renameat2's flag: fail with EEXIST if the new name exists (``mv -n``). A file's rename then
#: carries the condition "absent" at the new name, so another writer's object is never replaced.
RENAME_NOREPLACE = 1


class Namespace:
    """The namespace operations of one read-write mount (``Writes.namespace``)."""

    def __init__(self, writes: Writes) -> None:
        self.w = writes
        self._markers_checked = False

    async def mkdir(self, parent_ino: int, name: str, mode: int | None = None,
                    owner: tuple[int, int] | None = None) -> object:
        """A folder marker ``path/`` with the folder's mode (sticky kept, never setuid or
        setgid), owner (where not the mount's default) and mtime in its metadata, made only
        if none is there (``If-None-Match: *``)."""
        self.w.check_writable()
        fs = self.w.fs
        parent = fs.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        path = self.w.check_name(parent.path, name)
        if await self.w.exists(path) is not None:
            raise Exists(f"{path}: exists")
        uid, gid = owner if owner is not None else (None, None)
        attrs = Attrs(time.time(), stat.S_IFDIR | ((mode if mode is not None
                                                     else self.w.settings.dir_mode) & 0o1777),
                      uid=uid if uid != fs.uid else None, gid=gid if gid != fs.gid else None)
        sent = fs.clock()
        try:
            info = await threads.run_sync(
                lambda: self.w.store.put_file(path + "/", Upload(os.devnull, 0),
                                              condition=Condition(absent=True), attrs=attrs),
                limiter=fs.folders.meta_limiter)
        except Conflict as exc:
            raise Exists(f"{path}: exists") from exc
        if info.mode is None:  # what was sent, if the answer did not say
            info = dataclasses.replace(info, meta_mtime=attrs.mtime, mode=attrs.mode,
                                       uid=attrs.uid, gid=attrs.gid)
        if not self.w.store.enforces_conditions and not self._markers_checked:
            # an S3-compatible server: does it keep a marker's metadata? (once a mount)
            self._markers_checked = True
            await self.w.marker_metadata_dropped(path + "/")
        if fs.folder_meta.memory_only:
            fs.folder_meta.keep(path, info)
        else:
            fs.folder_meta.seen(path, info, sent)
        self.w.gone_folders.discard(path)
        fs.folders.note(path + "/", None)
        fs.folders.note_empty(path)
        fs.folder_meta.entries_changed(parent.path)
        node = fs.dir_node(path)
        node.lookups += 1
        return node

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self.w.check_writable()
        parent = self.w.fs.node(parent_ino)
        path = join(parent.path, name)
        found = await self.w.exists(path)
        if found is None:
            raise NotFound(f"{path}: no such directory")
        if not found[0]:
            raise NotADirectory(f"{path} is not a directory")
        if self.w.staging.files.has_under(path):
            raise NotEmpty(f"{path}: not empty")
        # enough entries to see past the marker and the names this mount removed
        n = 2 + len(self.w.deletes.pending_under(path + "/"))
        page = await threads.run_sync(
            lambda: next(iter(self.w.store.list(path + "/", max_keys=n)), None),
            limiter=self.w.fs.folders.meta_limiter)
        if page is not None and (page.prefixes or any(
                o.key != path + "/" and o.key not in self.w.deletes for o in page.objects)):
            raise NotEmpty(f"{path}: not empty")  # (names this mount removed do not count)
        await self.w.delete_object(path + "/")
        if self.w.deletes.pending_under(path + "/"):
            self.w.gone_folders.add(path)
        self.w.fs.folders.note(path + "/", False)
        self.w.fs.drop_path(path)
        self.w.fs.folder_meta.entries_changed(parent.path)

    async def unlink(self, parent_ino: int, name: str) -> None:
        self.w.check_writable()
        parent = self.w.fs.node(parent_ino)
        path = join(parent.path, name)
        if not parent.path and name == self.w.control_name:
            raise NotPermitted(f"{name} is the control file")
        sf = await self.w.settled(path)
        if sf is not None:
            stored = sf.rec.expect or ""  # the version the store holds at its name
            await self._unstage(sf)
            await self.w.deletes.delete(path, stored)
        else:
            found = await self.w.exists(path)
            if found is None:
                raise NotFound(f"{path}: no such file")
            if found[0]:
                raise IsADirectory(f"{path} is a directory")
            assert found[1] is not None
            # done now, or once no open handle reads it (it keeps its bytes); journaled first
            await self.w.deletes.delete(path, found[1].version)
        self.w.fs.folders.note(path, False)
        self.w.fs.drop_path(path)
        self.w.fs.folder_meta.entries_changed(parent.path)

    async def _unstage(self, sf: StagedFile) -> None:
        """``sf`` loses its name (unlinked, or replaced by a rename): nothing of it is
        uploaded; its data goes once no handle reads it."""
        sf.unlinked = True
        self.w.staging.detach(sf)
        sf.signal()
        if sf.handles == 0:
            await threads.run_sync(self.w.staging.remove, sf)
        else:  # its journal row goes now: after a crash it must not come back
            await threads.run_sync(self.w.staging.journal.remove, sf.rec.id)

    @contextlib.asynccontextmanager
    async def _claim(self, path: str) -> AsyncIterator[str]:
        """Take the name ``path`` for another file: yields the version the store holds there
        as this mount knows it ("" none: the taker's condition). An upload of a staged file
        there ends first and none starts; a pending delete there is absorbed. If the body
        fails, everything is as it was; else that staged file has lost the name."""
        async with self.w.held(path) as sf:
            if sf is not None:
                sf.unlinked = True  # no upload of it starts now
                try:
                    yield sf.rec.expect or ""
                except BaseException:
                    sf.unlinked = False
                    if sf.needs_upload and sf.writers == 0:
                        self.w.uploads.queue(sf)
                    raise
        if sf is not None:
            await self._unstage(sf)
            return
        taken = await self.w.deletes.take(path)
        if taken is not None:
            try:
                yield taken
            except BaseException:
                await self.w.deletes.delete(path, taken)
                raise
            return
        found = await self.w.exists(path)
        if found is not None and found[0]:
            raise IsADirectory(f"{path} is a directory")
        yield found[1].version if found is not None and found[1] is not None else ""

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str,
                     flags: int) -> None:
        self.w.check_writable()
        if flags & ~RENAME_NOREPLACE:
            # RENAME_EXCHANGE swaps two names: two objects cannot change places atomically
            # in a bucket; RENAME_WHITEOUT is for overlay filesystems. ext4 answers EINVAL
            # for flags it does not know: so does fusefs (documented in docs/posix.md).
            raise InvalidArgument("rename flags other than RENAME_NOREPLACE are not "
                                  "supported")
        p_old, p_new = self.w.fs.node(old_parent), self.w.fs.node(new_parent)
        old = join(p_old.path, old_name)
        if not p_old.path and old_name == self.w.control_name:
            raise NotPermitted(f"{old_name} is the control file")
        new = self.w.check_name(p_new.path, new_name)
        if old == new:
            return
        src = await self.w.exists(old)
        if src is None:
            raise NotFound(f"{old}: no such file or directory")
        dst = await self.w.exists(new)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise Exists(f"{new}: exists")
        if src[0]:
            if dst is not None and not dst[0]:
                raise NotADirectory(f"{new} is not a directory")
            if (new + "/").startswith(old + "/"):
                raise InvalidArgument(f"cannot move {old} into itself")
            if dst is not None:
                if self.w.staging.files.has_under(new):
                    raise NotEmpty(f"{new}: not empty")
                await self.rmdir(new_parent, new_name)
            await self._rename_dir(old, new)
            self._renamed(p_old.path, p_new.path, new)
            return
        if dst is not None and dst[0]:
            raise IsADirectory(f"{new} is a directory")
        sent = self.w.fs.clock()
        async with self._claim(new) as expect:
            new_info = await self._rename_file(old, new, expect)
        self.w.fs.move_path(old, new)
        if new_info is not None:  # the same bytes under a new name: the kernel's pages stay
            self.w.fs.observed(new, new_info, sent, same_bytes=True)
        self._renamed(p_old.path, p_new.path, new)

    def _renamed(self, old_parent: str, new_parent: str, new: str) -> None:
        """After a rename: both folders' mtime and ctime, and the moved entry's ctime, are
        now (kept in memory)."""
        fm = self.w.fs.folder_meta
        fm.entries_changed(old_parent)
        if new_parent != old_parent:
            fm.entries_changed(new_parent)
        fm.changed(new)

    async def _rename_file(self, old: str, new: str, expect: str) -> ObjectInfo | None:
        """Move a file's name in the store (its new info), or move its staged file (None).
        ``expect``: what the store holds at ``new`` (the copy's or upload's condition)."""
        async with self.w.held(old) as sf:
            if sf is not None:
                await self._move_staged(sf, old, new, expect)
                return None
        found = await self.w.exists(old)
        if found is None or found[1] is None:
            raise NotFound(f"{old}: no such file")
        info = found[1]
        new_info = await threads.run_sync(
            lambda: self.w.store.copy(old, info.version, new, condition=condition_for(expect)),
            limiter=self.w.fs.folders.meta_limiter)
        if new_info.meta_mtime is None and (info.meta_mtime is not None or info.mode is not None):
            new_info = dataclasses.replace(new_info, meta_mtime=info.meta_mtime, mode=info.mode,
                                           uid=info.uid, gid=info.gid, rdev=info.rdev)
        # handles open on the old name read the same bytes under the new one
        self.w.fs.retarget_handles(info, new_info)
        await self.w.deletes.delete(old, info.version)
        self.w.fs.folders.attrs.remember(new_info)
        self.w.fs.folders.note(old, False)
        self.w.fs.folders.note(new, new_info)
        return new_info

    async def _move_staged(self, sf: StagedFile, old: str, new: str, expect: str) -> None:
        """A staged file takes the name ``new``. Its unchanged ranges, if any, are copied
        server-side to ``new`` first (it then depends on no name it left); it is journaled
        under its new name before the object at ``old`` is deleted (a crash in between
        leaves a duplicate, never a loss)."""
        rec = sf.rec
        left = rec.expect or ""  # what the store holds at the old name
        if rec.base_key == old and rec.base_version and sf.copy_ranges():
            copied = await threads.run_sync(
                lambda: self.w.store.copy(old, rec.base_version, new,
                                          condition=condition_for(expect)),
                limiter=self.w.fs.folders.meta_limiter)
            rec.base_key, rec.base_version = new, copied.version
            rec.base_size, rec.base_mtime = copied.size, copied.mtime
            expect = copied.version
        self.w.staging.rekey(sf, new)
        # the file's node takes the new name with it, now: its upload may end before a folder
        # rename is done, and what it reports must reach this node (not the old name's)
        self.w.fs.move_path(old, new)
        rec.expect = expect
        sf.touch(rec.mtime)  # a change: it must reach the store under its new name
        await self.w.uploads.sync(sf)
        await self.w.deletes.delete(old, left)
        self.w.fs.folders.note(old, False)
        if sf.writers == 0:
            self.w.uploads.queue(sf, delay=WRITE_BACK_DELAY)

    async def _rename_dir(self, old: str, new: str) -> None:
        """Staged files first (an upload in flight ends first), then what the store lists
        (listed after them: a staged file whose upload ended meanwhile left the staging area
        for the store, and is moved from there)."""
        keys, _ = await threads.run_sync(self._walk, old + "/",
                                         limiter=self.w.fs.folders.meta_limiter)
        if len(keys) > self.w.settings.rename_limit:
            raise CrossDevice(f"{old}: {len(keys)} objects, more than rename_limit "
                              f"({self.w.settings.rename_limit}); mv copies instead")
        moved: set[str] = set()  # keys whose staged file moved (with its object)
        copied: list[tuple[ObjectInfo, ObjectInfo]] = []  # (old, new) objects
        sent = self.w.fs.clock()
        for src in [sf.key for sf in self.w.staging.under(old + "/")]:
            async with self.w.held(src) as sf:
                if sf is not None:
                    dst = new + src[len(old):]
                    # a name this mount removed there (its delete pending): replaced
                    await self._move_staged(sf, src, dst, await self.w.deletes.take(dst) or "")
                    moved.add(src)
        keys, folders = await threads.run_sync(self._walk, old + "/",
                                               limiter=self.w.fs.folders.meta_limiter)
        metas: dict[str, ObjectInfo] = {}
        if getattr(self.w.store, "folders_are_dirs", False):
            metas = await threads.run_sync(self._folder_metas, folders,
                                           limiter=self.w.fs.folders.meta_limiter)
        for key in self.w.deletes.pending_under(old + "/"):
            moved.add(key)  # removed by this mount already: not carried along
        for info in keys:
            if info.key in moved:
                continue
            dst = new + info.key[len(old):]
            if info.key.endswith("/") and info.size == 0:  # a marker: copied (its
                await self.w.deletes.take(dst)  # metadata: the folder's mode, owner, mtime)
                try:
                    await threads.run_sync(
                        lambda i=info, d=dst: self.w.store.copy(i.key, i.version, d),
                        limiter=self.w.fs.folders.meta_limiter)
                except (NotFound, StaleVersion):  # changed, or a store that cannot copy
                    await threads.run_sync(self.w.store.put, dst, b"",  # one (SeaweedFS)
                                           limiter=self.w.fs.folders.meta_limiter)
                await self.w.delete_object(info.key)
                continue
            # a pending delete there is absorbed: the copy replaces that version (a delete
            # left to run could remove the copy, which may have the same ETag)
            await self.w.deletes.take(dst)
            done = await threads.run_sync(self._copy_current, info, dst,
                                          limiter=self.w.fs.folders.meta_limiter)
            if done is not None:
                copied.append(done)
                await self.w.deletes.delete(done[0].key, done[0].version)
        if not any(k.key == old + "/" for k in keys):
            await threads.run_sync(self.w.store.put, new + "/", b"",
                                   limiter=self.w.fs.folders.meta_limiter)
        if getattr(self.w.store, "folders_are_dirs", False):
            # local: the directories were made anew; they take the old ones' attributes
            for p in sorted(folders, key=len, reverse=True):  # deepest first: making a
                marker = metas.get(p)  # sub-folder moves its parent's mtime
                if marker is not None:
                    dst = new + "/" + p[len(old) + 1:] if p != old + "/" else new + "/"
                    await threads.run_sync(
                        lambda d=dst, m=marker: self.w.store.put_file(
                            d, Upload(os.devnull, 0), attrs=Attrs(
                                m.meta_mtime, m.mode, uid=m.uid, gid=m.gid)),
                        limiter=self.w.fs.folders.meta_limiter)
        # Folders listed without a marker object: on S3 nothing is left of them, but a local
        # bucket's are directories, which would stay behind empty (deepest first).
        markers = {k.key for k in keys}
        for p in sorted(folders, key=len, reverse=True):
            if p not in markers:
                await self.w.delete_object(p)
        if self.w.deletes.pending_under(old + "/"):
            self.w.gone_folders.add(old)
        self.w.gone_folders.discard(new)
        self.w.fs.folders.forget_tree(old)
        self.w.fs.folders.forget_tree(new)
        self.w.fs.folders.note(old + "/", False)
        self.w.fs.folders.note(new + "/", None)
        self.w.fs.move_path(old, new)
        for was, now in copied:  # the same bytes, maybe another version (local: a new inode)
            if now.meta_mtime is None and (was.meta_mtime is not None or was.mode is not None):
                now = dataclasses.replace(now, meta_mtime=was.meta_mtime, mode=was.mode,
                                          uid=was.uid, gid=was.gid, rdev=was.rdev)
            self.w.fs.folders.attrs.remember(now)
            self.w.fs.retarget_handles(was, now)
            self.w.fs.observed(now.key, now, sent, same_bytes=True)

    def _folder_metas(self, folders: list[str]) -> dict[str, ObjectInfo]:
        """Worker thread: each folder's own attributes (``dir/`` as a marker: a local
        directory's mode, owner, mtime), before a rename makes the directories anew."""
        out: dict[str, ObjectInfo] = {}
        for p in folders:
            with contextlib.suppress(NotFound):
                out[p] = self.w.store.head(p)
        return out

    def _copy_current(self, info: ObjectInfo, dst: str
                      ) -> tuple[ObjectInfo, ObjectInfo] | None:
        """Worker thread: copy ``info`` to ``dst``; if it changed since it was listed (an
        upload of this mount ended meanwhile), the version it has now; None if it is gone.
        Returns (the object copied, its copy)."""
        try:
            return info, self.w.store.copy(info.key, info.version, dst)
        except (StaleVersion, NotFound):
            try:
                now = self.w.store.head(info.key)
            except NotFound:
                return None
            return now, self.w.store.copy(now.key, now.version, dst)

    def _walk(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """Worker thread: every object under ``prefix`` (markers included), recursively, and
        the folders (``prefix`` and those below it). Keys that are not clean names (``.``,
        ``..`` or empty segments) are skipped, as listings skip them: a request for one could
        reach a key outside the folder (an HTTP library removes dot segments)."""
        out: list[ObjectInfo] = []
        todo = [prefix]
        folders = []
        skipped: list[str] = []
        while todo:
            p = todo.pop()
            folders.append(p)
            for page in self.w.store.list(p):
                for o in page.objects:
                    if clean_key(o.key):
                        out.append(o)
                    else:
                        skipped.append(o.key)
                for sub in page.prefixes:
                    if clean_key(sub):
                        todo.append(sub)
                    else:
                        skipped.append(sub)
            if len(out) > self.w.settings.rename_limit:
                break
        if skipped:
            log.warning("rename of %r: skipped %d key(s) that are not valid file names, e.g. %r",
                        prefix, len(skipped), skipped[0])
        return out, folders
