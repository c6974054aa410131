"""Namespace operations of a read-write mount: mkdir, rmdir, unlink and rename.

Each works on the store and on :class:`~.writes.Writes`'s overlay (staged files, names unlinked
while open) and writes what the store now shows into the listed ranges at once
(``Folders.note``), so a lookup after it needs no request. Costs: ``mkdir`` one PUT of a
``dir/`` marker; ``rmdir`` a LIST (is it empty?) and a DELETE; ``unlink`` a DELETE (at the last
close if the file is open); ``rename`` of a file a server-side copy and a DELETE, or nothing if
it is still staged (its pending upload is retargeted); of a folder the same for each object
under it, up to ``rename_limit`` (above: EXDEV, and ``mv`` copies by itself).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from .. import threads
from ..backends.base import ObjectInfo
from ..errors import (
    CrossDevice,
    Exists,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)
from ..folders import join
from ..safety import clean_key
from .uploads import WRITE_BACK_DELAY, condition_for

if TYPE_CHECKING:
    from .writes import Writes

log = logging.getLogger(__name__)


class Namespace:
    """The namespace operations of one read-write mount (``Writes.namespace``)."""

    def __init__(self, writes: Writes) -> None:
        self.w = writes

    async def mkdir(self, parent_ino: int, name: str) -> object:
        self.w.check_writable()
        parent = self.w.fs.node(parent_ino)
        if not parent.is_dir:
            raise NotADirectory(f"{parent.path} is not a directory")
        path = self.w.check_name(parent.path, name)
        if await self.w.exists(path) is not None:
            raise Exists(f"{path}: exists")
        info = await threads.run_sync(self.w.store.put, path + "/", b"",
                                      limiter=self.w.fs.folders.meta_limiter)
        del info
        self.w.fs.folders.note(path + "/", None)
        self.w.fs.folders.note_empty(path)
        node = self.w.fs.dir_node(path)
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
        page = await threads.run_sync(
            lambda: next(iter(self.w.store.list(path + "/", max_keys=2)), None),
            limiter=self.w.fs.folders.meta_limiter)
        if page is not None and (page.prefixes or any(o.key != path + "/"
                                                      for o in page.objects)):
            raise NotEmpty(f"{path}: not empty")
        await self.w.delete_object(path + "/")
        self.w.fs.folders.note(path + "/", False)
        self.w.fs.drop_path(path)

    async def unlink(self, parent_ino: int, name: str) -> None:
        self.w.check_writable()
        parent = self.w.fs.node(parent_ino)
        path = join(parent.path, name)
        if not parent.path and name == self.w.control_name:
            raise NotPermitted(f"{name} is the control file")
        sf = await self.w.settled(path)
        node = self.w.fs.node_by_path(path)
        if sf is not None:
            sf.unlinked = True
            self.w.staging.detach(sf)
            in_store = sf.rec.base_key == path and bool(sf.rec.base_version)
            if sf.handles == 0:
                await self.w.drop(sf)
            elif in_store:
                self.w.hidden[path] = sf.base_info()  # deleted at the last close (_drop)
            if not in_store or sf.handles == 0:
                self.w.fs.folders.note(path, False)
        else:
            found = await self.w.exists(path)
            if found is None:
                raise NotFound(f"{path}: no such file")
            if found[0]:
                raise IsADirectory(f"{path} is a directory")
            if node is not None and self.w.fs.is_open(node):
                assert found[1] is not None
                self.w.hidden[path] = found[1]  # deleted at the last close
            else:
                await self.w.delete_object(path)
                self.w.fs.folders.note(path, False)
        self.w.fs.drop_path(path)

    async def closed_hidden(self, path: str) -> None:
        """The last handle of a file unlinked while open closed: delete its object."""
        if self.w.hidden.pop(path, None) is not None:
            await self.w.delete_object(path)
            self.w.fs.folders.note(path, False)

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str,
                     flags: int) -> None:
        self.w.check_writable()
        if flags:
            raise InvalidArgument("rename flags (RENAME_EXCHANGE, RENAME_NOREPLACE) "
                                  "are not supported")
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
            return
        if dst is not None and dst[0]:
            raise IsADirectory(f"{new} is a directory")
        expect = "" if dst is None else (dst[1].version if dst[1] is not None else None)
        dst_sf = await self.w.settled(new)
        if dst_sf is not None:  # replacing a staged file: its upload is moot
            dst_sf.unlinked = True
            self.w.staging.detach(dst_sf)
            expect = (dst_sf.rec.base_version
                      if dst_sf.rec.base_key == new and dst_sf.rec.base_version else "")
            if dst_sf.handles == 0:
                await threads.run_sync(self.w.staging.remove, dst_sf)
        sent = self.w.fs.clock()
        new_info = await self._rename_file(old, new, expect)
        self.w.fs.move_path(old, new)
        if new_info is not None:  # the same bytes under a new name: the kernel's pages stay
            self.w.fs.observed(new, new_info, sent, same_bytes=True)

    async def _rename_file(self, old: str, new: str, expect: str | None
                           ) -> ObjectInfo | None:
        """Move a file's name in the store (its new info), or retarget its staged upload
        (None)."""
        sf = await self.w.settled(old)
        if sf is not None:
            rec = sf.rec
            if rec.base_key == old and rec.base_version and not rec.then_delete:
                rec.then_delete = old  # the object at the old name goes once uploaded
            rec.expect = expect
            self.w.staging.rekey(sf, new)
            sf.touch(rec.mtime)
            self.w.fs.folders.note(old, False)
            if sf.writers == 0:
                await self.w.uploads.sync(sf)
                self.w.uploads.queue(sf, delay=WRITE_BACK_DELAY)
            return None
        found = await self.w.exists(old)
        assert found is not None and found[1] is not None
        info = found[1]
        cond = condition_for(expect)
        new_info = await threads.run_sync(
            lambda: self.w.store.copy(old, info.version, new, condition=cond),
            limiter=self.w.fs.folders.meta_limiter)
        await self.w.delete_object(old)
        if new_info.meta_mtime is None and (info.meta_mtime is not None or info.mode is not None):
            new_info = dataclasses.replace(new_info, meta_mtime=info.meta_mtime, mode=info.mode)
        self.w.fs.folders.attrs.remember(new_info)
        self.w.fs.folders.note(old, False)
        self.w.fs.folders.note(new, new_info)
        return new_info

    async def _rename_dir(self, old: str, new: str) -> None:
        keys, folders = await threads.run_sync(self._walk, old + "/",
                                               limiter=self.w.fs.folders.meta_limiter)
        if len(keys) > self.w.settings.rename_limit:
            raise CrossDevice(f"{old}: {len(keys)} objects, more than rename_limit "
                              f"({self.w.settings.rename_limit}); mv copies instead")
        for sf in self.w.staging.under(old + "/"):
            await self._rename_file(sf.key, new + sf.key[len(old):], "")
        for info in keys:
            dst = new + info.key[len(old):]
            if info.key.endswith("/") and info.size == 0:  # a marker (with content: copied)
                await threads.run_sync(self.w.store.put, dst, b"",
                                       limiter=self.w.fs.folders.meta_limiter)
                await self.w.delete_object(info.key)
                continue
            await threads.run_sync(
                lambda info=info, dst=dst: self.w.store.copy(info.key, info.version, dst),
                limiter=self.w.fs.folders.meta_limiter)
            await self.w.delete_object(info.key)
        if not any(k.key == old + "/" for k in keys):
            await threads.run_sync(self.w.store.put, new + "/", b"",
                                   limiter=self.w.fs.folders.meta_limiter)
        # Folders listed without a marker object: on S3 nothing is left of them, but a local
        # bucket's are directories, which would stay behind empty (deepest first).
        markers = {k.key for k in keys}
        for p in sorted(folders, key=len, reverse=True):
            if p not in markers:
                await self.w.delete_object(p)
        self.w.fs.folders.forget_tree(old)
        self.w.fs.folders.forget_tree(new)
        self.w.fs.folders.note(old + "/", False)
        self.w.fs.folders.note(new + "/", None)
        self.w.fs.move_path(old, new)

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
