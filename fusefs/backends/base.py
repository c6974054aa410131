"""The small, typed contract every object store implements.

Backends are synchronous (the SDKs are): the core calls them from worker threads. They raise
only :mod:`fusefs.errors` exceptions, translating SDK failures in their own module.
Keys are relative to the mounted root; :class:`PrefixedStore` adds a bucket prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import Conflict, NotFound
from ..safety import check_key


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
    #: What a writer kept in the object's metadata (rclone/s3fs ``mtime`` and ``mode``), when
    #: the answer carried it (HEAD always; GCS and Azure listings too; S3 listings never).
    #: ``mode`` holds permission bits (``& 0o777``: never setuid, setgid or sticky), plus the
    #: file type when it is not a regular file (``S_IFLNK``...: see ``attrs.SPECIAL_TYPES``).
    meta_mtime: float | None = None
    mode: int | None = None
    #: The upload token a fusefs mount wrote with the object (``fusefs_upload`` metadata), when
    #: the answer carried metadata: tells an upload that landed from another writer's object.
    token: str | None = None
    #: Owner and group kept in metadata (s3fs's ``uid``/``gid``; a local file's own when it
    #: is not the mounting user's); None: the mount's ``--uid``/``--gid``.
    uid: int | None = None
    gid: int | None = None
    #: A device node's device number (s3fs's ``rdev``), None for anything else.
    rdev: int | None = None


@dataclass(frozen=True, slots=True)
class Attrs:
    """File attributes kept in object metadata: ``mtime`` (epoch seconds) and ``mode``
    (permission bits, and the file type of a link, FIFO, socket or device node). Stored as
    rclone does (``mtime`` float seconds, ``mode`` octal with a leading 0, e.g. ``0100644``)
    and read back also in s3fs's (decimal ``mode``, integer ``mtime``) and gcsfuse's
    (``gcsfuse_mtime`` RFC 3339) forms."""

    mtime: float | None = None
    mode: int | None = None
    #: A token unique to one upload (see ``ObjectInfo.token``); None: none written.
    token: str | None = None
    #: Owner and group (s3fs's ``uid``/``gid`` metadata, decimal); None: none written.
    uid: int | None = None
    gid: int | None = None
    #: A device node's device number (s3fs's ``rdev``, decimal); None: none written.
    rdev: int | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    """What the object must be for a write to go ahead; otherwise the store raises
    :class:`~fusefs.errors.Conflict` and changes nothing.

    ``version``: it must currently have this version (S3 ``If-Match``, GCS
    ``ifGenerationMatch``, Azure ``If-Match``). ``absent``: it must not exist (S3
    ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure ``If-None-Match: *``). Neither:
    unconditional."""

    version: str | None = None
    absent: bool = False


@dataclass(frozen=True, slots=True)
class Upload:
    """The new content of an object: ``size`` bytes, read from the local file ``path`` at the
    same offsets, except in the ``copy`` ranges (sorted, disjoint ``(start, end)``), which hold
    the same bytes as object ``base_key`` at ``base_version`` at the same offsets and are NOT in
    the file (it may have holes there). A store that can copy ranges server-side (S3
    ``UploadPartCopy``) copies whole parts that lie inside a copy range and reads the rest of a
    part's copy bytes with :meth:`ObjectStore.get_range`; others read them with ``get_range``.
    Memory stays bounded by (part size x parallel parts) whatever ``size`` is."""

    path: str
    size: int
    copy: tuple[tuple[int, int], ...] = ()
    base_key: str = ""
    base_version: str = ""
    #: ``read_base(start, length)``: bytes of the base object for copy ranges the store does
    #: not copy server-side (the mount reads them through its block cache, from any thread);
    #: None: the store's own ``get_range`` at ``base_version``.
    read_base: Callable[[int, int], bytes] | None = None
    #: ``started(upload_id)``: called once a multipart upload exists (S3), before any part
    #: is sent, so the caller can journal it and abort it after a crash.
    started: Callable[[str], None] | None = None


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

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        """Remove the object ``key``; an absent object is not an error (as on S3). With a
        ``condition`` (``version`` only), Conflict if the object has another version (and
        nothing is deleted); stores that may ignore it say so (``enforces_conditions``)."""

    # --- writes (the staged-upload path) -------------------------------------------------

    #: True when the store itself enforces a :class:`Condition` atomically (AWS S3, GCS,
    #: Azure, local); False for S3-compatible servers that may ignore the headers, for which
    #: the caller checks with a HEAD first (and still sends the headers).
    enforces_conditions: bool

    def put_file(
        self, key: str, upload: Upload, *, condition: Condition = Condition(),
        attrs: Attrs | None = None, progress: Callable[[int], None] | None = None,
    ) -> ObjectInfo:
        """Store ``upload`` as the object ``key`` with ``attrs`` in its metadata, if
        ``condition`` holds (else Conflict, nothing changed); its new metadata.

        Big uploads are parallel multipart (S3), resumable (GCS) or staged blocks (Azure),
        streamed from the file; an incomplete multipart upload is aborted on failure.
        ``progress(n)`` is called as ``n`` more bytes have been sent (from worker threads;
        bytes copied server-side count as sent). StaleVersion (or NotFound): the base
        object no longer has ``base_version``, nothing changed. The returned ``mtime`` may
        be the local clock's (S3 answers no Last-Modified); ``version`` is exact.
        """

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        """Server-side copy of ``src`` at ``version`` (StaleVersion if it has another, NotFound
        if gone) to ``dst``, keeping its metadata, if ``condition`` holds for ``dst``; the new
        object's metadata. Multipart copy above 5 GiB on S3; GCS rewrite."""

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        """Replace the ``mtime``/``mode``/``uid``/``gid`` metadata of ``key`` at ``version``
        (Conflict if it has another; a field left None is kept); its metadata afterwards.
        The version may change (Azure: a new ETag; local: the ctime moves; S3: a copy in
        place, a new ETag for a multipart object; GCS and a single-part S3 object keep it);
        the bytes never do."""


