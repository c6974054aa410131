"""The small, typed contract every object store implements.

Backends are synchronous (the SDKs are): the core calls them from worker threads. They raise
only :mod:`fusefs.errors` exceptions, translating SDK failures in their own module.
Keys are relative to the mounted root; :class:`PrefixedStore` adds a bucket prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import NotFound


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object: its key, size, last-modified time (epoch seconds) and version.

    ``version`` is the ETag (S3), generation (GCS) or mtime/size/inode/ctime (local); cache keys
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
    #: The listing goes on after this page (the store said it was truncated).
    more: bool = False


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket (or directory) of objects addressed by ``/``-separated keys."""

    #: Identifies the store in cache keys and stats: scheme, endpoint, bucket, prefix. No secrets.
    source_id: str

    def check(self) -> None:
        """Verify the bucket exists and is readable; raise NotFound/AccessDenied otherwise."""

    def head(self, key: str) -> ObjectInfo:
        """Metadata of one object; NotFound if absent."""

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        """Delimited listing of ``prefix`` (empty or ending in ``/``), all pages in order.

        Objects and sub-prefixes come in key order (UTF-8 byte order, which is code point
        order). ``start_after``: only keys greater than this full key (S3 ``StartAfter``).
        With ``max_keys``, stop after about that many entries; the last page's ``more`` then
        says whether the listing would have gone on.
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
        self.lists_after: bool = getattr(inner, "lists_after", True)

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) :]

    def check(self) -> None:
        """List the prefix, not the bucket root: a policy may allow only ``prefix/``."""
        try:
            next(iter(self.inner.list(self.prefix, max_keys=1)), None)
        except NotFound:
            self.inner.check()  # a missing bucket: the store's own message says so
            raise

    def head(self, key: str) -> ObjectInfo:
        info = self.inner.head(self.prefix + key)
        return ObjectInfo(key, info.size, info.mtime, info.version)

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        after = self.prefix + start_after if start_after else ""
        for page in self.inner.list(self.prefix + prefix, max_keys=max_keys, start_after=after):
            yield ListPage(
                [ObjectInfo(self._strip(o.key), o.size, o.mtime, o.version) for o in page.objects],
                [self._strip(p) for p in page.prefixes],
                page.more,
            )

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        return self.inner.get_range(self.prefix + key, start, length, version)

    def put(self, key: str, data: bytes) -> ObjectInfo:
        info = self.inner.put(self.prefix + key, data)
        return ObjectInfo(key, info.size, info.mtime, info.version)

    def delete(self, key: str) -> None:
        self.inner.delete(self.prefix + key)
