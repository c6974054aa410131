"""Amazon S3 and S3-compatible stores through boto3.

Every call goes through the one retry loop (:mod:`.retry`), boto3's own retries are off. A GET
is one attempt only when its whole body arrived, of the right length, for the right range (and,
for a whole object with an MD5 ETag, with the right MD5); a body cut short, reset or stalled for
``stall_timeout`` (the socket read timeout) is a transient failure, retried on a new request.
An object listed without an ETag gets a weak version from its size and last-modified second
(``~SIZE-SECONDS``): no ``If-Match`` is sent for it, and each answer's size and Last-Modified
are checked against it instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import boto3
import botocore.exceptions
import botocore.session
import urllib3.exceptions
from botocore.auth import EMPTY_SHA256_HASH, _host_from_url
from botocore.config import Config
from urllib3.util.retry import Retry

from ..errors import (
    AccessDenied,
    BackendError,
    Conflict,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)
from ..safety import redact_url
from . import attrs as meta_attrs
from . import s3_write
from .base import Attrs, Condition, ListPage, ObjectInfo, Upload
from .retry import DEFAULT_RETRY, RetryPolicy
from .verify import Md5Etag, object_total, refuse_whole, take_range

T = TypeVar("T")

log = logging.getLogger(__name__)

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "403",
}
_STALE = {"PreconditionFailed", "412"}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500",
    "RequestTimeTooSkewed",
    "ConditionalRequestConflict",  # 409: a concurrent conditional write; AWS says retry
}


def epoch(value: str | datetime) -> float:
    """A Last-Modified value as epoch seconds: an HTTP date (HEAD, GET) or ISO 8601 (listings)."""
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        if value[:4].isdigit():
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return parsedate_to_datetime(value).timestamp()
    except (ValueError, TypeError, IndexError):
        log.debug("unparseable Last-Modified %r", value)
        return 0.0


def etag_version(etag: str) -> str:
    """An ETag as a version string: without quotes or weak prefix. Servers differ in whether
    listings quote ETags (rclone does not, AWS does); HEAD and GET quote them."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def weak_version(size: int, last_modified: str | datetime | None) -> str:
    """The version of an object the store gave no ETag for: its size and last-modified second.
    Weaker than an ETag (a same-size rewrite within one second is missed); never empty."""
    return f"~{size:x}-{int(epoch(last_modified or '')):x}"


def is_weak(version: str) -> bool:
    return version.startswith("~")


