"""Resolving names for :class:`fusefs.fs.FileSystem` (a mixin): what the store lists at a
name, reconciled with this mount's own changes the store may not show yet.

:meth:`Resolving.resolve` asks the folder's listed ranges (:meth:`Folders.resolve`: most names
make no request); a staged file of this mount whose upload was last seen longer than the
metadata TTL ago (:meth:`Writes.unconfirmed`) is checked against what the store shows
(:meth:`Writes.reconcile`), and names with a pending delete are hidden (:meth:`Writes.hides`).

Invariants: an observation is taken into a node only through ``_observe`` (an older one never
replaces a newer); a node that lost its name while a request was out keeps what it was; a node
whose name now holds another type is NotFound (the kernel gets a new inode for it); a staged
file another writer's object displaced leaves the name (its descriptors keep it). Runs on the
trio thread; store calls in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import threads
from .backends.base import ObjectInfo, ObjectStore
from .errors import NotFound
from .folders import Folders, join, valid_name
from .kinds import file_type
from .nodes import Entry, Node, seen_type

if TYPE_CHECKING:
    from .write.writes import Writes


class Resolving:
    """:class:`fusefs.fs.FileSystem`'s name resolution (a mixin: the attributes and the
    methods declared below are the file system's)."""

    store: ObjectStore
    clock: Callable[[], float]
    folders: Folders
    writes: Writes | None
    _by_path: dict[str, Node]

    if TYPE_CHECKING:
        def _fresh(self, t: float, now: float) -> bool: ...

        def _observe(self, node: Node, info: ObjectInfo | None, seen: float) -> None: ...

        def drop_path(self, path: str) -> None: ...

    async def resolve(self, parent: str, name: str) -> tuple[bool, ObjectInfo | None, float]:
        """(is_dir, info, seen) of ``name`` in folder ``parent`` as the store shows it, less
        what this mount removed and has not deleted yet; NotFound if nothing is there.
        A staged file of this mount whose upload is not :meth:`~Writes.unconfirmed` answers
        for its name without a request (callers ask :meth:`~Writes.overlay` first)."""
        path = join(parent, name)
        sf = self.writes.unconfirmed(path) if self.writes is not None else None
        if sf is not None:
            assert self.writes is not None
            try:
                store: tuple[bool, ObjectInfo | None, float] | None = (
                    await self.folders.resolve(parent, name))
            except NotFound:
                store = None
            ours = self.writes.reconcile(sf, store)
            if ours is not None:
                return ours
            # another writer's object (or none) took the name: the descriptors keep the
            # file they opened, off the name (a new inode for what the store shows)
            self.drop_path(path)
            if store is None:
                raise NotFound(f"{path}: no such file or directory")
            found = store
        else:
            found = await self.folders.resolve(parent, name)
        if self.writes is not None and self.writes.hides(path, found[0], found[1]):
            raise NotFound(f"{path}: no such file or directory")
        return found

    async def _revalidate(self, node: Node) -> None:
        """Bring a node's metadata up to date through its folder's ranges (a LIST per range
        block, shared by its neighbours), never a request per file."""
        parent, _, name = node.path.rpartition("/")
        try:
            is_dir, info, seen = await self.resolve(parent, name)
        except NotFound:
            node.confirmed = -math.inf
            raise
        if self._by_path.get(node.path) is not node:
            return  # it lost its name while this asked: it keeps what it was
        if seen_type(node, is_dir, info) != file_type(node.info):
            raise NotFound(f"{node.path}: replaced by a {'folder' if is_dir else 'file'}")
        self._observe(node, info, seen)

    async def refresh_file(self, node: Node) -> None:
        """Re-read a file's metadata from the store (one HEAD)."""
        sent = self.clock()
        try:
            info = await threads.run_sync(self.store.head, node.path,
                                          limiter=self.folders.meta_limiter)
            self.folders.attrs.remember(info)
        except NotFound:
            node.confirmed = -math.inf
            raise
        self._observe(node, info, sent)

    async def resolve_path(self, path: str) -> Entry:
        """The file or folder at ``path`` (relative to the root) for internal users."""
        if not path:
            return Entry("", True)
        parent, _, name = path.rpartition("/")
        if not valid_name(name):  # the parents are checked as they are resolved below
            raise NotFound(f"{path}: no such file or directory")
        node = self._by_path.get(path)
        if node is not None and self._fresh(node.confirmed, self.clock()):
            return Entry(path, node.is_dir, node.info)
        if parent:
            up = await self.resolve_path(parent)
            if not up.is_dir:
                raise NotFound(f"{path}: no such file or directory")
        is_dir, info, seen = await self.resolve(parent, name)
        if node is not None and node.is_dir == is_dir:
            self._observe(node, info, seen)
        return Entry(path, is_dir, info)
