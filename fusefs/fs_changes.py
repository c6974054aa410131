"""What the write side tells :class:`fusefs.fs.FileSystem` (a mixin): the nodes and handles
of the changes this mount makes (:mod:`fusefs.write`): files made and staged, objects this
mount uploaded or copied, names removed or moved.

Invariants: a handle reads the file it opened (a staged file it holds, or one object
version), never another file that took its name: a node that becomes staged has its handles
read the staged file, a renamed object's readers read its copy. This mount's own upload of a
file keeps the kernel's pages (the same bytes); a name removed or moved leaves the namespace
at once (its node distrusted: the kernel may still hold it, open handles keep it). Node
fields are replaced whole. Runs on the trio thread, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .backends.base import ObjectInfo
from .foldermeta import FolderMeta
from .nodes import Handle, Node

if TYPE_CHECKING:
    from .write.staged import StagedFile


class MountChanges:
    """:class:`fusefs.fs.FileSystem`'s side of this mount's changes (a mixin: the attributes
    and the methods declared below are the file system's)."""

    clock: Callable[[], float]
    folder_meta: FolderMeta
    _by_path: dict[str, Node]
    _handles: dict[int, Handle]
    _kernel_version: dict[int, str]

    if TYPE_CHECKING:
        def _is_open(self, node: Node) -> bool: ...

        def _node(self, path: str, is_dir: bool, info: ObjectInfo | None, seen: float
                  ) -> Node: ...

        def _observe(self, node: Node, info: ObjectInfo | None, seen: float) -> None: ...

    def is_open(self, node: Node) -> bool:
        return self._is_open(node)

    def reading(self, key: str, version: str) -> bool:
        """Does an open handle read version ``version`` of object ``key`` from the store?"""
        return any(h.staged is None and h.info.key == key and h.info.version == version
                   for h in self._handles.values())

    def staged_of(self, node: Node) -> StagedFile | None:
        """The staged file an open handle of ``node`` holds, if any."""
        for h in self._handles.values():
            if h.node is node and h.staged is not None:
                return h.staged
        return None

    def attach_handles(self, node: Node, staged: StagedFile) -> None:
        """``node`` is staged now: its handles opened before read the staged file (the file's
        bytes as changed by its writers, which is what POSIX readers see), and hold it."""
        for h in self._handles.values():
            if h.node is node and h.staged is None:
                h.staged = staged
                staged.handles += 1

    def retarget_handles(self, old: ObjectInfo, new: ObjectInfo) -> None:
        """Object ``old`` was copied to ``new`` (a rename): handles reading it read the copy."""
        for h in self._handles.values():
            if h.staged is None and h.info.key == old.key and h.info.version == old.version:
                h.info = new

    def file_node(self, path: str, info: ObjectInfo | None) -> Node:
        """The node of a file at ``path`` (made if needed) with ``info``."""
        if info is None:
            info = ObjectInfo(path, 0, time.time(), "")
        return self._node(path, False, info, self.clock())

    def dir_node(self, path: str) -> Node:
        return self._node(path, True, None, self.clock())

    def observed(self, path: str, info: ObjectInfo, sent: float, *, same_bytes: bool) -> None:
        """This mount made ``info`` the object at ``path``. ``same_bytes``: the kernel's
        pages of the file are still right (our own upload, a metadata change)."""
        node = self._by_path.get(path)
        if node is None or node.is_dir:
            return
        if same_bytes:
            if node.ino in self._kernel_version:
                self._kernel_version[node.ino] = info.version
                node.info = info  # no invalidation: the bytes did not change
            # handles of this file read what it now holds, which is this version (an old
            # handle reading the file this mount just wrote is no stale reader)
            for h in self._handles.values():
                if h.node is node and h.staged is None:
                    h.info = info
        self._observe(node, info, max(sent, node.confirmed))

    def drop_path(self, path: str) -> None:
        """``path`` is gone (unlink, rmdir): its node leaves the namespace (the kernel may
        still hold it, and open handles keep it)."""
        node = self._by_path.pop(path, None)
        if node is not None:
            node.confirmed = -math.inf
        self.folder_meta.drop(path)

    def move_path(self, old: str, new: str) -> None:
        """``old`` (a file, or a folder and everything below it) is now ``new``."""
        self.folder_meta.move(old, new)
        for path in [p for p in self._by_path if p == old or p.startswith(old + "/")]:
            node = self._by_path.pop(path)
            moved = new + path[len(old):]
            gone = self._by_path.pop(moved, None)
            if gone is not None:
                gone.confirmed = -math.inf
            if node.info is not None:
                node.info = dataclasses.replace(node.info, key=moved, token=None)
                node._path = None
            else:
                node._path = moved
            self._by_path[moved] = node
