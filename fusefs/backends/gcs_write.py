"""GCS writes: simple and resumable uploads from a staged file, rewrites, metadata patches.

A file up to the part size is one upload (through the store's retry loop); a bigger one is one
resumable session in chunks of the part size (rounded up to 256 KiB), read from the staged file
(and the base object's copy ranges) as it is sent: one chunk in memory. The session's chunks
are retried and resumed by the library (a new session from the retry loop would send it all
again). Conditions are generation preconditions; a refused simple upload whose object already
has the MD5 of what was sent is a success (a retried request whose first try worked).
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, FusefsError, NotFound, StaleVersion
from .attrs import encode as meta_encode
from .attrs import merged as meta_merged
from .base import Attrs, Condition, ObjectInfo, Upload
from .gcs_common import map_gcs_error, object_info
from .upload_io import UploadReader, UploadSource

if TYPE_CHECKING:
    from .gcs import GCSStore

BINARY = "application/octet-stream"
#: Resumable upload chunks are multiples of this (the API's rule).
CHUNK_UNIT = 256 << 10


def _generation_match(store: GCSStore, key: str, condition: Condition) -> int | None:
    """``ifGenerationMatch`` for ``condition`` (a weak version is checked here)."""
    if condition.absent:
        return 0
    if condition.version is None:
        return None
    if condition.version.startswith("~"):
        try:
            if store.head(key).version != condition.version:
                raise Conflict(f"{store._name(key)}: changed")
        except NotFound:
            raise Conflict(f"{store._name(key)}: gone") from None
        return None
    try:
        return int(condition.version)
    except ValueError:
        raise Conflict(f"{store._name(key)}: {condition.version!r} is not a generation"
                       ) from None


def _conflict(store: GCSStore, key: str, exc: StaleVersion,
              landed: Callable[[Any], bool]) -> Any:
    """A failed precondition: the object as it now is if ``landed(blob)`` says it is what
    was sent (a retried request whose first try worked), else Conflict."""
    blob = store.bucket.blob(key)
    try:
        blob.reload(timeout=store._timeout, retry=None)
    except Exception:
        blob = None
    if blob is not None and landed(blob):
        return blob
    raise Conflict(f"{store._name(key)}: {exc.message}", cause=exc) from exc


def put_file(store: GCSStore, key: str, upload: Upload, condition: Condition,
             attrs: Attrs | None, progress: Callable[[int], None] | None) -> ObjectInfo:
    what = store._name(key)
    match = _generation_match(store, key, condition)
    meta = meta_encode(attrs) or None
    with UploadSource(upload, store.get_range) as source:
        if upload.size <= store.part_size:
            data = source.read(0, upload.size)
            blob = store.bucket.blob(key)
            blob.metadata = meta
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            try:
                store._call(what, lambda: blob.upload_from_string(
                    data, content_type=BINARY, if_generation_match=match,
                    timeout=store._patient_timeout, retry=None))
            except StaleVersion as exc:
                blob = _conflict(store, key, exc, lambda b: b.md5_hash == md5)
            if progress is not None:
                progress(len(data))
            return object_info(key, blob)
        chunk = -(-store.part_size // CHUNK_UNIT) * CHUNK_UNIT
        blob = store.bucket.blob(key, chunk_size=chunk)
        blob.metadata = meta
        reader = _Progress(UploadReader(source, chunk), progress)
        try:
            # One resumable session; its chunks are retried and resumed by the library
            # (a new session from our loop would send everything again).
            blob.upload_from_file(
                reader, size=upload.size, content_type=BINARY, if_generation_match=match,
                timeout=store._patient_timeout, retry=_resumable_retry())
        except FusefsError:
            raise  # from reading the base object (StaleVersion: it changed), never the upload
        except Exception as exc:
            err = map_gcs_error(exc, what)
            if isinstance(err, StaleVersion):
                raise Conflict(err.message, cause=exc) from exc
            raise err from exc
        return object_info(key, blob)


def copy(store: GCSStore, src: str, version: str, dst: str, condition: Condition) -> ObjectInfo:
    """A rewrite (looped until done: big objects take several calls), source generation
    pinned; metadata is copied with the object."""
    what = store._name(dst)
    match = _generation_match(store, dst, condition)
    if version.startswith("~"):
        current = store.head(src)
        if current.version != version:
            raise StaleVersion(f"{store._name(src)}: changed")
        version = current.version
    try:
        generation = int(version)
    except ValueError:
        raise StaleVersion(f"{store._name(src)}: {version!r} is not a generation") from None
    source = store.bucket.blob(src, generation=generation)
    target = store.bucket.blob(dst)
    token: str | None = None

    def rewrite() -> Any:
        return target.rewrite(source, token=token, if_generation_match=match,
                              if_source_generation_match=generation,
                              timeout=store._patient_timeout, retry=None)

    try:
        while True:
            token, _done, _total = store._call(what, rewrite)
            if token is None:
                break
    except (StaleVersion, NotFound) as exc:
        try:
            current = store.head(src)
        except NotFound:
            raise NotFound(f"{store._name(src)}: not found", cause=exc) from exc
        if current.version != version:
            raise StaleVersion(f"{store._name(src)}: changed", cause=exc) from exc
        if isinstance(exc, NotFound):
            raise
        raise Conflict(f"{what}: {exc.message}", cause=exc) from exc
    return object_info(dst, target)


def set_attrs(store: GCSStore, key: str, version: str, attrs: Attrs) -> ObjectInfo:
    """A metadata patch under ``ifGenerationMatch`` (the generation, and so the version,
    stays: the bytes did not change)."""
    what = store._name(key)
    blob = store.bucket.blob(key)
    store._call(what, lambda: blob.reload(timeout=store._timeout, retry=None))
    if object_info(key, blob).version != version:
        raise Conflict(f"{what}: changed")
    old = dict(blob.metadata or {})
    new = meta_merged(old, attrs)
    # a patch merges: a key to drop is sent as null
    blob.metadata = {**{k: None for k in old if k not in new}, **new}
    try:
        store._call(what, lambda: blob.patch(
            if_generation_match=int(version), timeout=store._timeout, retry=None))
    except StaleVersion as exc:
        raise Conflict(f"{what}: {exc.message}", cause=exc) from exc
    return object_info(key, blob)


def _resumable_retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY as GCS_RETRY

    return GCS_RETRY


class _Progress(io.RawIOBase):
    """A file object that reports each read's length to ``progress`` (as bytes are sent)."""

    def __init__(self, inner: UploadReader, progress: Callable[[int], None] | None) -> None:
        super().__init__()
        self._inner = inner
        self._progress = progress
        self._high = 0  # a rewound chunk is not counted twice

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        data = self._inner.read(size)
        end = self._inner.tell()
        if self._progress is not None and end > self._high:
            self._progress(end - self._high)
        self._high = max(self._high, end)
        return data
