"""S3 writes: single and multipart uploads from a staged file, server-side copies, metadata.

Each request (a part, a completion, a copy) goes through the store's one retry loop; part
bodies are read from the staged file (or the base object) inside the worker that sends them,
so at most ``parts`` part bodies are in memory. A multipart upload that fails for any reason
is aborted before the error is raised (no incomplete upload is left to bill).

Conditions are sent as ``If-Match``/``If-None-Match: *`` on PutObject, CompleteMultipartUpload
and CopyObject; a 412 there is :class:`~fusefs.errors.Conflict`. A 412 may also be the answer
to a retry of a request whose first attempt did succeed (the answer was lost): before calling
it a conflict, a HEAD checks whether the object is exactly what was sent (its ETag).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import Conflict, FusefsError, NotFound, StaleVersion
from .attrs import decode as meta_decode
from .attrs import encode as meta_encode
from .attrs import merged as meta_merged
from .attrs import owner as meta_owner
from .attrs import rdev as meta_rdev
from .base import Attrs, Condition, ObjectInfo, Upload
from .s3_common import epoch, etag_version, is_weak, weak_version
from .upload_io import UploadSource, inside_copy, plan_parts, run_parts

if TYPE_CHECKING:
    from .s3 import S3Store

MiB = 1 << 20
GiB = 1 << 30
#: The smallest part S3 accepts (all parts but the last), and the most parts of one upload.
MIN_PART = 5 * MiB
MAX_PARTS = 10_000
#: Objects above this size are copied part by part (one CopyObject copies at most 5 GiB).
#: A module constant so that tests can lower it.
MULTIPART_COPY_ABOVE = 5 * GiB
#: Part size of a multipart copy (UploadPartCopy copies at most 5 GiB per part).
COPY_PART = 512 * MiB
#: Headers a metadata replacement keeps (CopyObject with REPLACE would drop them).
_KEPT_HEADERS = ("ContentType", "CacheControl", "ContentDisposition", "ContentEncoding",
                 "ContentLanguage")


def _quoted(version: str) -> str:
    return f'"{version}"'


def _conditions(store: S3Store, key: str, condition: Condition) -> dict[str, str]:
    """The request headers for ``condition``. A weak version (no ETag known) cannot be sent:
    it is checked with a HEAD here instead."""
    if condition.absent:
        return {"IfNoneMatch": "*"}
    if condition.version is None:
        return {}
    if is_weak(condition.version):
        try:
            if store.head(key).version != condition.version:
                raise Conflict(f"{store._name(key)}: changed")
        except NotFound:
            raise Conflict(f"{store._name(key)}: gone") from None
        return {}
    return {"IfMatch": _quoted(condition.version)}


def _landed(store: S3Store, key: str, expected_etag: str | None) -> Any:
    """The HEAD of ``key`` if it has ``expected_etag`` (what was just sent), else None."""
    if expected_etag is None:
        return None
    try:
        now = store._head_raw(key)
    except FusefsError:
        return None
    return now if str(now.get("ETag", "")).strip('"') == expected_etag else None


def _conditional(store: S3Store, key: str, expected_etag: str | None,
                 send: Callable[[], Any], *, completion: bool = False) -> Any:
    """``send()`` with a failed precondition (412) turned into Conflict, unless the object
    already is what was sent (``expected_etag``: a retried request whose first try worked;
    for a ``completion``, whose retry finds the upload gone: NoSuchUpload)."""
    try:
        return send()
    except StaleVersion as exc:
        now = _landed(store, key, expected_etag)
        if now is not None:
            return now
        raise Conflict(f"{store._name(key)}: {exc.message}", cause=exc) from exc
    except NotFound:
        now = _landed(store, key, expected_etag) if completion else None
        if now is not None:
            return now
        raise


def _multipart_etag(etags: list[str]) -> str | None:
    """The ETag S3 gives a multipart object of parts with these (MD5) ETags."""
    try:
        digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in etags),
                             usedforsecurity=False)
    except ValueError:
        return None
    return f"{digest.hexdigest()}-{len(etags)}"


def abort(store: S3Store, key: str, upload_id: str) -> None:
    """Abort a multipart upload a crash left behind (gone already: nothing to do)."""
    try:
        store._call(store._name(key), store._writer.abort_multipart_upload,
                    Bucket=store.bucket, Key=key, UploadId=upload_id)
    except NotFound:
        pass


def _abort(store: S3Store, key: str, upload_id: str) -> None:
    try:
        store._call(store._name(key), store._writer.abort_multipart_upload,
                    Bucket=store.bucket, Key=key, UploadId=upload_id)
    except FusefsError as exc:
        import logging

        logging.getLogger(__name__).warning(
            "%s: could not abort multipart upload: %s", store._name(key), exc.message)


def _multipart(
    store: S3Store, key: str, plan: list[tuple[int, int]],
    part: Callable[[str, int, int, int], str], create: dict[str, Any], cond: dict[str, str],
    check: Callable[[], None] | None = None,
    started: Callable[[str], None] | None = None,
) -> tuple[Any, str | None]:
    """Create a multipart upload, send every part of ``plan`` with ``part(upload_id, number,
    start, end)`` (parallel), run ``check()`` (it raises to refuse), complete it under
    ``cond``; aborted on any failure. The completion's answer and the ETag the object
    should have."""
    what = store._name(key)
    r = store._call(what, store._writer.create_multipart_upload,
                    Bucket=store.bucket, Key=key, **create)
    upload_id = r["UploadId"]
    try:
        if started is not None:
            started(upload_id)
        jobs = [functools.partial(part, upload_id, n, s, e) for n, (s, e) in enumerate(plan, 1)]
        etags = run_parts(store.parts, jobs)
        if check is not None:
            check()
        expected = _multipart_etag(etags)
        done = _conditional(store, key, expected, lambda: store._call(
            what, store._writer.complete_multipart_upload, Bucket=store.bucket, Key=key,
            UploadId=upload_id, MultipartUpload={"Parts": [
                {"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]}, **cond),
            completion=True)
    except BaseException:
        _abort(store, key, upload_id)
        raise
    return done, expected


def _copy_part(store: S3Store, key: str, src: str, version: str, upload_id: str, n: int,
               start: int, end: int) -> str:
    r = store._call(store._name(key), store._writer.upload_part_copy,
                    Bucket=store.bucket, Key=key, UploadId=upload_id, PartNumber=n,
                    CopySource={"Bucket": store.bucket, "Key": src},
                    CopySourceRange=f"bytes={start}-{end - 1}",
                    CopySourceIfMatch=_quoted(version))
    return str(r["CopyPartResult"]["ETag"])


def _base_unchanged(store: S3Store, key: str, version: str) -> Callable[[], None] | None:
    """Where the server may ignore ``x-amz-copy-source-if-match`` (rclone's does), a HEAD
    after the parts are copied: the source still has ``version``, so every copied part had
    it (an ETag names one content). None on AWS, which enforces it."""
    if store.enforces_conditions:
        return None

    def check() -> None:
        _source(store, key, version)

    return check


def put_file(store: S3Store, key: str, upload: Upload, condition: Condition,
             attrs: Attrs | None, progress: Callable[[int], None] | None) -> ObjectInfo:
    what = store._name(key)
    meta = meta_encode(attrs)
    cond = _conditions(store, key, condition)
    done_cb = progress or (lambda n: None)
    can_copy = bool(upload.copy) and bool(upload.base_version) and not is_weak(
        upload.base_version)
    with UploadSource(upload, store.get_range) as source:
        if upload.size <= store.part_size:
            body = source.read(0, upload.size)
            digest = hashlib.md5(body, usedforsecurity=False).digest()
            r = _conditional(store, key, digest.hex(),
                             lambda: store.put_object(key, body, digest, meta, cond))
            done_cb(len(body))
        else:
            def part(upload_id: str, n: int, start: int, end: int) -> str:
                if can_copy and end - start >= MIN_PART and inside_copy(upload, start, end):
                    etag = _copy_part(store, key, upload.base_key, upload.base_version,
                                      upload_id, n, start, end)
                else:
                    body = source.read(start, end)
                    etag = str(store._call(what, store._writer.upload_part, Bucket=store.bucket,
                                           Key=key, UploadId=upload_id, PartNumber=n,
                                           Body=body)["ETag"])
                done_cb(end - start)
                return etag

            plan = plan_parts(upload.size, max(store.part_size, MIN_PART), MAX_PARTS)
            r, _ = _multipart(store, key, plan, part, {"Metadata": meta}, cond,
                              _base_unchanged(store, upload.base_key, upload.base_version)
                              if can_copy else None, upload.started)
    mtime, mode = meta_decode(meta)
    uid, gid = meta_owner(meta)
    return ObjectInfo(key, upload.size, time.time(), etag_version(r.get("ETag", "")), mtime, mode,
                      None, uid, gid, meta_rdev(meta))


def _info_after(store: S3Store, key: str, size: int, r: Any, meta: dict[str, str] | None,
                etag: str) -> ObjectInfo:
    result = r.get("CopyObjectResult", r)
    mtime, mode = meta_decode(meta)
    uid, gid = meta_owner(meta)
    when = result.get("LastModified")
    return ObjectInfo(key, size, epoch(when) if when else time.time(),
                      etag_version(result.get("ETag", "") or etag), mtime, mode, None, uid, gid,
                      meta_rdev(meta))


def _source(store: S3Store, src: str, version: str) -> Any:
    """HEAD of the copy source, which must have ``version`` (StaleVersion; NotFound)."""
    r = store._head_raw(src)
    size = int(r["ContentLength"])
    now = etag_version(r.get("ETag", "")) or weak_version(size, r.get("LastModified"))
    if now != version:
        raise StaleVersion(f"{store._name(src)}: changed (version {now} != {version})")
    return r


def _server_copy(store: S3Store, src: str, version: str, dst: str, head: Any,
                 cond: dict[str, str], extra: dict[str, Any]) -> ObjectInfo:
    """CopyObject (or a multipart copy above MULTIPART_COPY_ABOVE) of ``src`` at ``version``
    to ``dst``; ``extra``: the metadata arguments (directive, metadata, headers)."""
    what = store._name(dst)
    size = int(head["ContentLength"])
    try:
        if size <= MULTIPART_COPY_ABOVE:
            r = _conditional(store, dst, None, lambda: store._call(
                what, store._writer.copy_object, Bucket=store.bucket, Key=dst,
                CopySource={"Bucket": store.bucket, "Key": src},
                CopySourceIfMatch=_quoted(version), **extra, **cond))
        else:
            create = {k: v for k, v in extra.items() if k != "MetadataDirective"}
            if "Metadata" not in create:
                create["Metadata"] = head.get("Metadata", {})
                for name in _KEPT_HEADERS:
                    if head.get(name):
                        create[name] = head[name]

            def part(upload_id: str, n: int, start: int, end: int) -> str:
                return _copy_part(store, dst, src, version, upload_id, n, start, end)

            plan = plan_parts(size, COPY_PART, MAX_PARTS)
            r, _ = _multipart(store, dst, plan, part, create, cond,
                              _base_unchanged(store, src, version))
    except Conflict:
        _source(store, src, version)  # the source changed (StaleVersion) or is gone (NotFound)
        raise
    meta = extra.get("Metadata", head.get("Metadata"))
    return _info_after(store, dst, size, r, meta, "")


def copy(store: S3Store, src: str, version: str, dst: str, condition: Condition) -> ObjectInfo:
    head = _source(store, src, version)
    cond = _conditions(store, dst, condition)
    return _server_copy(store, src, version, dst, head, cond, {})


def set_attrs(store: S3Store, key: str, version: str, attrs: Attrs) -> ObjectInfo:
    """A copy of the object onto itself with the metadata replaced (its other headers kept)."""
    try:
        head = _source(store, key, version)
    except StaleVersion as exc:
        raise Conflict(exc.message, cause=exc) from exc
    meta = meta_merged(head.get("Metadata"), attrs)
    extra: dict[str, Any] = {"MetadataDirective": "REPLACE", "Metadata": meta}
    for name in _KEPT_HEADERS:
        if head.get(name):
            extra[name] = head[name]
    try:
        return _server_copy(store, key, version, key, head, {}, extra)
    except StaleVersion as exc:
        raise Conflict(exc.message, cause=exc) from exc
