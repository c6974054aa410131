"""The upload queue: every staged file that needs it reaches the store, or is kept.

One task per staged file owns its upload (``queue`` starts it, at most ``uploads`` run at once).
An attempt snapshots the file (changes wait while it reads, see ``StagedFile.busy``), puts it
with a condition on the version this mount last saw at that key (``Record.expect``; a HEAD
check first where the store may ignore conditions), then hands the new object to
``on_uploaded``. A failed attempt (after the backend's own retries) marks the file failed, which
``fsync``, ``sync`` and ``--sync-uploads`` close report as EIO, and tries again later (1 s
doubling to 60 s; 5 minutes after a refusal, which is logged once per file); ``sync`` retries
failed files at once. A conflict (the object changed or appeared meanwhile) uploads this
mount's version under ``KEY.conflict-TIME`` next to it, counted and logged. Nothing is dropped:
a staged file leaves the staging area only once the store holds its bytes.

With worker processes (``--fetch-workers``), a worker reads the staged file and sends it (the
HEAD check, the PUT or the multipart upload), so the FUSE process spends no CPU on the
store's client; an upload that copies ranges of its base object reads them through this
process's block cache, so it runs here, as does every upload while no worker is ready.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable

import trio

from .. import threads
from ..backends.base import Attrs, Condition, ObjectInfo, ObjectStore, Upload, check_version
from ..errors import AccessDenied, Conflict, FusefsError, NotFound, StaleVersion
from ..workers import protocol as P
from ..workers.pool import FetchPool, PoolUnavailable, WorkerDied
from .conditions import MAX_KEY_BYTES, ConditionProbe, condition_for, conflict_key
from .journal import Record
from .staged import StagedFile
from .staging import Staging

log = logging.getLogger(__name__)

#: Wait after a refused upload (access denied, bucket gone) before trying again.
REFUSED_RETRY = 300.0
#: Longest wait between attempts of an upload that failed for another reason.
MAX_BACKOFF = 60.0
#: Seconds between ``close`` and the start of the upload (write-back): attributes set right
#: after close (``tar``, ``cp -p``, ``rsync`` set times and modes) join the same upload.
#: ``fsync``, ``sync`` and unmount start it at once.
WRITE_BACK_DELAY = 1.0


class UploadFailed(FusefsError):
    """The file's upload failed (its data is kept and retried): EIO for the caller."""


#: Files at most this big are put into the block cache after their upload (reading them back
#: then makes no request); bigger ones are fetched again when read.
SEED_MAX = 256 * 1024 * 1024

