"""Probes: what a listing does not say, asked of the store per name or per object (a mixin
of :class:`fusefs.folders.Folders`).

:meth:`Probes._probe`: is a name a file or a folder, where listing is refused or did not settle
it (a HEAD and a one-key LIST in parallel; an absence is remembered for ``negative_ttl``).
:meth:`~Probes.typed`: the type of a listed object that may be a link or special file (one
HEAD). :meth:`~Probes.settle`: the metadata (mode, owner, mtime) listings lack (S3), on a
file's first stat: a GET of a small object whole (``--metadata-probe auto``: its bytes kept as
its first block, through a fetch worker where one runs), else a HEAD.

Invariants: one fetch per object version at a time (``_typing``: a listing, a lookup and a
stat of the same version share it); what is learnt is remembered (``attrs``), also when the
object has no metadata; an answer of another version (or none: the object changed or went)
leaves the listed info as it was. Runs on the trio thread; store calls in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from . import threads
from .attrmemory import AttrMemory
from .backends.base import ObjectInfo, ObjectStore
from .errors import Conflict, NotFound, StaleVersion, single_error
from .kinds import may_be_special

log = logging.getLogger(__name__)

#: ``--metadata-probe auto``: an object up to this size whose metadata a listing lacks is
#: fetched whole on its first stat (the answer carries the metadata; the bytes are kept as its
#: first block, so a read of it then makes no request); a larger one gets a HEAD.
READ_PROBE_MAX = 1024 * 1024

Found = tuple[bool, ObjectInfo | None, float]
"""(is_dir, info, seen): what a name is, and the time of the observation."""


class Probes:
    """:class:`fusefs.folders.Folders`'s probes (a mixin: the attributes below are the
    folders', set in its ``__init__``)."""

    store: ObjectStore
    clock: Callable[[], float]
    meta_limiter: trio.CapacityLimiter
    negative_ttl: float
    _negative: dict[str, float]
    attrs: AttrMemory
    probe_size: int
    type_heads: int
    settle_mode: str
    read_probe_max: int
    settles: int
    keeps_bytes: bool
    seed: Callable[[ObjectInfo, bytes], None] | None
    fetch_small: Callable[[ObjectInfo], Awaitable[ObjectInfo | None]] | None
    _typing: dict[tuple[str, str], trio.Event]

    async def _probe(self, path: str) -> Found:
        """Ask the store whether ``path`` is a folder (a prefix) or a file: a HEAD and a
        one-key LIST in parallel. Used where listing is refused or did not settle a name."""
        neg = self._negative.get(path)
        now = self.clock()
        if neg is not None and now - neg < self.negative_ttl:
            raise NotFound(f"{path}: no such file or directory (cached)")
        result: dict[str, object] = {}

        async def head() -> None:
            try:
                info = await threads.run_sync(self.store.head, path, limiter=self.meta_limiter)
                self.attrs.remember(info, checked=True)
                result["file"] = info
            except NotFound:
                pass

        async def is_dir() -> None:
            page = await threads.run_sync(
                lambda: next(iter(self.store.list(path + "/", max_keys=1)), None),
                limiter=self.meta_limiter,
            )
            if page is not None and (page.objects or page.prefixes):
                result["dir"] = True

        with single_error():  # a refusal stays EACCES, not an exception group
            async with trio.open_nursery() as nursery:
                nursery.start_soon(head)
                nursery.start_soon(is_dir)
        if "dir" in result:
            if "file" in result:
                log.warning("%s is both an object and a prefix; showing the directory", path)
            return True, None, now
        info = result.get("file")
        if isinstance(info, ObjectInfo):
            return False, info, now
        self._negative[path] = now
        if len(self._negative) > 100_000:
            self._negative.clear()
        raise NotFound(f"{path}: no such file or directory")

    async def typed(self, info: ObjectInfo) -> ObjectInfo:
        """``info`` with its metadata when a listing lacked it and it may be a link or
        special file (:func:`fusefs.kinds.may_be_special`): one HEAD per version, remembered
        (also when it has none). Another version by now: the listed ``info`` stays."""
        info = self.attrs.apply(info)
        if not may_be_special(info, self.probe_size) or self.attrs.known(info):
            return info
        flight = (info.key, info.version)
        running = self._typing.get(flight)
        if running is not None:  # a listing and a lookup of the same object: one fetch
            await running.wait()
            return self.attrs.apply(info)
        self._typing[flight] = done = trio.Event()
        try:
            return await self._fetch_typed(info)
        finally:
            del self._typing[flight]
            done.set()

    def unsettled(self, info: ObjectInfo | None) -> bool:
        """Does a file's stat need its metadata fetched first (:meth:`settle`)? Only where
        listings lack it (S3), when the mount does not know it for this version (from a
        fetch, its own upload, or ``attrs.json`` of an earlier mount on this cache)."""
        return (self.settle_mode != "off" and info is not None and info.mode is None
                and info.meta_mtime is None and info.uid is None and info.gid is None
                and not self.attrs.known(info))

    def settles_whole(self, info: ObjectInfo) -> bool:
        """Would :meth:`settle` fetch ``info`` whole (its bytes into the block cache)?"""
        return (self._whole(info) and self.seed is not None
                and getattr(self.store, "gets_small", False)
                and self.unsettled(self.attrs.apply(info)))

    def _whole(self, info: ObjectInfo) -> bool:
        return (self.settle_mode == "auto" and info.size <= self.read_probe_max
                and self.keeps_bytes)

    async def settle(self, info: ObjectInfo) -> ObjectInfo:
        """``info`` with its metadata, fetched when :meth:`unsettled` (one request per object
        version at a time, shared with :meth:`typed`; remembered, also when there is none):
        ``auto``: a GET of an object of at most ``read_probe_max`` bytes (kept in the block
        cache: a read then costs nothing more), else a HEAD; ``head``: a HEAD."""
        info = self.attrs.apply(info)
        if not self.unsettled(info):
            return info
        flight = (info.key, info.version)
        running = self._typing.get(flight)
        if running is not None:
            await running.wait()
            return self.attrs.apply(info)
        self._typing[flight] = done = trio.Event()
        try:
            self.settles += 1
            return await self._fetch_typed(
                info, whole=self._whole(info), count=False)
        finally:
            del self._typing[flight]
            done.set()

    async def _fetch_typed(self, info: ObjectInfo, *, whole: bool = True,
                           count: bool = True) -> ObjectInfo:
        """The fetch behind :meth:`typed` and :meth:`settle` (one at a time per object
        version): the whole object (``whole``, where the store ``gets_small``: its bytes
        seeded into the block cache) or a HEAD."""
        if count:
            self.type_heads += 1
        seed, key, version, size = self.seed, info.key, info.version, info.size

        def fetch() -> ObjectInfo:
            if not whole or seed is None or not getattr(self.store, "gets_small", False):
                return self.store.head(key)
            got, data = self.store.get_small(  # type: ignore[attr-defined]
                key, version, size)
            if len(data) == got.size and got.version == version:
                seed(got, data)
            return got

        try:
            got = None
            if (whole and seed is not None and self.fetch_small is not None
                    and getattr(self.store, "gets_small", False)):
                async with self.meta_limiter:
                    got = await self.fetch_small(info)
            if got is None:
                got = await threads.run_sync(fetch, limiter=self.meta_limiter)
        except (NotFound, StaleVersion, Conflict):
            return info
        if got.version != info.version:
            return info
        self.attrs.remember(got, checked=True)
        return got

    async def _typed_all(self, out: list[tuple[str, bool, ObjectInfo | None]]) -> None:
        """:meth:`typed` for every entry of a listing that needs it, in parallel (bounded by
        the metadata limiter), replaced in place."""
        todo = [i for i, (_, _, info) in enumerate(out) if info is not None
                and may_be_special(self.attrs.apply(info), self.probe_size)]
        if not todo:
            return

        async def one(i: int) -> None:
            name, is_dir, info = out[i]
            assert info is not None
            out[i] = (name, is_dir, await self.typed(info))

        with single_error():
            async with trio.open_nursery() as nursery:
                for i in todo:
                    nursery.start_soon(one, i)