class PrefixedStore:
    """Wraps a store so that keys are relative to ``prefix`` (``datasets/`` in s3://b/datasets),
    and so that no request is ever made for a key that is not clean (:func:`check_key`: an
    HTTP library would turn ``a/../../b`` into ``b``, outside the prefix). Every mount's store
    is one (``prefix`` "" for a whole bucket)."""

    def __init__(self, inner: ObjectStore, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.source_id = inner.source_id + ("/" + self.prefix.rstrip("/") if self.prefix else "")
        self.lists_after: bool = getattr(inner, "lists_after", True)
        #: listings carry each object's metadata (GCS, Azure, local); S3's never do
        self.lists_metadata: bool = getattr(inner, "lists_metadata", True)
        #: the store has ``get_small`` (S3): a small object's metadata and bytes in one GET
        self.gets_small: bool = hasattr(inner, "get_small")
        #: links must not lead out of the source (local sources)
        self.links_inside: bool = getattr(inner, "links_inside", False)
        #: folders are directories (local sources): a marker is never listed as an object
        self.folders_are_dirs: bool = getattr(inner, "folders_are_dirs", False)
        self.enforces_conditions: bool = getattr(inner, "enforces_conditions", True)
        self.enforces_delete_conditions: bool = getattr(
            inner, "enforces_delete_conditions", self.enforces_conditions)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) :]

    def check(self) -> None:
        """List the prefix, not the bucket root: a policy may allow only ``prefix/``."""
        if not self.prefix:
            self.inner.check()
            return
        try:
            next(iter(self.inner.list(self.prefix, max_keys=1)), None)
        except NotFound:
            self.inner.check()  # a missing bucket: the store's own message says so
            raise

    def _rekey(self, info: ObjectInfo, key: str) -> ObjectInfo:
        if not self.prefix:
            return info
        return dataclasses.replace(info, key=key)

    def head(self, key: str) -> ObjectInfo:
        return self._rekey(self.inner.head(self._key(key)), key)

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        after = self.prefix + start_after if start_after else ""
        pages = self.inner.list(self._key(prefix), max_keys=max_keys, start_after=after)
        if not self.prefix:
            yield from pages
            return
        for page in pages:
            yield ListPage(
                [self._rekey(o, self._strip(o.key)) for o in page.objects],
                [self._strip(p) for p in page.prefixes],
                page.more,
            )

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        return self.inner.get_range(self._key(key), start, length, version)

    def put(self, key: str, data: bytes) -> ObjectInfo:
        return self._rekey(self.inner.put(self._key(key), data), key)

    def get_small(self, key: str, version: str, size: int | None = None
                  ) -> tuple[ObjectInfo, bytes]:
        """See ``S3Store.get_small`` (only when ``gets_small``)."""
        info, data = self.inner.get_small(  # type: ignore[attr-defined]
            self._key(key), version, size)
        return self._rekey(info, key), data

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        self.inner.delete(self._key(key), condition=condition)

    def put_file(
        self, key: str, upload: Upload, *, condition: Condition = Condition(),
        attrs: Attrs | None = None, progress: Callable[[int], None] | None = None,
    ) -> ObjectInfo:
        if upload.base_key:
            upload = dataclasses.replace(upload, base_key=self._key(upload.base_key))
        info = self.inner.put_file(self._key(key), upload, condition=condition, attrs=attrs,
                                   progress=progress)
        return self._rekey(info, key)

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        info = self.inner.copy(self._key(src), version, self._key(dst), condition=condition)
        return self._rekey(info, dst)

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        return self._rekey(self.inner.set_attrs(self._key(key), version, attrs), key)

    def abort_upload(self, key: str, upload_id: str) -> None:
        abort = getattr(self.inner, "abort_upload", None)
        if abort is not None:
            abort(self._key(key), upload_id)


def check_version(store: ObjectStore, key: str, expect: str) -> None:
    """Raise Conflict unless ``key`` is at version ``expect`` ("": absent), by a HEAD: the
    check before an upload to a store that may ignore conditional requests."""
    try:
        now = store.head(key).version
    except NotFound:
        now = ""
    if now != expect:
        raise Conflict(f"{key}: changed in the store since this mount saw it")
