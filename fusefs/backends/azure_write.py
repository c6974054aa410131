"""Azure Blob writes: staged blocks from a staged file, server-side copies, metadata.

A file up to the part size is one Put Blob; a bigger one is staged as blocks of the part size
(``parts`` at once, each read inside its worker: at most ``parts`` blocks in memory), then
committed with one Put Block List carrying the metadata and the condition. Block ids carry a
random prefix per upload, so two uploads to one blob never mix blocks; blocks of an upload
that fails are never committed, and Azure drops them after a week (there is nothing to abort).

Conditions are ``If-Match`` (the ETag) and ``If-None-Match: *``; a refusal is Conflict unless
the blob already is what was sent (a retried request whose first try worked: the same MD5 for
a Put Blob, the same committed block ids for a block list). Requests are retried by the SDK's
pipeline, as the store's reads are.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core import exceptions as aexc
from azure.storage.blob import BlobBlock

from ..errors import BackendError, Conflict, NotFound, StaleVersion
from .attrs import decode as meta_decode
from .attrs import encode as meta_encode
from .attrs import merged as meta_merged
from .attrs import owner as meta_owner
from .attrs import rdev as meta_rdev
from .azure_common import epoch, etag_version, map_azure_error
from .base import Attrs, Condition, ObjectInfo, Upload
from .upload_io import UploadSource, plan_parts, run_parts

if TYPE_CHECKING:
    from .azure import AzureStore

#: The most blocks of one blob.
MAX_BLOCKS = 50_000
#: How long a server-side copy is waited for, and how often its state is asked.
COPY_TIMEOUT = 3600.0
_COPY_POLL = (0.05, 2.0)


def _conditions(condition: Condition) -> dict[str, Any]:
    if condition.absent:
        return {"match_condition": MatchConditions.IfMissing}  # If-None-Match: * (no etag)
    if condition.version is not None:
        return {"etag": f'"{condition.version}"',
                "match_condition": MatchConditions.IfNotModified}
    return {}


def _refused(exc: BaseException) -> bool:
    """A failed condition: 412 ConditionNotMet, or 409 BlobAlreadyExists (If-None-Match)."""
    status = getattr(exc, "status_code", None)
    code = str(getattr(getattr(exc, "error_code", None), "value", getattr(exc, "error_code", "")))
    return status == 412 or code in ("ConditionNotMet", "BlobAlreadyExists",
                                     "TargetConditionNotMet")


def _info(store: AzureStore, key: str, size: int, r: Any, meta: dict[str, str] | None
          ) -> ObjectInfo:
    mtime, mode = meta_decode(meta)
    uid, gid = meta_owner(meta)
    when = r.get("last_modified")
    return ObjectInfo(key, size, epoch(when) if when else time.time(),
                      etag_version(r.get("etag")), mtime, mode, None, uid, gid,
                      meta_rdev(meta))


def put_file(store: AzureStore, key: str, upload: Upload, condition: Condition,
             attrs: Attrs | None, progress: Callable[[int], None] | None) -> ObjectInfo:
    what = store._name(key)
    blob = store.client.get_blob_client(key)
    meta = meta_encode(attrs)
    cond = _conditions(condition)
    done = progress or (lambda n: None)
    with UploadSource(upload, store.get_range) as source:
        if upload.size <= store.part_size:
            data = source.read(0, upload.size)
            md5 = hashlib.md5(data, usedforsecurity=False).digest()
            try:
                r = blob.upload_blob(data, overwrite=True, metadata=meta, max_concurrency=1,
                                     **cond)
            except Exception as exc:
                if not _refused(exc):
                    raise map_azure_error(exc, what) from exc
                props = _props(blob)
                if props is None or bytes(props.content_settings.content_md5 or b"") != md5:
                    raise Conflict(f"{what}: {map_azure_error(exc, what).message}",
                                   cause=exc) from exc
                r = {"etag": props.etag, "last_modified": props.last_modified}
            done(len(data))
            return _info(store, key, upload.size, r, meta)

        prefix = uuid.uuid4().hex
        plan = plan_parts(upload.size, store.part_size, MAX_BLOCKS)
        ids = [base64.b64encode(f"{prefix}-{n:06d}".encode()).decode()
               for n in range(len(plan))]

        def stage(n: int) -> str:
            start, end = plan[n]
            data = source.read(start, end)
            try:
                blob.stage_block(ids[n], data, length=len(data))
            except Exception as exc:
                raise map_azure_error(exc, what) from exc
            done(end - start)
            return ids[n]

        jobs = [(lambda n=n: stage(n)) for n in range(len(plan))]
        run_parts(store.parts, jobs)
        try:
            r = blob.commit_block_list([BlobBlock(block_id=i) for i in ids], metadata=meta,
                                       **cond)
        except Exception as exc:
            if not _refused(exc):
                raise map_azure_error(exc, what) from exc
            committed = _committed(blob)
            if committed != ids:
                raise Conflict(f"{what}: {map_azure_error(exc, what).message}",
                               cause=exc) from exc
            props = _props(blob)
            r = {"etag": getattr(props, "etag", ""),
                 "last_modified": getattr(props, "last_modified", None)}
        return _info(store, key, upload.size, r, meta)


def _props(blob: Any) -> Any:
    try:
        return blob.get_blob_properties()
    except Exception:
        return None


def _committed(blob: Any) -> list[str] | None:
    try:
        committed, _ = blob.get_block_list("committed")
    except Exception:
        return None
    return [b.id for b in committed]


def _source(store: AzureStore, src: str, version: str) -> Any:
    """Properties of ``src``, which must have ``version`` (StaleVersion; NotFound)."""
    try:
        props = store.client.get_blob_client(src).get_blob_properties()
    except Exception as exc:
        raise map_azure_error(exc, store._name(src)) from exc
    if etag_version(props.etag) != version:
        raise StaleVersion(f"{store._name(src)}: changed")
    return props


def copy(store: AzureStore, src: str, version: str, dst: str, condition: Condition
         ) -> ObjectInfo:
    """Copy Blob within the account (metadata copied with it; the source's ETag pinned),
    then its state polled until it is done: within one account it usually already is."""
    what = store._name(dst)
    props = _source(store, src, version)
    base, query = store._blob_url
    source_url = base + _quote(src) + query
    target = store.client.get_blob_client(dst)
    try:
        r = target.start_copy_from_url(
            source_url, source_etag=f'"{version}"',
            source_match_condition=MatchConditions.IfNotModified, **_conditions(condition))
    except Exception as exc:
        if isinstance(exc, aexc.ResourceNotFoundError):
            raise NotFound(f"{store._name(src)}: not found", cause=exc) from exc
        if not _refused(exc):
            raise map_azure_error(exc, what) from exc
        _source(store, src, version)  # the source changed (StaleVersion) or is gone
        raise Conflict(f"{what}: {map_azure_error(exc, what).message}", cause=exc) from exc
    status = r.get("copy_status")
    deadline = time.monotonic() + COPY_TIMEOUT
    wait = _COPY_POLL[0]
    while status == "pending":
        if time.monotonic() > deadline:
            raise BackendError(f"{what}: copy still pending after {COPY_TIMEOUT:.0f}s")
        time.sleep(wait)
        wait = min(wait * 2, _COPY_POLL[1])
        try:
            now = target.get_blob_properties()
        except Exception as exc:
            raise map_azure_error(exc, what) from exc
        status = now.copy.status
        r = {"etag": now.etag, "last_modified": now.last_modified}
    if status != "success":
        raise BackendError(f"{what}: copy {status}")
    return _info(store, dst, int(props.size or 0), r, dict(props.metadata or {}))


def _quote(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="~/")


def set_attrs(store: AzureStore, key: str, version: str, attrs: Attrs) -> ObjectInfo:
    """Set Blob Metadata under ``If-Match`` (it replaces the whole set: the others are kept
    by sending them again). The ETag changes."""
    what = store._name(key)
    try:
        props = _source(store, key, version)
    except StaleVersion as exc:
        raise Conflict(exc.message, cause=exc) from exc
    meta = meta_merged(props.metadata, attrs)
    try:
        r = store.client.get_blob_client(key).set_blob_metadata(
            meta, etag=f'"{version}"', match_condition=MatchConditions.IfNotModified)
    except Exception as exc:
        err = map_azure_error(exc, what)
        if _refused(exc) or isinstance(err, NotFound):
            raise Conflict(err.message, cause=exc) from exc
        raise err from exc
    return _info(store, key, int(props.size or 0), r, meta)
