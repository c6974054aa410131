"""Conditional writes: the condition an upload carries, whether the store enforces it, and
where a conflicting version goes.

An upload is conditional on the version this mount last saw at its key (``condition_for``).
Stores that say they enforce conditions are trusted; an S3-compatible server is probed once
per mount (:class:`ConditionProbe`) for single PUTs, the only kind every server that honours
conditions honours (moto ignores them on multipart completion and copies), so multipart
uploads and copies are HEAD-checked there (``backends.base.check_version``). A conflict keeps
this mount's version under ``conflict_key`` next to the other writer's, never over it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from ..backends.base import Condition, ObjectStore, Upload
from ..errors import Conflict
from ..folders import NAME_MAX

log = logging.getLogger(__name__)

#: Longest key S3 and GCS accept, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


def conflict_key(key: str, when: float | None = None, limit: int = MAX_KEY_BYTES) -> str:
    """Where this mount's version of ``key`` goes when another writer changed ``key``: the
    name with a time stamp, its last segment shortened if the key would pass ``limit``
    bytes (or a component NAME_MAX)."""
    suffix = ".conflict-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    folder, sep, name = key.rpartition("/")
    room = min(NAME_MAX, limit - len(os.fsencode(folder + sep))) - len(suffix)
    raw = os.fsencode(name)
    if len(raw) > room:
        name = raw[:max(1, room)].decode("utf-8", "ignore")
    return f"{folder}{sep}{name}{suffix}"


def condition_for(expect: str | None) -> Condition:
    """The store condition for an expected version: "" absent, a version (not a weak "~"
    one, which is no ETag), or None for none."""
    if expect == "":
        return Condition(absent=True)
    if expect and not expect.startswith("~"):
        return Condition(version=expect)
    return Condition()


class ConditionProbe:
    """Does ``store`` itself enforce the condition of an upload? (Probed once, lazily.)"""

    def __init__(self, store: ObjectStore, scratch: Callable[[], str],
                 single_put_max: int) -> None:
        """``scratch()``: a private directory for the probe's file (asked only when probing:
        the staging area is made on first use); ``single_put_max``: the largest upload the
        store sends as one PUT."""
        self.store = store
        self.scratch = scratch
        self.single_put_max = single_put_max
        self._probed: bool | None = None
        self._lock = threading.Lock()

    def known(self, size: int, copies: bool) -> bool | None:
        """:meth:`enforced` if it needs no request (None: it may probe, in a thread)."""
        if self.store.enforces_conditions:
            return True
        if copies or size > self.single_put_max:
            return False
        return self._probed

    def enforced(self, size: int, copies: bool) -> bool:
        """Worker thread: does the store enforce the condition of an upload of ``size`` bytes
        (``copies``: with ranges copied server-side)?"""
        now = self.known(size, copies)
        if now is not None:
            return now
        with self._lock:
            if self._probed is None:
                self._probed = self._probe()
        return self._probed

    def _probe(self) -> bool:
        """Worker thread: put a probe object twice, both times only if absent: a server that
        refuses the second put (412) enforces conditions. The probe is deleted."""
        key = f".fusefs-probe-{uuid.uuid4().hex}"
        # the second put sends other bytes: a store that retries a refused put checks whether
        # the object already is what it sent (a lost answer), which must not be the case here
        other = os.path.join(self.scratch(), key)
        try:
            with open(other, "wb") as f:
                f.write(b"2")
            self.store.put_file(key, Upload(os.devnull, 0), condition=Condition(absent=True))
            try:
                self.store.put_file(key, Upload(other, 1), condition=Condition(absent=True))
            except Conflict:
                log.info("the store enforces conditional writes: no HEAD before uploads")
                return True
            log.info("the store ignores conditional writes: each upload is checked with a "
                     "HEAD first")
            return False
        except Exception as exc:  # noqa: BLE001 - then check with HEADs, as before
            log.info("could not probe conditional writes (%s): HEAD before each upload", exc)
            return False
        finally:
            with contextlib.suppress(Exception):
                self.store.delete(key)
            with contextlib.suppress(OSError):
                os.unlink(other)
