"""``chmod``, ``utimens`` and ``chown`` of files and folders (a folder's in its marker
``dir/``, :meth:`Attributes.set_folder`): kept in object metadata (``mode``,
``mtime``, ``uid``/``gid``: rclone's and s3fs's names), through the staged file's journal row
when the file is staged, else a metadata update of the stored object (``set_attrs``, on the
version this mount saw). A link's, FIFO's or socket's type stays in its ``mode``.

Concurrency: on the trio thread; store calls in worker threads.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import TYPE_CHECKING

from .. import threads
from ..backends.attrs import SPECIAL_TYPES
from ..backends.base import Attrs, Condition, ObjectInfo, Upload
from ..config import Settings
from ..errors import Conflict, NotFound, NotPermitted

if TYPE_CHECKING:
    from .writes import Writes


#: Times a folder's attribute change reads the marker again after a failed condition (another
#: writer changed it meanwhile) before it gives up (Conflict: EIO).
FOLDER_RETRIES = 3


class Attributes:
    """The attribute changes of one mount's write side."""

    def __init__(self, w: Writes) -> None:
        self.w = w

    async def set_folder(self, node: object, *, mode: int | None = None,
                         uid: int | None = None, gid: int | None = None,
                         mtime: float | None = None, atime: float | None = None) -> None:
        """``chmod``/``chown``/``utimensat`` of a folder: kept in its marker ``dir/``
        (s3fs's keys: ``mode`` with ``S_IFDIR``, ``uid``, ``gid``, ``mtime``). A marker is
        changed on the version this mount read (S3 ``If-Match`` copy in place, GCS
        ``ifGenerationMatch``, Azure ``If-Match``); a folder without one gets one
        (``If-None-Match: *``). A failed condition reads the marker again and retries. Not
        deferred: done when the call returns. ``atime`` is kept in memory only."""
        from ..fs import Node

        assert isinstance(node, Node)
        self.w.check_writable()
        fs = self.w.fs
        fm = fs.folder_meta
        uid = None if uid in (-1, 0xFFFFFFFF) else uid
        gid = None if gid in (-1, 0xFFFFFFFF) else gid
        if mode is None and uid is None and gid is None and mtime is None:
            fm.changed(node.path, atime=atime)
            return
        if not node.path:
            cur = fs.attr(node)
            if ((mode is None or mode == cur.mode & 0o1777)
                    and uid in (None, cur.uid) and gid in (None, cur.gid) and mtime is None):
                return
            raise NotPermitted("the mount's root keeps no attributes (--dir-mode, --uid, "
                               "--gid)")
        key = node.path + "/"
        for attempt in range(FOLDER_RETRIES + 1):
            st = await fm.load(node.path)
            marker = st.marker
            if fm.memory_only:
                base = marker or ObjectInfo(key, 0, fs.dir_mtime(node.path), "")
                fm.keep(node.path, dataclasses.replace(
                    base, mode=stat.S_IFDIR | mode if mode is not None else base.mode,
                    uid=uid if uid is not None else base.uid,
                    gid=gid if gid is not None else base.gid,
                    meta_mtime=mtime if mtime is not None else base.meta_mtime))
                if mtime is not None:
                    fm.set_mtime(node.path, mtime)
                fm.changed(node.path, atime=atime)
                return
            # an mtime kept in memory (entries changed) or a marker without one: stored now,
            # so the change of another attribute does not move the folder's mtime
            keep = fm.times(node.path)[0] is not None or marker is None or (
                marker.meta_mtime is None)
            stored_mtime = mtime if mtime is not None else (
                fs.dir_mtime(node.path) if keep else None)
            new_mode = stat.S_IFDIR | mode if mode is not None else None
            sent = fs.clock()
            try:
                if marker is None:
                    attrs = Attrs(stored_mtime, new_mode if new_mode is not None else
                                  stat.S_IFDIR | self.w.settings.dir_mode, uid=uid, gid=gid)
                    new = await threads.run_sync(
                        lambda a=attrs: self.w.store.put_file(
                            key, Upload(os.devnull, 0), condition=Condition(absent=True),
                            attrs=a),
                        limiter=fs.folders.meta_limiter)
                else:
                    attrs = Attrs(stored_mtime, new_mode, uid=uid, gid=gid)
                    new = await threads.run_sync(
                        self.w.store.set_attrs, key, marker.version, attrs,
                        limiter=fs.folders.meta_limiter)
            except Conflict:
                if attempt == FOLDER_RETRIES:
                    raise
                fm.stale(node.path)
                continue
            except NotFound:
                if marker is None or not await self.w.marker_metadata_dropped(key):
                    raise
                continue  # kept in memory from now on (memory_only)
            if new.mode is None and new.meta_mtime is None:  # what was sent, if not said
                new = dataclasses.replace(
                    new, meta_mtime=attrs.mtime if attrs.mtime is not None else (
                        marker.meta_mtime if marker else None),
                    mode=attrs.mode if attrs.mode is not None else (
                        marker.mode if marker else None),
                    uid=uid if uid is not None else (marker.uid if marker else None),
                    gid=gid if gid is not None else (marker.gid if marker else None))
            fm.seen(node.path, new, sent)
            if mtime is not None:
                fm.set_mtime(node.path, mtime)
            fm.changed(node.path, atime=atime)
            return

    async def set_times(self, node: object, mtime: float | None, mode: int | None) -> None:
        """``utimens``/``chmod``: kept in the object's metadata."""
        from ..fs import Node

        assert isinstance(node, Node)
        self.w.check_writable()
        if node.is_dir:
            await self.set_folder(node, mode=mode, mtime=mtime)
            return
        async with self.w.held(node.path) as sf:
            if sf is not None:
                if _same(sf.rec.mtime, file_mode(self.w.settings, self.w.info_of(sf)), mtime, mode):
                    return  # vim's fchmod of its new file to the old mode: no second upload
                await self.w.changing(sf)
                if mode is not None:  # a FIFO... keeps its type
                    sf.rec.mode = _type_of(sf.rec.mode) | (mode & 0o777)
                sf.touch(mtime if mtime is not None else sf.rec.mtime)
                await self.w.settle_change(sf)
                return
        info = node.info
        assert info is not None
        if _same(info.meta_mtime or info.mtime, file_mode(self.w.settings, info), mtime, mode):
            return
        attrs = Attrs(mtime if mtime is not None else (info.meta_mtime or info.mtime),
                      _type_of(info.mode) | (mode & 0o777) if mode is not None else info.mode)
        await self._store_attrs(node, info, attrs)

    async def _store_attrs(self, node: object, info: ObjectInfo, attrs: Attrs) -> None:
        """``set_attrs`` of a file not staged, and what this mount then knows of it."""
        from ..fs import Node

        assert isinstance(node, Node)
        sent = self.w.fs.clock()
        new = await threads.run_sync(self.w.store.set_attrs, node.path, info.version, attrs,
                                     limiter=self.w.fs.folders.meta_limiter)
        if new.meta_mtime is None and new.uid is None and new.gid is None:
            new = dataclasses.replace(  # what was sent, if the answer did not say
                new, meta_mtime=attrs.mtime if attrs.mtime is not None else info.meta_mtime,
                mode=attrs.mode if attrs.mode is not None else info.mode,
                uid=attrs.uid if attrs.uid is not None else info.uid,
                gid=attrs.gid if attrs.gid is not None else info.gid, rdev=info.rdev)
        self.w.fs.folders.attrs.remember(new)
        self.w.fs.folders.note(new.key, new)
        self.w.fs.observed(node.path, new, sent, same_bytes=True)

    async def chown(self, node: object, uid: int | None, gid: int | None) -> None:
        """Keep a file's owner and group in its metadata (s3fs's ``uid``/``gid``); the
        kernel (``default_permissions``) has checked the caller may (root, or its own
        group). Folders keep none: only to the mount's owner (no effect), else EPERM."""
        from ..fs import Node

        assert isinstance(node, Node)
        self.w.check_writable()
        uid = None if uid in (-1, 0xFFFFFFFF) else uid
        gid = None if gid in (-1, 0xFFFFFFFF) else gid
        if node.is_dir:
            await self.set_folder(node, uid=uid, gid=gid)
            return
        async with self.w.held(node.path) as sf:
            if sf is not None:
                await self.w.changing(sf)
                if uid is not None:
                    sf.rec.uid = uid
                if gid is not None:
                    sf.rec.gid = gid
                sf.touch(sf.rec.mtime)
                await self.w.settle_change(sf)
                return
        info = node.info
        assert info is not None
        if (uid is None or uid == (info.uid if info.uid is not None else self.w.fs.uid)) and (
                gid is None or gid == (info.gid if info.gid is not None else self.w.fs.gid)):
            return  # nothing new to store
        await self._store_attrs(node, info, Attrs(uid=uid, gid=gid))


def _type_of(mode: int | None) -> int:
    """The special file type kept in a ``mode`` (0 for a regular file's)."""
    kind = stat.S_IFMT(mode or 0)
    return kind if kind in SPECIAL_TYPES else 0


def _same(cur_mtime: float, cur_mode: int, mtime: float | None, mode: int | None) -> bool:
    """``utimens``/``chmod`` to what the file already has (nothing to store)."""
    return ((mtime is None or mtime == cur_mtime)
            and (mode is None or mode & 0o777 == cur_mode))


def file_mode(settings: Settings, info: ObjectInfo | None) -> int:
    """Permission bits a file has in the store: from its metadata if it has them, else the
    default. (What ``stat`` shows may differ: an explicit ``--file-mode`` overrides metadata in
    ``FileSystem.attr``; a chmod is compared with what is stored, so it is skipped only when
    it would store nothing new.)"""
    if info is not None and info.mode is not None:
        return info.mode & 0o777
    return settings.file_mode
