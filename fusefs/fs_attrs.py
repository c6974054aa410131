"""What ``stat`` shows of a node, for :class:`fusefs.fs.FileSystem` (a mixin).

A folder's attributes come from its marker ``dir/`` (mode, owner, times in its metadata, read
by :class:`fusefs.foldermeta.FolderMeta`) and the times this mount set in memory; a file's from
its staged file while this mount writes it, else its object's info with the metadata learnt
since its listing (:class:`fusefs.attrmemory.AttrMemory`).

Invariants: modes from the bucket are capped (``capped_mode``, ``capped_dir_mode``: never
more than the mount's ``--file-mode``/``--dir-mode`` grant group and others, never setuid or
setgid), ``--file-mode`` given on the command line overrides a file's own, and a read-only
mount shows no write bits; a file that lost its name has no link left (nlink 0), a folder one
(the count is unknown). No I/O here.
"""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

from .backends.base import ObjectInfo
from .config import Settings
from .foldermeta import FolderMeta
from .folders import Folders
from .kinds import file_type
from .nodes import ROOT_INO, Attr, Node, capped_dir_mode, capped_mode

if TYPE_CHECKING:
    from .write.writes import Writes


class StatAttrs:
    """:class:`fusefs.fs.FileSystem`'s attributes of nodes (a mixin: the attributes below are
    the file system's)."""

    settings: Settings
    folders: Folders
    folder_meta: FolderMeta
    writes: Writes | None
    uid: int
    gid: int
    mount_time_ns: int
    _file_mode_forced: bool
    _by_path: dict[str, Node]

    def dir_mtime(self, path: str) -> float:
        """A folder's mtime: set in memory by this mount (entries changed, utimensat), else
        its marker's (metadata, else the marker's own time), else the mount time."""
        mtime = self.folder_meta.times(path)[0]
        if mtime is not None:
            return mtime
        st = self.folder_meta.state(path)
        marker = st.marker if st is not None else None
        if marker is not None:
            return marker.meta_mtime if marker.meta_mtime is not None else marker.mtime
        return self.mount_time_ns / 1e9

    def attr_known(self, node: Node) -> bool:
        """Are a node's attributes known (False: a folder whose marker was not read yet, whose
        entry the kernel gets with the defaults and no attribute timeout)?"""
        return not node.is_dir or node.ino == ROOT_INO or self.folder_meta.known(node.path)

    def attr(self, node: Node) -> Attr:
        ro = ~0o222 if self.settings.read_only else ~0
        info: ObjectInfo | None = None
        if node.is_dir:
            st = self.folder_meta.state(node.path)
            info = st.marker if st is not None else None
            perm = (capped_dir_mode(info.mode, self.settings)
                    if info is not None and info.mode is not None else self.settings.dir_mode)
            mode = stat.S_IFDIR | (perm & ro)
            # one link (as btrfs): find and du take it as "count unknown" (no leaf shortcut)
            mtime_ns, size, nlink = int(self.dir_mtime(node.path) * 1e9), 0, 1
        else:
            info = node.info
            assert info is not None
            if self.writes is not None:
                sf = self.writes.file_of(node)
                if sf is not None:
                    info = self.writes.info_of(sf)
            info = self.folders.attrs.apply(info)  # learnt since the node's listing
            # a mode kept in metadata (chmod, rsync -a) shows, unless --file-mode was given
            perm = (self.settings.file_mode if info.mode is None or self._file_mode_forced
                    else capped_mode(info.mode, self.settings))
            kind = file_type(info)
            mode = kind | (perm & ro if kind != stat.S_IFLNK else 0o777)  # as links show
            mtime = info.meta_mtime if info.meta_mtime is not None else info.mtime
            # a file that lost its name (unlinked while open) has no link left
            nlink = 1 if self._by_path.get(node.path) is node else 0
            mtime_ns, size = int(mtime * 1e9), info.size
        uid = self.uid if info is None or info.uid is None else info.uid
        gid = self.gid if info is None or info.gid is None else info.gid
        _, ctime, atime = self.folder_meta.times(node.path)
        return Attr(node.ino, mode, size, mtime_ns, (size + 511) // 512, 128 * 1024, nlink,
                    uid, gid, info.rdev or 0 if info is not None and not node.is_dir else 0,
                    int(ctime * 1e9) if ctime is not None else -1,
                    int(atime * 1e9) if atime is not None else -1)
