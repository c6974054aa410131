"""The small, typed contract every object store implements.

Backends are synchronous (the SDKs are): the core calls them from worker threads. They raise
only :mod:`fusefs.errors` exceptions, translating SDK failures in their own module.
Keys are relative to the mounted root; :class:`PrefixedStore` adds a bucket prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object: its key, size, last-modified time (epoch seconds) and version.

    ``version`` is the ETag (S3), generation (GCS) or mtime/size/inode (local); cache keys
    carry it so a changed object never serves old bytes.
    """

    key: str
    size: int
    mtime: float
    version: str


@dataclass(slots=True)
class ListPage:
    """One page of a delimited listing: objects directly under the prefix, and sub-prefixes.

    ``prefixes`` end with ``/``; both lists hold full keys (relative to the store root).
    """

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket (or directory) of objects addressed by ``/``-separated keys."""

    #: Identifies the store in cache keys and stats: scheme, endpoint, bucket, prefix. No secrets.
    source_id: str

    def check(self) -> None:
        """Verify the bucket exists and is readable; raise NotFound/AccessDenied otherwise."""

    def head(self, key: str) -> ObjectInfo:
        """Metadata of one object; NotFound if absent."""

    def list(self, prefix: str, *, max_keys: int | None = None) -> Iterator[ListPage]:
        """Delimited listing of ``prefix`` (empty or ending in ``/``), all pages in order.

        With ``max_keys``, stop after about that many entries (used to probe for a directory).
        """

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        """Bytes ``[start, start+length)`` of the object at ``version``.

        Raises StaleVersion if the object no longer has that version, NotFound if it is gone.
        May return fewer bytes only at the end of the object.
        """

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` as the object ``key`` (replacing it); its new metadata."""

    def delete(self, key: str) -> None:
        """Remove the object ``key``; an absent object is not an error (as on S3)."""


class PrefixedStore:
    """Wraps a store so that keys are relative to ``prefix`` (``datasets/`` in s3://b/datasets)."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.source_id = inner.source_id + ("/" + self.prefix.rstrip("/") if self.prefix else "")

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) :]

    def check(self) -> None:
        self.inner.check()

    def head(self, key: str) -> ObjectInfo:
        info = self.inner.head(self.prefix + key)
        return ObjectInfo(key, info.size, info.mtime, info.version)

    def list(self, prefix: str, *, max_keys: int | None = None) -> Iterator[ListPage]:
        for page in self.inner.list(self.prefix + prefix, max_keys=max_keys):
            yield ListPage(
                [ObjectInfo(self._strip(o.key), o.size, o.mtime, o.version) for o in page.objects],
                [self._strip(p) for p in page.prefixes],
            )

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        return self.inner.get_range(self.prefix + key, start, length, version)

    def put(self, key: str, data: bytes) -> ObjectInfo:
        info = self.inner.put(self.prefix + key, data)
        return ObjectInfo(key, info.size, info.mtime, info.version)

    def delete(self, key: str) -> None:
        self.inner.delete(self.prefix + key)
