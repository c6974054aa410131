"""Pending deletes: names this mount removed whose object the store still has.

An unlink, a rename away, or a replaced staged file leaves "delete version V of key K" to do.
Each such intent is journaled before the name disappears from the mount (a crash resumes it,
so a removed or renamed-away name never comes back), and carried out:

- **conditionally**: only if K still has version V (S3 ``If-Match``, GCS
  ``ifGenerationMatch``, Azure ``If-Match``; a HEAD right before where the store may ignore
  the header). Another writer's newer object at K is never removed; a vanished one is done.
- **when nothing needs V any more**: no open handle reads it, no staged file's unchanged
  ranges come from it (``needed``). An unlinked file that is still open keeps its bytes.
- **absorbed** when this mount creates K again before the delete ran (:meth:`take`): the new
  file's upload replaces V itself (its condition is V), so nothing is deleted under it.

Failures are retried with backoff (1 s doubling to 60 s); every state lives in the journal.

Concurrency: the trio thread owns ``entries``; store calls run in worker threads. ``kick``
wakes the runner; an entry taken while its delete is in flight is re-checked afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .. import threads
from ..backends.base import Condition, ObjectStore
from ..errors import Conflict, NotFound

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


class PendingDeletes:
    """Key -> version to delete (see the module docstring)."""

    def __init__(self, store: ObjectStore, save: Callable[[str, str], None],
                 forget: Callable[[str], None],
                 needed: Callable[[str, str], bool],
                 limiter: trio.CapacityLimiter | None = None,
                 on_late: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.store = store
        #: called with a key whose delete ran after the operation that asked for it (its
        #: folders may have been listed meanwhile, showing what is gone now)
        self._on_late = on_late
        self._save = save  # journal a row (worker thread)
        self._forget = forget  # drop a row (worker thread)
        self._needed = needed
        self._limiter = limiter
        self.entries: dict[str, str] = {}
        self._wake = trio.Event()
        #: deletes sent and not answered yet (set when done)
        self._running: dict[str, trio.Event] = {}
        self.changed = trio.Event()

    def load(self, entries: dict[str, str]) -> None:
        """Intents left by an earlier mount (from its journal)."""
        self.entries.update(entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    async def delete(self, key: str, version: str) -> None:
        """Delete ``version`` of ``key``: journaled first, done now unless something still
        needs it (then by the runner, as soon as nothing does); a failure is retried later."""
        if not version:
            return
        await threads.run_sync(self._save, key, version)
        self.entries[key] = version
        if not self._needed(key, version) and key not in self._running:
            await self._delete(key, version)
        self.kick()

    async def take(self, key: str) -> str | None:
        """This mount re-creates ``key``: the pending delete is absorbed; returns the version
        the store still holds there (the new upload's condition), or None if none was
        pending. A delete of ``key`` already sent ends first (then the store has no version
        of ours there, or another writer's: None)."""
        while key in self._running:
            await self._running[key].wait()
        version = self.entries.pop(key, None)
        if version is not None:
            await threads.run_sync(self._forget, key)
        return version

    def kick(self) -> None:
        self._wake.set()

    def pending_under(self, prefix: str) -> list[str]:
        return [k for k in self.entries if k.startswith(prefix)]

    async def run(self) -> None:
        """The runner (one task for the life of the mount)."""
        delay = 1.0
        while True:
            self._wake = trio.Event()
            failed = False
            for key, version in list(self.entries.items()):
                if (key in self._running or self.entries.get(key) != version
                        or self._needed(key, version)):
                    continue  # (taken, or replaced, while an earlier delete ran)
                try:
                    if not await self._delete(key, version, late=True):
                        failed = True
                except Exception as exc:  # noqa: BLE001 - the journal (a full disk): retried
                    log.warning("pending delete of %r: %s (kept, retried)", key, exc)
                    failed = True
            self.changed.set()
            self.changed = trio.Event()
            if failed:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                delay = min(MAX_BACKOFF, delay * 2)
            else:
                delay = 1.0
                await self._wake.wait()

    async def _delete(self, key: str, version: str, late: bool = False) -> bool:
        done = self._running[key] = trio.Event()
        failed = gone = False
        try:
            await threads.run_sync(self._conditional_delete, key, version,
                                   limiter=self._limiter)
        except Conflict:
            log.info("%r: not deleted: another writer replaced it meanwhile (theirs is kept)",
                     key)
        except Exception as exc:  # noqa: BLE001 - kept and retried, whatever it was
            log.warning("delete of %r failed (kept, retried): %s", key, exc)
            failed = True
        finally:
            del self._running[key]
            gone = not failed and self.entries.get(key) == version  # not taken or replaced
            if gone:
                del self.entries[key]
            done.set()  # a ``take`` waiting for this delete finds its entry gone, or kept
        if gone:
            if late and self._on_late is not None:
                await self._on_late(key)
            await threads.run_sync(self._forget, key)
        return not failed

    def _conditional_delete(self, key: str, version: str) -> None:
        """Worker thread: delete ``key`` if it still has ``version``."""
        enforced = getattr(self.store, "enforces_delete_conditions",
                           self.store.enforces_conditions)
        if not enforced or version.startswith("~"):
            try:
                now = self.store.head(key).version
            except NotFound:
                return
            if now != version:
                raise Conflict(f"{key}: changed")
        cond = Condition(version=version) if not version.startswith("~") else Condition()
        self.store.delete(key, condition=cond)

    async def wait_idle(self, prefix: str = "") -> int:
        """Run the deletes under ``prefix`` that nothing needs (two passes of the runner);
        returns how many are left under it."""
        for _ in range(2):
            if not any(k.startswith(prefix) and not self._needed(k, v)
                       for k, v in self.entries.items()):
                break
            changed = self.changed
            self.kick()
            await changed.wait()
        return sum(1 for k in self.entries if k.startswith(prefix))