def _is_aws(endpoint_url: str | None) -> bool:
    """True for AWS itself (no endpoint, or an ``*.amazonaws.com`` one: a region, FIPS or
    VPC endpoint), which enforces conditional writes; False for any other server."""
    if not endpoint_url:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def map_s3_error(exc: BaseException, what: str) -> FusefsError:
    """Translate a botocore failure into the fusefs error family (messages carry no secrets)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        if code in _NOT_FOUND or status == 404:
            return NotFound(msg, cause=exc)
        if code in _DENIED or status == 403:
            return AccessDenied(msg, cause=exc)
        if code in _STALE or status == 412:
            return StaleVersion(msg, cause=exc)
        if code in _TRANSIENT or status >= 500 or status == 429:
            return TransientError(msg, cause=exc)
        return BackendError(msg, cause=exc)
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return AccessDenied(
            f"{what}: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID)", cause=exc
        )
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return AccessDenied(f"{what}: {exc}", cause=exc)
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError  # refused, connect timeout, proxy, TLS
        | botocore.exceptions.HTTPClientError  # reset, read timeout (a stall), body cut short
        | botocore.exceptions.IncompleteReadError
        | urllib3.exceptions.HTTPError
        | OSError,
    ):
        return TransientError(
            f"{what}: cannot reach the endpoint ({type(exc).__name__})", cause=exc
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return BackendError(f"{what}: {exc}", cause=exc)
    return BackendError(f"{what}: {exc!r}", cause=exc)


#: Read timeout of a listing's retries: a big prefix (or many delete markers) may take a server
#: a while before its first byte; the first attempt has the stall timeout, as everything.
LIST_TIMEOUT = 10.0
#: Read timeout of writes (a part, a completion, a copy): the server answers only once it has
#: stored the body, or copied or assembled the parts, which on a busy S3-compatible server takes
#: far longer than the stall timeout of a GET (each part then failed every attempt).
WRITE_TIMEOUT = 60.0


@dataclass(slots=True)
class _Answer:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class SigV4:
    """AWS Signature Version 4 of a request without a query (the ranged GET and the PutObject
    of :class:`_FastPath`), to the same rules as botocore's ``S3SigV4Auth`` (an unnormalised
    path; the payload hash of the body, or ``UNSIGNED-PAYLOAD``), at a fraction of its cost:
    botocore rebuilds its header map several times per request (about 15% of a cold small
    file's CPU). The signing key is derived once a day. Checked against botocore's signer in
    the tests."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._key: tuple[str, str, bytes] | None = None  # (date, secret, signing key)

    def _signing_key(self, date: str, secret: str) -> bytes:
        k = self._key
        if k is None or k[0] != date or k[1] != secret:
            key = ("AWS4" + secret).encode()
            for part in (date, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = k = (date, secret, key)
        return k[2]

    def sign(self, creds: Any, host: str, path: str, headers: dict[str, str],
             amz_date: str | None = None, *, method: str = "GET",
             payload_hash: str = EMPTY_SHA256_HASH) -> dict[str, str]:
        """``headers`` (lower-case names) plus the date, payload hash, token and authorization
        headers for ``METHOD path`` on ``host``; every header given is signed."""
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        date = amz_date[:8]
        headers = {**headers, "host": host, "x-amz-date": amz_date,
                   "x-amz-content-sha256": payload_hash}
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join([
            method, path, "", *(f"{n}:{' '.join(headers[n].split())}" for n in names), "",
            signed, payload_hash])
        scope = f"{date}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        sig = hmac.new(self._signing_key(date, creds.secret_key), to_sign.encode(),
                       hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        del headers["host"]  # urllib3 sends the pool's own, which is the same
        return headers


class _FastPath:
    """Ranged GETs and small PutObjects without boto3's per-request machinery (endpoint rules,
    events, parsing, header maps: most of a small request's CPU): signed by :class:`SigV4` and
    sent through the clients' own urllib3 pool managers (their pools, TLS, proxy settings and
    timeouts: the reading client's for GETs, the writing client's for PUTs), as botocore's own
    HTTP session does, to the bucket URL that boto3 itself used for the first listing.

    An answer is returned as it came; the caller decides. An error answer this path does not
    handle (a 3xx, 400, 403, 404) is repeated through boto3, which maps it exactly and follows
    redirects; if boto3 then succeeds where this path was refused (a signature or redirect it
    does not handle), the path is turned off for the rest of the mount. That decision is made
    per request, from that request's own answer: no state is shared between threads but
    ``enabled``, which only ever goes from True to False.
    """

    def __init__(self, client: Any, listers: list[Any], credentials: Any,
                 writer: Any = None) -> None:
        self._signer = SigV4(client.meta.region_name or "us-east-1")
        self._credentials = credentials
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._write_http = getattr(getattr(writer, "_endpoint", None), "http_session", None)
        self._base: str | None = None
        self._host = ""
        self.enabled = credentials is not None and self._http is not None
        if self.enabled:
            for lister in listers:
                lister.meta.events.register("before-send.s3.ListObjectsV2", self._learn_base)

    def _learn_base(self, request: Any, **_: Any) -> None:
        if self._base is None:
            parts = urlsplit(request.url)  # .../bucket?list-type=2 or https://bucket.host/?...
            self._host = _host_from_url(request.url)
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"

    def _send(self, http: Any, what: str, method: str, url: str, headers: dict[str, str],
              body: bytes | None = None, payload_hash: str = EMPTY_SHA256_HASH) -> Any:
        """Sign and send one request; the urllib3 response, its body unread."""
        try:
            headers = self._signer.sign(self._credentials.get_frozen_credentials(),
                                        self._host, urlsplit(url).path, headers,
                                        method=method, payload_hash=payload_hash)
            # what botocore's URLLib3Session.send does, without its request/response objects
            proxy_url = http._proxy_config.proxy_url_for(url)
            pool = http._get_connection_manager(url, proxy_url).connection_from_url(url)
            http._setup_ssl_cert(pool, url, http._verify)
            return pool.urlopen(
                method, http._get_request_target(url, proxy_url), body=body, headers=headers,
                retries=Retry(False), assert_same_host=False, preload_content=False,
                decode_content=False, enforce_content_length=False)
        except Exception as exc:
            raise map_s3_error(exc, what) from exc

    @staticmethod
    def _read(what: str, resp: Any, check: Callable[[], None] | None = None) -> bytes:
        """The body of ``resp`` (after ``check()``); the connection goes back to the pool only
        if the body was read whole."""
        try:
            if check is not None:
                check()
            body: bytes = resp.read()
        except TransientError:
            resp.close()
            raise
        except Exception as exc:
            resp.close()  # the connection is in an unknown state: never reuse it
            raise map_s3_error(exc, what) from exc
        finally:
            resp.release_conn()
        return body

    def get(self, what: str, key: str, start: int, length: int, version: str) -> _Answer | None:
        """The server's answer to one ranged GET (None: no listing seen yet, ask boto3).
        Connection trouble, a stall or a body cut short raise TransientError."""
        base = self._base
        if base is None:
            return None
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        if version and not is_weak(version):
            headers["if-match"] = f'"{version}"'
        resp = self._send(self._http, what, "GET", base + quote(key, safe="/~"), headers)
        status = resp.status
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        etag = etag_version(answer_headers.get("etag", ""))
        if status in (200, 206) and etag and version and not is_weak(version) and etag != version:
            resp.close()  # body unread: the connection cannot be reused
            resp.release_conn()  # (the pool reconnects its slot)
            raise StaleVersion(f"{what}: changed (ETag {etag} != {version})")
        body = self._read(what, resp, lambda: refuse_whole(what, status, answer_headers, length))
        return _Answer(status, answer_headers, body)

    def put(self, what: str, key: str, body: bytes, md5: bytes, meta: Mapping[str, str],
            cond: Mapping[str, str]) -> _Answer | None:
        """The server's answer to one PutObject of ``body`` (its MD5 digest ``md5``, sent as
        Content-MD5 so that the server checks what arrived), with user metadata ``meta`` and
        boto3-style conditions ``cond`` (IfMatch, IfNoneMatch). None: ask boto3."""
        base = self._base
        if base is None or self._write_http is None:
            return None
        headers = {"content-md5": base64.b64encode(md5).decode()}
        for name, value in meta.items():
            headers[f"x-amz-meta-{name.lower()}"] = value
        for name, value in cond.items():
            headers[{"IfMatch": "if-match", "IfNoneMatch": "if-none-match"}[name]] = value
        # botocore's rule: over TLS with a Content-MD5 the payload is not hashed again
        payload = "UNSIGNED-PAYLOAD" if base.startswith("https:") else \
            hashlib.sha256(body).hexdigest()
        resp = self._send(self._write_http, what, "PUT", base + quote(key, safe="/~"), headers,
                          body, payload)
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        return _Answer(resp.status, answer_headers, self._read(what, resp))

    def refused_but_boto3_worked(self) -> None:
        """A request this path was refused worked through boto3: stop using this path."""
        if self.enabled:
            log.info("fast request path off for this mount: the server refused it, boto3 not")
            self.enabled = False


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
        self._fast = _FastPath(self.client, [self.client, self._patient],
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
        mtime, mode = meta_attrs.decode(r.get("Metadata"))
        return ObjectInfo(key, size, epoch(r.get("LastModified", "")), version, mtime, mode,
                          meta_attrs.token(r.get("Metadata")), *meta_attrs.owner(r.get("Metadata")),
                          meta_attrs.rdev(r.get("Metadata")))

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
        mtime, mode = meta_attrs.decode(r.get("Metadata"))
        return ObjectInfo(key, int(r["ContentLength"]), epoch(r.get("LastModified", "")),
                          etag or version, mtime, mode, meta_attrs.token(r.get("Metadata")),
                          *meta_attrs.owner(r.get("Metadata")),
                          meta_attrs.rdev(r.get("Metadata"))), body

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
        mtime, mode = meta_attrs.decode(meta)
        etag = etag_version(answer.headers.get("etag", ""))
        return ObjectInfo(key, size, epoch(answer.headers.get("last-modified", "")),
                          etag or version, mtime, mode, meta_attrs.token(meta),
                          *meta_attrs.owner(meta), meta_attrs.rdev(meta)), body

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
                            _Answer(int(meta.get("HTTPStatusCode", 0)), headers, body))
        if refused:
            self._fast.refused_but_boto3_worked()
        return data

    def _accept(self, what: str, start: int, length: int, version: str, a: _Answer) -> bytes:
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
        return s3_write.put_file(self, key, upload, condition, attrs, progress)

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        return s3_write.copy(self, src, version, dst, condition)

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        return s3_write.set_attrs(self, key, version, attrs)

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort multipart upload ``upload_id`` of ``key`` (one a crash cut short)."""
        s3_write.abort(self, key, upload_id)
