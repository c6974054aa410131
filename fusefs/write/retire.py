"""After an upload (a mixin of :class:`~.writes.Writes`): what the store now holds is taken
into the namespace, and a staged file nobody uses leaves the staging area.

A finished upload becomes the object at its name (``FileSystem.observed``, ``Folders.note``:
a lookup makes no request), with the metadata that was sent where the answer lacks it; a
conflict leaves the file in the store under its conflict name. A staged file leaves the
staging area (``_retire``) when it is uploaded and no handle, upload or queue holds it; its
bytes go into the block cache first (``_seed``, up to ``SEED_MAX``; already done by the
worker process that uploaded it, if one did: ``StagedFile.seeded``), so reading it back makes
no request.

Invariants: a retiring file leaves its name first (on the trio thread), then its journal row
(a crash from there on must not upload it again over a newer change of its name), then its
data; each once (``retiring``). A failure in the background is logged, never the mount's end:
the file stays staged. The block cache only gets bytes that were all local and of the
uploaded size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from .. import threads
from ..backends.base import ObjectInfo
from ..errors import FusefsError
from .deletes import PendingDeletes
from .staged import StagedFile
from .staging import Staging
from .uploads import SEED_MAX

if TYPE_CHECKING:
    from ..fs import FileSystem

log = logging.getLogger(__name__)

class Retiring:
    """:class:`~.writes.Writes`'s end of an upload (a mixin: the attributes below are the
    write side's)."""

    fs: FileSystem
    staging: Staging
    deletes: PendingDeletes

    def maybe_retire(self, sf: StagedFile) -> None:
        """Let an uploaded staged file nobody uses leave the staging area (in the background).

        One that a descriptor still holds stays on its name, whatever another writer makes
        of the object meanwhile: changes made through the name are changes of the file the
        descriptor has open (the same inode)."""
        if (sf.handles == 0 and not sf.needs_upload and not sf.queued and not sf.unlinked
                and sf.rec.state not in ("failed", "conflict")):
            with contextlib.suppress(FusefsError):  # not serving (unmount): it stays staged
                self.fs.reader.start_soon(lambda: self._retire_logged(sf))

    async def _retire_logged(self, sf: StagedFile) -> None:
        """A background ``_retire``: a failure (a full disk) is logged, never the mount's end
        (the file stays staged and leaves at the next chance)."""
        try:
            await self._retire(sf, seed=True)
        except Exception as exc:  # noqa: BLE001 - background: nobody to answer
            log.warning("%r: could not leave the staging area yet: %s", sf.key, exc)

    def _uploaded(self, sf: StagedFile, info: ObjectInfo, gen: int) -> None:
        if info.meta_mtime is None:  # what was sent, if the answer did not say
            info = dataclasses.replace(info, meta_mtime=sf.rec.mtime, mode=sf.rec.mode,
                                       uid=sf.rec.uid, gid=sf.rec.gid, rdev=sf.rec.rdev)
        self.fs.folders.attrs.remember(info)
        self.deletes.kick()  # a delete may have waited for this file's base
        if sf.unlinked:
            return
        now = self.fs.clock()
        self.fs.observed(info.key, info, now, same_bytes=True)
        self.fs.folders.note(info.key, info)
        if info.key == sf.key and gen == sf.gen:
            sf.confirmed = now
        self.maybe_retire(sf)

    def _conflicted(self, sf: StagedFile, target: str, info: ObjectInfo | None) -> None:
        if info is not None:
            self.fs.folders.note(target, info)
        self.fs.mark_stale(sf.key)
        sf.conflict_gen = sf.gen
        sf.uploaded_gen = sf.gen
        if self.staging.files.get(sf.key) is sf:
            self.staging.detach(sf)
        # in the store under the conflict name: its row goes now (a crash must not send it
        # again), its data once nothing reads it
        remove = self.staging.remove if sf.handles == 0 else self.staging.journal.remove
        arg = sf if sf.handles == 0 else sf.rec.id
        with contextlib.suppress(FusefsError):
            self.fs.reader.start_soon(lambda: threads.run_sync(remove, arg))

    async def _retire(self, sf: StagedFile, seed: bool = False) -> None:
        """A staged file the store holds and nobody has open leaves the staging area (its
        bytes put into the block cache first: reading it back makes no request)."""
        if sf.handles or sf.needs_upload or sf.queued or sf.retiring:
            return
        sf.retiring = True  # once: a release and an upload's end may both ask
        # Off its name first, here on the trio thread: an open(), truncate or chmod from now on
        # finds the store's object, never this file whose descriptor the worker closes below
        # (nor its bytes while they are copied into the block cache).
        self.staging.detach(sf)
        # its row goes at once: a crash from here on must not upload it again over a newer
        # change of the same name (the data file left behind is swept at the next mount)
        await threads.run_sync(self.staging.journal.remove, sf.rec.id)
        if (seed and sf.rec.base_key == sf.key and 0 < sf.size <= SEED_MAX
                and sf.seeded != sf.rec.base_version and sf.hold()):
            try:
                await threads.run_sync(self._seed, sf)
            finally:
                sf.unhold()
        await threads.run_sync(self.staging.remove, sf)

    def _seed(self, sf: StagedFile) -> None:
        """Worker thread (``sf`` held): its bytes into the block cache."""
        try:
            self._seed_blocks(sf)
        except OSError as exc:  # a cache that cannot take them: they are fetched when read
            log.warning("%r: not put into the block cache: %s", sf.key, exc)

    def _seed_blocks(self, sf: StagedFile) -> None:
        reader = self.fs.reader
        info = sf.base_info()
        if sf.rec.base_limit != sf.size:
            return
        for idx in range(reader.block_count(info.size)):
            start = idx * reader.block_size
            end = start + reader.block_bytes(info, idx)
            if sf.segments(start, end - start) != [(True, start, end)]:
                continue  # part of it was never local (copied server-side)
            data = os.pread(sf.fd, end - start, start)
            if len(data) != end - start:
                return
            reader.blocks.put(reader.block_key(info, idx), data)