class Uploads:
    """Uploads staged files; counts what it did (the ``uploads_*`` stats)."""

    def __init__(
        self,
        store: ObjectStore,
        staging: Staging,
        *,
        parallel: int,
        on_uploaded: Callable[[StagedFile, ObjectInfo, int], None],
        on_conflict: Callable[[StagedFile, str, ObjectInfo | None], None],
        on_idle: Callable[[StagedFile], None] | None = None,
        read_base: Callable[[ObjectInfo, int, int], Awaitable[bytes]] | None = None,
        single_put_max: int = 8 << 20,
        pool: FetchPool | None = None,
        seed: tuple[str, int] | None = None,
    ) -> None:
        """``seed``: (source, block size) of the block cache a worker puts what it uploaded
        into (files up to ``SEED_MAX``), None: no cache."""
        self.store = store
        self.staging = staging
        self.limiter = trio.CapacityLimiter(parallel)
        self.on_uploaded = on_uploaded
        self.on_conflict = on_conflict
        #: called when no task uploads ``sf`` any more (it may leave the staging area)
        self.on_idle = on_idle
        #: reads a base object's bytes (through the block cache) for copy ranges
        self._read_base = read_base
        #: the worker processes that send uploads, if any
        self.pool = pool
        self._seed = seed
        self.in_workers = 0  # uploads a worker process sent
        self._token: trio.lowlevel.TrioToken | None = None
        #: largest upload the store sends as one PUT (the part size)
        self.single_put_max = single_put_max
        self.conditions = ConditionProbe(store, lambda: staging.dir, single_put_max)
        self._nursery: trio.Nursery | None = None
        self.done = 0
        self.bytes = 0
        self.conflicts = 0
        self.failed: set[StagedFile] = set()
        self.in_flight = 0

    def start(self, nursery: trio.Nursery) -> None:
        """Begin uploading; files recovered from the journal are queued now."""
        self._nursery = nursery
        self._token = trio.lowlevel.current_trio_token()
        for sf in self.staging.all():
            if sf.rec.multipart:  # cut by a crash: never completed, billed until aborted
                nursery.start_soon(self._abort_orphan, sf.rec.key, sf.rec.multipart)
                sf.rec.multipart = ""
        for sf in list(self.staging.files.values()) + list(self.staging.detached):
            if sf.rec.state == "failed" and sf.rec.error.startswith("the program"):
                self.failed.add(sf)  # never closed: kept for the user, not uploaded
                continue
            if sf.needs_upload:
                self.queue(sf)

    async def _abort_orphan(self, key: str, upload_id: str,
                            left_by: str = "an earlier mount") -> None:
        abort = getattr(self.store, "abort_upload", None)
        if abort is None:
            return
        try:
            await threads.run_sync(abort, key, upload_id)
            log.info("%r: aborted a multipart upload %s left unfinished", key, left_by)
        except Exception as exc:  # noqa: BLE001 - S3 lifecycle rules remain the backstop
            log.warning("%r: could not abort an unfinished multipart upload: %s", key, exc)

    @property
    def pending(self) -> int:
        files = list(self.staging.files.values()) + list(self.staging.detached)
        return sum(1 for sf in files if sf.needs_upload)

    def queue(self, sf: StagedFile, delay: float = 0.0) -> None:
        """Make sure a task is uploading ``sf`` (journaled first), after ``delay`` seconds.
        While write handles are open it uploads only what ``flush``/``fsync`` asked for."""
        if not sf.needs_upload:
            return
        if sf.queued:
            if sf.rec.state == "failed":
                sf.nudge.set()
            return
        if self._nursery is None:
            raise FusefsError("uploads are not running")
        sf.queued = True
        self._nursery.start_soon(self._run, sf, delay)

    async def _run(self, sf: StagedFile, first_delay: float) -> None:
        try:
            if first_delay:  # write-back: changes made right after close join this upload
                with trio.move_on_after(first_delay):
                    await sf.nudge.wait()
                sf.nudge = trio.Event()
            await self._loop(sf)
        except Exception as exc:  # noqa: BLE001 - a background task must not end the mount
            log.error("upload of %r stopped (kept in the staging area; sync retries it): %s",
                      sf.key, exc)
            sf.attempts += 1
            self._failed(sf, sf.gen, exc)
        finally:
            sf.queued = False
            sf.signal()
            if self.on_idle is not None:
                self.on_idle(sf)

    async def _loop(self, sf: StagedFile) -> None:
        """Attempts until the store holds the file, it is being written again, or it became
        a conflict (backoff between failures; a full disk while journaling is a failure)."""
        delay = 1.0
        while sf.needs_upload and not sf.removed:
            if sf.writers and not sf.flush_requested:
                break  # still being written: its flush or last close queues it again
            sf.flush_requested = False
            wait: float | None
            if sf.durable_gen != sf.gen:  # on disk and journaled before it goes
                try:
                    await self.sync(sf, durable=True)
                    wait = await self._attempt(sf)
                except Exception as exc:  # noqa: BLE001 - a full disk: kept, retried
                    sf.attempts += 1  # an attempt that failed (``sync`` waits for one)
                    wait = self._failed(sf, sf.gen, exc)
            else:
                wait = await self._attempt(sf)
            if sf.rec.state == "conflict":
                break  # kept and reported; only a new change or ``sync`` tries again
            if wait is None:
                continue
            with trio.move_on_after(wait if wait != math.inf else delay):
                await sf.nudge.wait()
            sf.nudge = trio.Event()
            delay = min(MAX_BACKOFF, delay * 2)

    async def sync(self, sf: StagedFile, durable: bool = False) -> None:
        """Journal ``sf`` (state pending) with a token unique to this change (so the token a
        crash leaves in the journal is the one its upload carries); ``durable``: its data
        synced to disk first."""
        await sf.idle()
        if sf.token_gen != sf.gen:
            sf.rec.token = uuid.uuid4().hex
            sf.token_gen = sf.gen
        sf.changing = False
        rec, gen = self.staging.snapshot(sf)
        await threads.run_sync(self.staging.sync, sf, rec, durable)
        sf.synced_gen = max(sf.synced_gen, gen)
        if durable:
            sf.durable_gen = max(sf.durable_gen, gen)

    async def _attempt(self, sf: StagedFile) -> float | None:
        """One upload of ``sf``; None when done (or nothing to do), else seconds to wait
        before the next (``inf``: the backoff)."""
        await sf.ready_to_upload()  # before a slot: a pinned file holds none
        async with self.limiter:
            if not sf.needs_upload:
                return None
            await sf.ready_to_upload()
            if not sf.hold():  # removed meanwhile (unlinked): nothing to upload
                return None
            sf.busy = trio.Event()
            gen = sf.gen
            rec = Record(**{**sf.rec.__dict__, "dirty": list(sf.rec.dirty)})
            copy = sf.copy_ranges()
            self.in_flight += 1
            started = trio.current_time()
            log.debug("uploading %s: %d bytes (change %d, %d copy ranges)", rec.key, rec.size,
                      gen, len(copy))
            try:
                info = await self._put(sf, rec, copy)
            except (Conflict, StaleVersion, NotFound) as exc:
                # NotFound: AWS answers an If-Match on a key another writer deleted with 404,
                # and a copy range whose base is gone likewise; else (the bucket) a failure
                if isinstance(exc, NotFound) and not (copy or condition_for(rec.expect).version):
                    return self._failed(sf, gen, exc)
                mine = await self._already_there(rec)
                if mine is None:
                    return await self._conflict(sf, rec, copy, exc)
                info = mine
            except Exception as exc:  # noqa: BLE001 - kept and retried, whatever it was
                return self._failed(sf, gen, exc)
            finally:
                sf.unhold()
                self.in_flight -= 1
                sf.attempts += 1
                busy, sf.busy = sf.busy, None
                busy.set()
        log.debug("uploaded %s: %d bytes in %.2f s", rec.key, rec.size,
                  trio.current_time() - started)
        self.done += 1
        self.bytes += rec.size
        self.failed.discard(sf)
        if sf.rec.state == "failed" or sf.failed_logged:
            log.info("%s: uploaded after earlier failures", rec.key)
        sf.failed_logged = False
        sf.uploaded(info, gen)
        self.on_uploaded(sf, info, gen)
        sf.signal()
        return None

    async def _already_there(self, rec: Record) -> ObjectInfo | None:
        """The object at ``rec.key`` if it is this very upload (the store has it, but the
        answer was lost, or the daemon died before journaling it): it carries this upload's
        token. Size and time prove nothing (two writers can agree on both)."""
        if not rec.token:
            return None
        try:
            now = await threads.run_sync(self.store.head, rec.key)
        except Exception:  # noqa: BLE001 - then it is a conflict
            return None
        if now.token == rec.token and now.size == rec.size:
            log.info("%r: already in the store (an earlier attempt got through)", rec.key)
            return now
        return None

    async def _put(self, sf: StagedFile, rec: Record, copy: tuple[tuple[int, int], ...]
                   ) -> ObjectInfo:
        """Check (where the store may ignore conditions), then upload."""
        check = None
        if rec.expect is not None:
            if rec.expect.startswith("~"):
                check = rec.expect
            else:
                enforced = self.conditions.known(rec.size, bool(copy))
                if enforced is None:  # probes the store once
                    enforced = await threads.run_sync(self.conditions.enforced, rec.size,
                                                      bool(copy))
                if not enforced:
                    check = rec.expect
        return await self._send(sf, rec, copy, rec.key, condition_for(rec.expect),
                                Attrs(rec.mtime, rec.mode, rec.token or None, rec.uid,
                                      rec.gid, rec.rdev), check,
                                seed=0 < rec.size <= SEED_MAX)

    async def _send(self, sf: StagedFile, rec: Record, copy: tuple[tuple[int, int], ...],
                    key: str, cond: Condition, attrs: Attrs, check: str | None,
                    seed: bool = False) -> ObjectInfo:
        """Put ``sf``'s data (``rec``) at ``key``: in a worker process when one is ready and
        nothing is copied from the base, else in a thread here. ``seed``: the worker puts the
        bytes into the block cache too (``sf.seeded``), where there is one."""
        if self.pool is not None and not copy and self.pool.usable:
            began: list[str] = []

            def started(upload_id: str) -> None:
                began.append(upload_id)
                self.staging.journal.save(dataclasses.replace(rec, multipart=upload_id))

            try:
                info, seeded = await self.pool.put(
                    P.Put(key, sf.path, rec.size, cond, attrs, check,
                          self._seed if seed else None), started)
            except PoolUnavailable:
                pass
            except WorkerDied:
                if began:  # it died with a multipart upload open: billed until aborted
                    with trio.CancelScope(shield=True):
                        await self._abort_orphan(key, began[-1], "a worker process that died")
                raise
            else:
                self.in_workers += 1
                if seeded:
                    sf.seeded = info.version
                return info

        def here() -> ObjectInfo:
            if check is not None:
                check_version(self.store, key, check)
            return self.store.put_file(key, self._upload(sf, rec, copy), condition=cond,
                                       attrs=attrs)

        return await threads.run_sync(here)

    def _upload(self, sf: StagedFile, rec: Record, copy: tuple[tuple[int, int], ...]
                ) -> Upload:
        """What to send; bytes of the base that the store does not copy server-side are read
        through the mount's block cache (cached blocks cost no request)."""
        def started(upload_id: str) -> None:  # worker thread; the file is busy
            self.staging.journal.save(dataclasses.replace(rec, multipart=upload_id))

        if not copy:
            return Upload(sf.path, rec.size, started=started)
        read_base = None
        if self._read_base is not None and self._token is not None:
            base = ObjectInfo(rec.base_key, rec.base_size, rec.base_mtime, rec.base_version)
            token, read = self._token, self._read_base

            def read_base(start: int, length: int) -> bytes:
                return trio.from_thread.run(read, base, start, length, trio_token=token)

        return Upload(sf.path, rec.size, copy, rec.base_key, rec.base_version, read_base,
                      started)

    def _failed(self, sf: StagedFile, gen: int, exc: BaseException) -> float:
        refused = isinstance(exc, AccessDenied | NotFound)
        sf.rec.state = "failed"
        sf.rec.error = str(exc) or type(exc).__name__
        sf.failed_gen = gen
        self.failed.add(sf)
        if not sf.failed_logged:
            sf.failed_logged = True
            log.error("upload of %s failed (kept in the staging area, retried): %s",
                      sf.key, sf.rec.error)
        sf.signal()
        return REFUSED_RETRY if refused else math.inf

    async def _conflict(self, sf: StagedFile, rec: Record, copy: tuple[tuple[int, int], ...],
                        exc: BaseException) -> float | None:
        """Another writer changed ``rec.key``: keep both (this version under a conflict
        name), never overwrite theirs. A file partly made of the overwritten object takes
        those bytes from the block cache; where it cannot, it stays in the staging area as a
        conflict (reported, not retried: nothing it could send would be right)."""
        if sf.conflict_gen != sf.gen:
            self.conflicts += 1
        sf.conflict_gen = sf.gen
        target = conflict_key(rec.key, limit=MAX_KEY_BYTES
                              - len(os.fsencode(getattr(self.store, "prefix", ""))))
        if copy:
            try:
                await self._materialize(sf, rec, copy)
            except Exception as exc2:  # noqa: BLE001 - the base's bytes are gone
                sf.rec.state = "conflict"
                sf.rec.error = (f"{rec.key} changed meanwhile and the bytes this file kept from "
                                f"it are gone ({exc2}); local changes kept in "
                                f"{sf.path}")
                log.warning("%s", sf.rec.error)
                self.failed.add(sf)
                sf.signal()
                return None
            copy = ()
        log.warning("%s changed in the store since this mount read it: this mount's version "
                    "goes to %s", rec.key, target)
        try:
            info = await self._send(sf, rec, copy, target, Condition(absent=True),
                                    Attrs(rec.mtime, rec.mode, None, rec.uid, rec.gid,
                                          rec.rdev), None)
        except Exception as exc2:  # noqa: BLE001 - kept and retried
            return self._failed(sf, sf.gen, exc2)
        self.failed.discard(sf)
        self.on_conflict(sf, target, info)
        sf.signal()
        return None

    async def _materialize(self, sf: StagedFile, rec: Record,
                           copy: tuple[tuple[int, int], ...]) -> None:
        """Put the base's bytes of the ``copy`` ranges into the data file (through the block
        cache: cached blocks of the old version are still right), so it depends on no object
        (the file is busy: no change interleaves)."""
        if self._read_base is None:
            raise FusefsError("no reader for the base")
        base = ObjectInfo(rec.base_key, rec.base_size, rec.base_mtime, rec.base_version)
        step = 8 << 20
        for a, b in copy:
            for pos in range(a, b, step):
                n = min(step, b - pos)
                sf.fill(pos, await self._read_base(base, pos, n))

    async def wait_file(self, sf: StagedFile) -> None:
        """Until the store holds ``sf`` as it is now (a failed file is tried again at once);
        UploadFailed if that attempt fails."""
        target, mark = sf.gen, sf.attempts
        if sf.needs_upload:
            sf.flush_requested = True
            sf.nudge.set()
            self.queue(sf)
        while True:
            if sf.conflict_gen >= target:  # its bytes are under a conflict name, not its own
                raise UploadFailed(f"{sf.key}: another writer changed it; this version was "
                                   "kept under a conflict name")
            if sf.uploaded_gen >= target or sf.unlinked or not sf.needs_upload:
                return
            if sf.rec.state == "conflict" or (sf.attempts > mark and sf.failed_gen >= target):
                raise UploadFailed(f"{sf.key}: upload failed: {sf.rec.error}")
            await sf.changed.wait()

    async def wait_all(self, prefix: str = "",
                       progress: Callable[[int, int], Awaitable[None] | None] | None = None,
                       ) -> list[StagedFile]:
        """Until every upload under ``prefix`` is done or has been tried once more (failed
        and delayed ones are tried now); returns those that failed, and those a crash left
        half-changed (kept, never uploaded)."""
        kept = [sf for sf in self._files(prefix) if sf.needs_upload
                and sf.rec.error.startswith("the program")]
        todo = [sf for sf in self._files(prefix) if sf.needs_upload and sf.writers == 0
                and sf not in kept]
        marks = {id(sf): sf.attempts for sf in todo}
        for sf in todo:
            sf.nudge.set()
            self.queue(sf)
        total = len(todo)
        while True:
            left = [sf for sf in todo if sf.needs_upload and sf.rec.state != "conflict"
                    and not (sf.attempts > marks[id(sf)] and sf.failed_gen >= sf.gen)]
            if progress is not None:
                r = progress(total - len(left), total)
                if r is not None:
                    await r
            if not left:
                return kept + [sf for sf in todo if sf.needs_upload]
            await trio.sleep(0.05)

    def _files(self, prefix: str) -> list[StagedFile]:
        files = list(self.staging.files.values()) + list(self.staging.detached)
        return [sf for sf in files if sf.key.startswith(prefix)]

    async def drain(self, grace: float) -> int:
        """At unmount: wait up to ``grace`` seconds for pending uploads; returns how many are
        left (they stay journaled and resume at the next mount)."""
        for sf in self._files(""):
            sf.nudge.set()  # no write-back delay now
        with trio.move_on_after(grace):
            while any(sf.needs_upload and sf not in self.failed
                      for sf in self._files("")):
                await trio.sleep(0.05)
        left = sum(1 for sf in self._files("") if sf.needs_upload)
        if left:
            log.warning("%d upload(s) not finished at unmount: kept in %s, they resume at the "
                        "next mount of this source with this cache", left, self.staging.dir)
        return left
