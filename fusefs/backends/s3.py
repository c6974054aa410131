"""Amazon S3 and S3-compatible stores through boto3.

Every call goes through the one retry loop (:mod:`.retry`), boto3's own retries are off. A GET
is one attempt only when its whole body arrived, of the right length, for the right range (and,
for a whole object with an MD5 ETag, with the right MD5); a body cut short, reset or stalled for
``stall_timeout`` (the socket read timeout) is a transient failure, retried on a new request.
An object listed without an ETag gets a weak version from its size and last-modified second
(``~SIZE-SECONDS``): no ``If-Match`` is sent for it, and each answer's size and Last-Modified
are checked against it instead.

Parts: :class:`S3Store` (the one store class) here; versions and error mapping in
:mod:`.s3_common`; the signed fast path for GETs and small PUTs in :mod:`.s3_fast`; uploads,
copies and metadata changes in :mod:`.s3_write`. Imports go one way: store -> write -> common.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import botocore.session
from botocore.config import Config

from ..errors import (
    Conflict,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)
from ..safety import redact_url
from .attrs import decode as meta_decode
from .attrs import owner as meta_owner
from .attrs import rdev as meta_rdev
from .attrs import token as meta_token
from .base import Attrs, Condition, ListPage, ObjectInfo, Upload
from .retry import DEFAULT_RETRY, RetryPolicy
from .s3_common import epoch, etag_version, is_weak, map_s3_error, weak_version
from .s3_fast import FastAnswer, FastPath, SigV4
from .s3_write import abort as write_abort
from .s3_write import copy as write_copy
from .s3_write import put_file as write_put_file
from .s3_write import set_attrs as write_set_attrs
from .verify import Md5Etag, object_total, refuse_whole, take_range

# SigV4 and the version helpers are imported from here by tests and tools
__all__ = ["S3Store", "SigV4", "epoch", "etag_version", "is_weak", "map_s3_error", "weak_version"]

T = TypeVar("T")

log = logging.getLogger(__name__)


def _is_aws(endpoint_url: str | None) -> bool:
    """True for AWS itself (no endpoint, or an ``*.amazonaws.com`` one: a region, FIPS or
    VPC endpoint), which enforces conditional writes; False for any other server."""
    if not endpoint_url:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


#: Read timeout of a listing's retries: a big prefix (or many delete markers) may take a server
#: a while before its first byte; the first attempt has the stall timeout, as everything.
LIST_TIMEOUT = 10.0
#: Read timeout of writes (a part, a completion, a copy): the server answers only once it has
#: stored the body, or copied or assembled the parts, which on a busy S3-compatible server takes
#: far longer than the stall timeout of a GET (each part then failed every attempt).
WRITE_TIMEOUT = 60.0


class S3Store:
    """One S3 bucket. Path-style addressing is used whenever an endpoint URL is given.

    Writes (see :mod:`.s3_write`): one PutObject up to ``part_size``, else a multipart upload
    of ``parts`` parts at once. Conditions are enforced by AWS itself; a custom endpoint's
    server may ignore them (``enforces_conditions`` False: the caller checks with a HEAD).
    """

    #: ListObjectsV2 carries no user metadata: a link's ``mode`` is only seen by a HEAD
    lists_metadata = False

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_connections: int = 48,
        stall_timeout: float = 2.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        part_size: int = 8 << 20,
        parts: int = 8,
    ) -> None:
        self.bucket = bucket
        # never the endpoint's user info: the id is in logs, stats and the cache index
        self.source_id = (f"s3://{bucket}" if not endpoint_url
                          else f"s3+{redact_url(endpoint_url)}/{bucket}")
        self.enforces_conditions = _is_aws(endpoint_url)
        self.part_size = part_size
        self.parts = parts
        self._retry = retry
        self._md5 = Md5Etag()
        config = Config(
            max_pool_connections=max_connections,
            retries={"mode": "standard", "total_max_attempts": 1},  # ours: see .retry
            connect_timeout=max(stall_timeout, 10.0),
            read_timeout=stall_timeout,  # a response making no progress this long is abandoned
            # Many S3-compatible servers do not handle the new default checksums as AWS does.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        try:
            core = botocore.session.get_session()
            # botocore parses every timestamp of every response with dateutil (8% of a GET's
            # CPU, and of each listed object's); keep them as text, parse only what we use
            core.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=str
            )
            session = boto3.session.Session(
                botocore_session=core, profile_name=profile, region_name=region
            )
            self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
            self._patient: Any = session.client(  # for retried listings
                "s3",
                endpoint_url=endpoint_url,
                config=config.merge(Config(read_timeout=max(stall_timeout, LIST_TIMEOUT))),
            )
            self._writer: Any = session.client(  # uploads, completions, copies (s3_write)
                "s3",
                endpoint_url=endpoint_url,
                config=config.merge(Config(read_timeout=max(stall_timeout, WRITE_TIMEOUT))),
            )
        except Exception as exc:  # ProfileNotFound and friends
            raise map_s3_error(exc, f"s3://{bucket}") from exc
        self._fast = FastPath(self.client, [self.client, self._patient],
                               session.get_credentials(), self._writer)

    def _name(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """``fn(**kwargs)`` (a boto3 call) with errors mapped, retried while transient."""

        def once() -> T:
            try:
                return fn(**kwargs)
            except FusefsError:
                raise
            except Exception as exc:
                raise map_s3_error(exc, what) from exc

        return self._retry.call(once, what)

    def _list_call(self, what: str, **kwargs: Any) -> Any:
        """One ListObjectsV2, retried; retries wait longer for the first byte (LIST_TIMEOUT)."""
        attempts = itertools.count()

        def list_objects_v2(**kw: Any) -> Any:
            return (self.client if next(attempts) == 0 else self._patient).list_objects_v2(**kw)

        return self._call(what, list_objects_v2, **kwargs)

    def check(self) -> None:
        try:
            self._list_call(f"s3://{self.bucket}", Bucket=self.bucket, MaxKeys=1)
        except NotFound as exc:
            raise NotFound(f"bucket s3://{self.bucket} does not exist", cause=exc) from exc

    def _head_raw(self, key: str) -> Any:
        """The HeadObject answer (retried; NotFound if absent)."""
        return self._call(self._name(key), self.client.head_object, Bucket=self.bucket, Key=key)

    def head(self, key: str) -> ObjectInfo:
        r = self._head_raw(key)
        size = int(r["ContentLength"])
        etag = etag_version(r.get("ETag", ""))
        version = etag or weak_version(size, r.get("LastModified"))
        mtime, mode = meta_decode(r.get("Metadata"))
        return ObjectInfo(key, size, epoch(r.get("LastModified", "")), version, mtime, mode,
                          meta_token(r.get("Metadata")), *meta_owner(r.get("Metadata")),
                          meta_rdev(r.get("Metadata")))

    def get_small(self, key: str, version: str, size: int | None = None
                  ) -> tuple[ObjectInfo, bytes]:
        """One GET of a whole small object at ``version``: its metadata (what a HEAD tells:
        a listed object's type, see :mod:`fusefs.kinds`, its mode, owner and mtime) and its
        bytes (what a read fetches next). StaleVersion (or Conflict) if it has another
        version by now. ``size`` (listed): sent on the fast path (no boto3, as block fetches
        are), checked as a block fetch is."""
        what = self._name(key)
        if (self._fast.enabled and size is not None and size > 0 and version
                and not is_weak(version)):
            got = self._retry.call(lambda: self._get_small_fast(what, key, version, size), what)
            if got is not None:
                return got
        cond = {"IfMatch": f'"{version}"'} if version and not is_weak(version) else {}
        r = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key, **cond)
        try:
            body: bytes = r["Body"].read()
        except Exception as exc:  # a body cut short
            raise map_s3_error(exc, what) from exc
        etag = etag_version(r.get("ETag", ""))
        if cond and etag and etag != version:
            raise StaleVersion(f"{what}: changed (ETag {etag} != {version})")
        mtime, mode = meta_decode(r.get("Metadata"))
        return ObjectInfo(key, int(r["ContentLength"]), epoch(r.get("LastModified", "")),
                          etag or version, mtime, mode, meta_token(r.get("Metadata")),
                          *meta_owner(r.get("Metadata")),
                          meta_rdev(r.get("Metadata"))), body

    def _get_small_fast(self, what: str, key: str, version: str, size: int
                        ) -> tuple[ObjectInfo, bytes] | None:
        """:meth:`get_small` on the fast path; None: ask boto3 (no listing seen yet, or an
        answer whose exact error boto3 gives)."""
        answer = self._fast.get(what, key, 0, size, version)
        if answer is None:
            return None
        if answer.status == 412:
            raise StaleVersion(f"{what}: changed (If-Match {version} failed)")
        if answer.status >= 500 or answer.status in (408, 429):
            raise TransientError(f"{what}: HTTP {answer.status}")
        if answer.status not in (200, 206):
            return None
        body = self._accept(what, 0, size, version, answer)
        meta = {k[len("x-amz-meta-"):]: v for k, v in answer.headers.items()
                if k.startswith("x-amz-meta-")}
        mtime, mode = meta_decode(meta)
        etag = etag_version(answer.headers.get("etag", ""))
        return ObjectInfo(key, size, epoch(answer.headers.get("last-modified", "")),
                          etag or version, mtime, mode, meta_token(meta),
                          *meta_owner(meta), meta_rdev(meta)), body

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        if max_keys:
            kwargs["MaxKeys"] = max_keys
        if start_after:
            kwargs["StartAfter"] = start_after
        seen = 0
        while True:
            r = self._list_call(self._name(prefix), **kwargs)
            page = ListPage([self._listed(o) for o in r.get("Contents", ())],
                            [p["Prefix"] for p in r.get("CommonPrefixes", ())],
                            bool(r.get("IsTruncated")))
            seen += len(page.objects) + len(page.prefixes)
            yield page
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token or (max_keys and seen >= max_keys):
                return
            kwargs["ContinuationToken"] = token

    @staticmethod
    def _listed(o: Mapping[str, Any]) -> ObjectInfo:
        size = int(o["Size"])
        version = etag_version(o.get("ETag", "")) or weak_version(size, o.get("LastModified"))
        return ObjectInfo(o["Key"], size, epoch(o.get("LastModified", "")), version)

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        what = self._name(key)
        return self._retry.call(lambda: self._get_once(what, key, start, length, version), what)

    def _get_once(self, what: str, key: str, start: int, length: int, version: str) -> bytes:
        refused = False
        if self._fast.enabled:
            answer = self._fast.get(what, key, start, length, version)
            if answer is not None:
                if answer.status in (200, 206):
                    return self._accept(what, start, length, version, answer)
                if answer.status == 416:
                    return b""  # reading at or past the end of the object
                if answer.status == 412:
                    raise StaleVersion(f"{what}: changed (If-Match {version} failed)")
                if answer.status >= 500 or answer.status in (408, 429):
                    raise TransientError(f"{what}: HTTP {answer.status}")
                refused = True  # boto3 repeats it: the exact error, or a redirect followed
        try:
            r = self.client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{start + length - 1}",
                **({"IfMatch": f'"{version}"'} if version and not is_weak(version) else {}),
            )
            meta = r["ResponseMetadata"]
            headers = {k.lower(): v for k, v in meta.get("HTTPHeaders", {}).items()}
            etag = etag_version(headers.get("etag", ""))
            if etag and version and not is_weak(version) and etag != version:
                r["Body"].close()
                raise StaleVersion(f"{what}: changed (ETag {etag} != {version})")
            try:
                refuse_whole(what, int(meta.get("HTTPStatusCode", 0)), headers, length)
            except TransientError:
                r["Body"].close()
                raise
            body: bytes = r["Body"].read()
        except FusefsError:
            raise
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise map_s3_error(exc, what) from exc
        except Exception as exc:  # connection trouble, a stall, a body cut short
            raise map_s3_error(exc, what) from exc
        data = self._accept(what, start, length, version,
                            FastAnswer(int(meta.get("HTTPStatusCode", 0)), headers, body))
        if refused:
            self._fast.refused_but_boto3_worked()
        return data

    def _accept(self, what: str, start: int, length: int, version: str, a: FastAnswer) -> bytes:
        """The asked-for bytes of a 200/206 answer, checked (see the module docstring)."""
        content_range = a.headers.get("content-range")
        data, whole = take_range(what, a.status, content_range, a.body, start, length)
        etag = etag_version(a.headers.get("etag", ""))
        if is_weak(version):
            total = object_total(a.status, content_range, a.body)
            last_modified = a.headers.get("last-modified")
            if total is not None and (
                not version.startswith(f"~{total:x}-")
                or (last_modified and weak_version(total, last_modified) != version)
            ):
                raise StaleVersion(f"{what}: changed (size or last-modified time)")
        elif whole is not None:
            self._md5.verify(what, etag or version, whole, a.headers)
        return data

    # --- writes (see :mod:`.s3_write`) --------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """One PutObject (a ``dir/`` folder marker is an empty one)."""
        r = self.put_object(key, data, hashlib.md5(data, usedforsecurity=False).digest(), {}, {})
        return ObjectInfo(key, len(data), time.time(), etag_version(r.get("ETag", "")))

    def put_object(self, key: str, body: bytes, digest: bytes, meta: Mapping[str, str],
                   cond: Mapping[str, str]) -> Mapping[str, Any]:
        """One PutObject of ``body`` (``digest``: its MD5, sent as Content-MD5 so that the
        server checks what arrived), retried (a 412 is StaleVersion), through the fast path
        where it is on; the answer as boto3 gives it (``ETag``)."""
        what = self._name(key)
        return self._retry.call(lambda: self._put_once(what, key, body, digest, meta, cond), what)

    def _put_once(self, what: str, key: str, body: bytes, digest: bytes,
                  meta: Mapping[str, str], cond: Mapping[str, str]) -> Mapping[str, Any]:
        refused = False
        if self._fast.enabled:
            answer = self._fast.put(what, key, body, digest, meta, cond)
            if answer is not None:
                if answer.status == 200:
                    return {"ETag": answer.headers.get("etag", "")}
                if answer.status == 412:
                    raise StaleVersion(f"{what}: changed (precondition failed)")
                if answer.status >= 500 or answer.status in (408, 409, 429):
                    raise TransientError(f"{what}: HTTP {answer.status}")
                refused = True  # boto3 repeats it: the exact error, or a redirect followed
        try:
            r: Mapping[str, Any] = self._writer.put_object(
                Bucket=self.bucket, Key=key, Body=body, Metadata=dict(meta),
                ContentMD5=base64.b64encode(digest).decode(), **cond)
        except Exception as exc:
            raise map_s3_error(exc, what) from exc
        if refused:
            self._fast.refused_but_boto3_worked()
        return r

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        """DeleteObject (``If-Match`` with a version: AWS honours it on general-purpose buckets
        since 2025; many compatible servers ignore it, see ``enforces_conditions``)."""
        cond = ({"IfMatch": f'"{condition.version}"'}
                if condition.version and not is_weak(condition.version) else {})
        if condition.version and not cond:
            try:
                if self.head(key).version != condition.version:
                    raise Conflict(f"{self._name(key)}: changed")
            except NotFound:
                return
        try:
            self._call(self._name(key), self.client.delete_object, Bucket=self.bucket, Key=key,
                       **cond)
        except StaleVersion as exc:
            raise Conflict(f"{self._name(key)}: changed", cause=exc) from exc
        except NotFound:
            return  # AWS answers a failed If-Match on a missing key with 404

    def put_file(
        self, key: str, upload: Upload, *, condition: Condition = Condition(),
        attrs: Attrs | None = None, progress: Callable[[int], None] | None = None,
    ) -> ObjectInfo:
        return write_put_file(self, key, upload, condition, attrs, progress)

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        return write_copy(self, src, version, dst, condition)

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        return write_set_attrs(self, key, version, attrs)

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort multipart upload ``upload_id`` of ``key`` (one a crash cut short)."""
        write_abort(self, key, upload_id)
