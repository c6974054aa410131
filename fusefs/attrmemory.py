"""Attributes (``mtime``, ``mode`` metadata) this mount knows for object versions that
listings show without them.

S3 listings carry no user metadata, so a file's ``mtime``/``mode`` kept in metadata
(``touch``, ``cp -p``, ``rsync -a``, ``tar x``) would otherwise show only after a HEAD. The
mount remembers them for each (key, version) it wrote or read them for, applies them to listed
objects of the same version (a new version has its own, or none), and keeps them across
remounts in the staging directory (``attrs.json``), so ``rsync -a`` on a second run (same
machine, same cache) transfers nothing. Another machine's mount sees the store's
``LastModified`` for files it never HEADed (see the README).

Bounded: ``MAX_ENTRIES`` (least recently remembered dropped first). Safe from any thread (one
dict operation each, under the GIL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections import OrderedDict

from .backends.base import ObjectInfo

log = logging.getLogger(__name__)

MAX_ENTRIES = 200_000


class AttrMemory:
    def __init__(self, path: str | None = None) -> None:
        self.path = path
        #: key -> (version, mtime, mode, uid, gid, rdev)
        self._d: OrderedDict[str, tuple[str, float | None, int | None, int | None,
                                        int | None, int | None]] = OrderedDict()
        if path:
            self._load(path)

    def remember(self, info: ObjectInfo, *, checked: bool = False) -> None:
        """Keep ``info``'s attributes for its version; ``checked``: also when it has none
        (a HEAD said so: :meth:`known` then spares the next HEAD)."""
        if (info.meta_mtime is None and info.mode is None and info.uid is None
                and info.gid is None and not checked):
            return
        self._d[info.key] = (info.version, info.meta_mtime, info.mode, info.uid, info.gid,
                             info.rdev)
        self._d.move_to_end(info.key)
        while len(self._d) > MAX_ENTRIES:
            self._d.popitem(last=False)

    def known(self, info: ObjectInfo) -> bool:
        """Are the attributes of this version of ``info.key`` known (maybe none)?"""
        got = self._d.get(info.key)
        return got is not None and got[0] == info.version

    def apply(self, info: ObjectInfo) -> ObjectInfo:
        """``info`` with the remembered attributes of its version, if it lacks them."""
        if info.meta_mtime is not None or info.mode is not None or not self._d:
            return info
        got = self._d.get(info.key)
        if got is None or got[0] != info.version:
            return info
        return dataclasses.replace(info, meta_mtime=got[1], mode=got[2], uid=got[3],
                                   gid=got[4], rdev=got[5])

    def save(self) -> None:
        if not self.path or (not self._d and not os.path.exists(self.path)):
            return
        tmp = self.path + ".tmp"
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as f:
                json.dump([[k, *v] for k, v in self._d.items()], f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not save remembered attributes to %s: %s", self.path,
                        exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                rows = json.load(f)
            for key, version, mtime, mode, *more in rows:  # no owner: an older file
                uid, gid, rdev = (more + [None, None, None])[:3]
                self._d[str(key)] = (str(version), mtime, mode, uid, gid, rdev)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            self._d.clear()
