"""The overlay of a read-write mount (a mixin of :class:`~.writes.Writes`): this mount's own
changes laid over what the store lists, and their reconciliation with it.

Staged files show at their names (their local size and time) and in their folders' listings;
names with a pending delete are hidden (:meth:`Overlay.hides`), and so are the folders this
mount removed or renamed away while deletes in them still wait (``gone_folders``). A staged
file is "clean" once nothing of it waits for the store and nothing works on it: its name is
then the store's object (its upload). One a descriptor still holds whose upload was seen in
the store longer than the metadata TTL ago is :meth:`~Overlay.unconfirmed`: its name is asked
of the store again, and :meth:`~Overlay.reconcile` decides.

Invariants: an unconfirmed file keeps its name only while the store shows its own upload
there (the version its row is based on), or an observation older than its own; another
writer's object (or none) takes the name for good: the staged file is detached and its
journal row removed (a crash must not upload it over theirs), its descriptors keep reading
it. A file changed here meanwhile is always ours. Runs on the trio thread.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from .. import threads
from ..backends.base import ObjectInfo
from ..errors import FusefsError, NotFound
from ..folders import join
from .deletes import PendingDeletes
from .staged import StagedFile
from .staging import Staging

if TYPE_CHECKING:
    from ..fs import FileSystem

log = logging.getLogger(__name__)


class Overlay:
    """:class:`~.writes.Writes`'s overlay (a mixin: the attributes and the methods declared
    below are the write side's)."""

    fs: FileSystem
    staging: Staging
    deletes: PendingDeletes
    gone_folders: set[str]

    if TYPE_CHECKING:
        async def delete_object(self, key: str) -> None: ...

    def info_of(self, sf: StagedFile) -> ObjectInfo:
        """What a staged file looks like to ``stat``."""
        rec = sf.rec
        return ObjectInfo(rec.key, rec.size, rec.mtime, rec.base_version if
                          rec.base_key == rec.key else "", rec.mtime, rec.mode, None,
                          rec.uid, rec.gid, rec.rdev)

    def merge(self, dir_path: str,
              entries: list[tuple[str, bool, ObjectInfo | None]], listed: float
              ) -> list[tuple[str, bool, ObjectInfo | None]]:
        """A folder listing (made at ``listed``) with this mount's staged files added and
        hidden names removed (and :meth:`reconcile` done for unconfirmed staged files)."""
        extra: dict[str, tuple[str, bool, ObjectInfo | None]] = {}
        if self.staging.files.has_under(dir_path):
            files, subs = self.staging.files.in_folder(dir_path)
            for sub in subs:
                extra[sub] = (sub, True, None)
            listing: dict[str, tuple[str, bool, ObjectInfo | None]] | None = None
            for sf in files:
                name = sf.key.rpartition("/")[2]
                if self._unconfirmed(sf) and listed >= (sf.confirmed or 0.0):
                    if listing is None:
                        listing = {e[0]: e for e in entries}
                    e = listing.get(name)
                    if self.reconcile(sf, None if e is None else (e[1], e[2], listed)) is None:
                        self.fs.drop_path(sf.key)
                        continue
                extra[name] = (name, False, self.info_of(sf))
        if not extra and not self.deletes.entries:
            return entries
        out = []
        for e in entries:
            name = e[0]
            if self.hides(join(dir_path, name), e[1], e[2]):
                continue
            if name in extra:
                if e[1] and extra[name][1]:
                    del extra[name]
                    out.append(e)
                continue
            out.append(e)
        out.extend(extra.values())
        out.sort(key=lambda e: e[0])
        return out

    def overlay(self, path: str) -> tuple[bool, ObjectInfo | None] | None:
        """What this mount's own changes say ``path`` is: (is_dir, info), or None (ask the
        store, then :meth:`hides`; and :meth:`reconcile` for an :meth:`unconfirmed` file)."""
        sf = self.staging.files.get(path)
        if sf is not None:
            if self._unconfirmed(sf):
                return None
            return False, self.info_of(sf)
        if self.staging.files.has_under(path):
            return True, None
        return None

    async def _deleted_late(self, key: str) -> None:
        """A delete that waited (a reader, an upload copying from it) is done: listings made
        meanwhile may show its folders, which are listed again when next asked for; a folder
        this mount removed or renamed away with nothing of it left to delete goes from the
        store too (a store that keeps emptied folders as directories: SeaweedFS, local)."""
        self.fs.folders.mark_stale_above(key)
        for folder in sorted((g for g in self.gone_folders if key.startswith(g + "/")),
                             key=len, reverse=True):
            if self.deletes.pending_under(folder + "/"):
                continue
            self.gone_folders.discard(folder)
            try:
                await self.delete_object(folder + "/")
            except FusefsError as exc:  # an S3 store has no such object: nothing to do
                log.debug("%r: %s", folder + "/", exc)

    def _clean(self, sf: StagedFile) -> bool:
        """Nothing of ``sf`` waits for the store, nothing writes or works on it: the store's
        object under its name is its upload (as long as no other writer changed it)."""
        return (sf.confirmed is not None and sf.writers == 0 and not sf.needs_upload
                and not sf.changing and not sf.queued and sf.busy is None and not sf.pins
                and not sf.retiring and sf.rec.state not in ("failed", "conflict")
                and sf.rec.base_key == sf.key and sf.rec.base_limit == sf.size
                and self.staging.files.get(sf.key) is sf)

    def _unconfirmed(self, sf: StagedFile) -> bool:
        """A clean staged file a descriptor still holds, its upload last seen in the store
        longer than the metadata TTL ago: the name is asked of the store again, as any file's."""
        assert sf.confirmed is not None or not self._clean(sf)
        return self._clean(sf) and not self.fs.folders.fresh(sf.confirmed or 0.0,
                                                             self.fs.clock())

    def unconfirmed(self, path: str) -> StagedFile | None:
        sf = self.staging.files.get(path)
        return sf if sf is not None and self._unconfirmed(sf) else None

    def reconcile(self, sf: StagedFile, found: tuple[bool, ObjectInfo | None, float] | None
                  ) -> tuple[bool, ObjectInfo | None, float] | None:
        """What the store showed (``found``, None: nothing) for an :meth:`unconfirmed` file's
        name. Its own upload still there: the staged file stays the name (returned as seen).
        Another writer's object, or none: the staged file leaves the name (the descriptors
        keep reading it; changes through the name now reach the other's object); None."""
        if self.staging.files.get(sf.key) is not sf or not self._clean(sf):
            return False, self.info_of(sf), self.fs.clock()  # changed here meanwhile: ours
        assert sf.confirmed is not None
        if found is not None and not found[0] and found[1] is not None and (
                found[1].version == sf.rec.base_version):
            sf.confirmed = max(sf.confirmed, found[2])
            return False, self.info_of(sf), found[2]
        if found is not None and found[2] < sf.confirmed:
            return False, self.info_of(sf), self.fs.clock()  # an older observation than ours
        # off its name for good, as if unlinked: its descriptors read it, nothing of it goes
        # to the store again, and its row goes (a crash must not upload it over theirs)
        self.staging.detach(sf)
        sf.unlinked = True
        with contextlib.suppress(FusefsError):
            self.fs.reader.start_soon(
                lambda: threads.run_sync(self.staging.journal.remove, sf.rec.id))
        return None

    def hides(self, path: str, is_dir: bool, info: ObjectInfo | None) -> bool:
        """Is what the store shows at ``path`` the object this mount removed (a delete of it
        is pending: it waits for a reader, or failed and is retried)? Another writer's newer
        object there shows (the pending delete is conditional: it keeps theirs). A folder is
        hidden only while it is one this mount removed or renamed away (``gone_folders``) and
        deletes of objects in it still wait."""
        if is_dir:
            if path not in self.gone_folders:
                return False
            if self.deletes.pending_under(path + "/"):
                return True
            self.gone_folders.discard(path)
            return False
        version = self.deletes.entries.get(path)
        if version is None or info is None:
            return False
        return version.startswith("~") or info.version == version

    async def exists(self, path: str) -> tuple[bool, ObjectInfo | None] | None:
        """(is_dir, info) of ``path``, or None if nothing is there."""
        parent, _, name = path.rpartition("/")
        ov = self.overlay(path)
        if ov is not None:
            return ov
        try:
            is_dir, info, _ = await self.fs.resolve(parent, name)
        except NotFound:
            return None
        return is_dir, info
