"""Settling: learning the metadata listings lack (S3), for :class:`fusefs.fs.FileSystem`.

The metadata probe: a file whose listing entry has no metadata gets it from one request
(:meth:`Folders.settle`: a HEAD, or a GET of a small object whole, through a fetch worker where
one runs, whose bytes then go into the block cache). A ``stat`` in listing order starts the
next files' probes ahead of the program (:meth:`Settling._settle_next`).

Invariants: a probe's answer replaces a node's info only if it is of the same version as the
node still holds (never an older or another version); a failure leaves the defaults and is
never an error for a ``stat``; nothing is started ahead while a hint stream is open, and at
most ``metadata_workers`` files ahead of the last one asked; the queues kept for that are
bounded (``SETTLE_FOLDERS``, ``SETTLE_FILES``). Runs on the trio thread (``_seed``: a worker
thread).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import stats as S
from .backends.base import ObjectInfo
from .config import Settings
from .errors import FusefsError
from .folders import Folders
from .nodes import Node
from .reader import Reader
from .workers.pool import PoolUnavailable

if TYPE_CHECKING:
    from .write.writes import Writes

log = logging.getLogger(__name__)

#: Folders whose files :meth:`FileSystem.getattr` settles ahead of the program, at most,
#: and their files kept for that over all of them (about 150 bytes each; a bigger folder's
#: first ones only).
SETTLE_FOLDERS = 16
SETTLE_FILES = 100_000


class SettleQueue:
    """A listed folder's files whose metadata is unknown, in listing order (see
    :meth:`FileSystem._settle_next`)."""

    __slots__ = ("infos", "index", "started", "last")

    def __init__(self, infos: list[ObjectInfo]) -> None:
        self.infos = infos
        self.index = {info.key: i for i, info in enumerate(infos)}
        self.started: set[int] = set()  # indices whose fetch was started ahead
        self.last = -1  # index of the file whose attributes the kernel asked for last


class Settling:
    """:class:`fusefs.fs.FileSystem`'s metadata probes (a mixin: the attributes below are
    the file system's)."""

    reader: Reader
    settings: Settings
    clock: Callable[[], float]
    folders: Folders
    writes: Writes | None
    hinting: Callable[[], bool]
    _to_settle: OrderedDict[str, SettleQueue]

    async def _fetch_small(self, info: ObjectInfo) -> ObjectInfo | None:
        """A small object's metadata from a fetch worker's GET of it whole (the worker keeps
        its bytes in the block cache, and this process in its window of just-fetched blocks:
        a read then makes no request, and opens no cache file); None where the workers cannot
        run (the caller fetches it in a thread instead)."""
        pool = self.reader.pool
        if pool is None or not pool.usable:
            return None
        try:
            bkey = self.reader.block_key(info, 0)
            got, stored, data = await pool.get_small(bkey, info.key, info.version, info.size)
        except PoolUnavailable:
            return None
        if data:  # the read that follows is answered from memory
            self.reader.remember(bkey, data)
        self.reader.stats.add(S.FETCHES)  # the fetch a read of it then saves
        self.reader.stats.add(S.BYTES_FETCHED, info.size)
        if stored is not None:
            self.reader.blocks.stored_elsewhere(*stored)
        return got

    def _seed(self, info: ObjectInfo, data: bytes) -> None:
        """Worker thread: a small object's whole bytes, fetched to learn its type, into the
        block cache (a read then makes no request); counted as the reader's fetch it saves."""
        self.reader.stats.add(S.FETCHES)
        self.reader.stats.add(S.BYTES_FETCHED, len(data))
        if 0 < info.size == len(data) <= self.reader.block_size:
            self.reader.blocks.put(self.reader.block_key(info, 0), data)

    def unsettled(self, node: Node) -> bool:
        """Does ``node``'s stat wait for its metadata (S3: listings lack it; see
        :meth:`Folders.settle`)? Until then the kernel may cache its attributes for no time
        (:meth:`attr_timeout`), so that a ``stat`` asks (GETATTR) and gets them."""
        if node.info is None or not self.folders.unsettled(node.info):
            return False
        return self.writes is None or self.writes.file_of(node) is None

    async def _settle(self, node: Node) -> None:
        """Learn ``node``'s metadata (one request, or a share of one in flight). A failure
        leaves the defaults (asked again at the next stat), never an error for a ``stat``."""
        info = node.info
        assert info is not None
        sent = self.clock()
        try:
            got = await self.folders.settle(info)
        except FusefsError as exc:
            log.info("could not read the metadata of %s: %s", info.key, exc)
            return
        if node.info is info and got is not info and got.version == info.version:
            node.info = got  # same version, its metadata now known
            node.confirmed = max(node.confirmed, sent)

    def _settle_next(self, node: Node) -> None:
        """The kernel asks for the attributes of a file of a folder listed lately: if it walks
        the listing in order (``ls -l``, ``rsync``: a stat per file, one at a time), start
        learning the metadata of the next files (up to the metadata workers' limit ahead of
        it, each once), so that their stats find it done instead of making a round trip each
        in a row. Stats out of order (a training loop's random opens) start nothing: only a
        stat of the first file listed, or of the one listed right after the last one asked;
        nor while a hint stream is open (its prefetch learns the metadata of what it fetches,
        within the cache's bound, which fetches ahead here would not respect)."""
        info = node.info
        assert info is not None
        q = self._to_settle.get(node.path.rpartition("/")[0])
        i = q.index.get(info.key) if q is not None else None
        if q is None or i is None:
            return
        last, q.last = q.last, i
        if i != last + 1 or self.hinting():  # in order: the first listed, or the next one
            return
        window = self.settings.metadata_workers
        for j in range(i + 1, min(i + 1 + window, len(q.infos))):
            if j in q.started or not self.folders.unsettled(q.infos[j]):
                continue
            q.started.add(j)
            try:
                self.reader.start_soon(functools.partial(self._settle_ahead, q.infos[j]))
            except FusefsError:
                return  # not serving: no background work

    async def _learn(self, info: ObjectInfo) -> bool:
        """For the reader (:attr:`Reader.learn`): the first block of an object whose metadata
        is unknown and which :meth:`Folders.settle` fetches whole (a GET that also brings the
        metadata) is fetched that way, so a prefetch (hints) teaches the metadata and the
        program's ``stat`` or ``open`` then asks nothing. False: fetch it as any block."""
        if not self.folders.settles_whole(info):
            return False
        try:
            await self.folders.settle(info)
        except FusefsError as exc:
            log.debug("reading %s with its metadata failed: %s", info.key, exc)
            return False
        return True

    async def _settle_ahead(self, info: ObjectInfo) -> None:
        try:
            await self.folders.settle(info)
        except Exception as exc:  # background: the file's own stat asks again
            log.debug("reading the metadata of %s ahead failed: %s", info.key, exc)

    def _queue_settles(self, path: str, entries: list[tuple[str, bool, ObjectInfo | None]]
                       ) -> None:
        """Keep the files of a folder snapshot whose metadata is unknown, for :meth:`_settle_next`
        (the last SETTLE_FOLDERS folders)."""
        if self.folders.settle_mode == "off":
            return
        todo: list[ObjectInfo] = []
        for _, is_dir, info in entries:
            if not is_dir and info is not None and self.folders.unsettled(info):
                todo.append(info)
                if len(todo) >= SETTLE_FILES:
                    break
        self._to_settle.pop(path, None)
        if todo:
            self._to_settle[path] = SettleQueue(todo)
            total = sum(len(q.infos) for q in self._to_settle.values())
            while len(self._to_settle) > SETTLE_FOLDERS or total > SETTLE_FILES:
                total -= len(self._to_settle.popitem(last=False)[1].infos)
