"""Amazon S3 and S3-compatible stores through boto3."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import botocore.exceptions
import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from ..errors import (
    AccessDenied,
    BackendError,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)
from .base import ListPage, ObjectInfo

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
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.ReadTimeoutError,
    ):
        return TransientError(
            f"{what}: cannot reach the endpoint ({type(exc).__name__})", cause=exc
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return BackendError(f"{what}: {exc}", cause=exc)
    return BackendError(f"{what}: {exc!r}", cause=exc)


class _FastGet:
    """Ranged GETs without boto3's per-request machinery (endpoint rules, events, parsing: more
    than half of a GET's CPU): signed with botocore's own SigV4 signer and sent through the
    client's own HTTP session (its pool, TLS and proxy settings), to the bucket URL that boto3
    itself used for the first listing. Only a 200/206 of the right length is taken; anything
    else returns None and the caller repeats the request through boto3, which maps errors,
    retries and follows redirects. If boto3 then succeeds where this path got an HTTP error
    (a signature or redirect this path does not handle), the path is turned off for the rest of
    the mount, so no server ever sees every GET twice.
    """

    def __init__(self, client: Any, credentials: Any) -> None:
        self._client = client
        self._credentials = credentials
        self._region = client.meta.region_name or "us-east-1"
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._base: str | None = None
        self.refused = False  # the last attempt got an HTTP error answer
        self.enabled = credentials is not None and self._http is not None
        if self.enabled:
            client.meta.events.register("before-send.s3.ListObjectsV2", self._learn_base)

    def _learn_base(self, request: Any, **_: Any) -> None:
        if self._base is None:
            parts = urlsplit(request.url)  # .../bucket?list-type=2 or https://bucket.host/?...
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"

    def get(self, key: str, start: int, length: int, version: str) -> bytes | None:
        self.refused = False
        if self._base is None:
            return None  # no listing seen yet: boto3 does this one
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        if version:
            headers["If-Match"] = f'"{version}"'
        try:
            req = AWSRequest(method="GET", url=self._base + quote(key, safe="/~"),
                             headers=headers, stream_output=True)  # we read the body once
            S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3",
                        self._region).add_auth(req)
            resp = self._http.send(req.prepare())  # type: ignore[union-attr]
        except Exception as exc:  # connection trouble: boto3 retries it
            log.debug("fast GET of %s failed, using boto3: %s", key, exc)
            return None
        raw = resp.raw
        status = resp.status_code
        etag = etag_version(resp.headers.get("ETag", ""))
        if status in (200, 206) and etag and version and etag != version:
            raw.close()  # body unread: the connection cannot be reused
            raise StaleVersion(f"s3 key {key}: changed (ETag {etag} != {version})")
        try:
            data: bytes = raw.read()
        finally:
            raw.release_conn()
        if status in (200, 206):
            return data if len(data) == length else None
        self.refused = status not in (412, 416, 429) and status < 500
        return None

    def boto3_succeeded(self) -> None:
        """The request this path gave up on worked through boto3: stop using this path."""
        if self.refused:
            log.info("fast GET path off for this mount: the server refused it, boto3 not")
            self.enabled = False


class S3Store:
    """One S3 bucket. Path-style addressing is used whenever an endpoint URL is given."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        max_connections: int = 32,
    ) -> None:
        self.bucket = bucket
        self.source_id = f"s3://{bucket}" if not endpoint_url else f"s3+{endpoint_url}/{bucket}"
        config = Config(
            max_pool_connections=max_connections,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
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
        except Exception as exc:  # ProfileNotFound and friends
            raise map_s3_error(exc, f"s3://{bucket}") from exc
        self._fast = _FastGet(self.client, session.get_credentials())

    def _name(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def check(self) -> None:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except Exception as exc:
            err = map_s3_error(exc, f"s3://{self.bucket}")
            if isinstance(err, NotFound):
                raise NotFound(f"bucket s3://{self.bucket} does not exist", cause=exc) from exc
            raise err from exc

    def head(self, key: str) -> ObjectInfo:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise map_s3_error(exc, self._name(key)) from exc
        return ObjectInfo(
            key, int(r["ContentLength"]), epoch(r["LastModified"]), etag_version(r["ETag"])
        )

    def list(self, prefix: str, *, max_keys: int | None = None) -> Iterator[ListPage]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        if max_keys:
            kwargs["MaxKeys"] = max_keys
        seen = 0
        try:
            while True:
                r = self.client.list_objects_v2(**kwargs)
                page = ListPage(
                    [
                        ObjectInfo(
                            o["Key"],
                            int(o["Size"]),
                            epoch(o["LastModified"]),
                            etag_version(o.get("ETag", "")),
                        )
                        for o in r.get("Contents", ())
                    ],
                    [p["Prefix"] for p in r.get("CommonPrefixes", ())],
                )
                seen += len(page.objects) + len(page.prefixes)
                yield page
                token = r.get("NextContinuationToken")
                if not r.get("IsTruncated") or not token or (max_keys and seen >= max_keys):
                    return
                kwargs["ContinuationToken"] = token
        except FusefsError:
            raise
        except Exception as exc:
            raise map_s3_error(exc, self._name(prefix)) from exc

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        if self._fast.enabled:
            fast = self._fast.get(key, start, length, version)
            if fast is not None:
                return fast
        try:
            r = self.client.get_object(
                Bucket=self.bucket,
                Key=key,
                Range=f"bytes={start}-{start + length - 1}",
                **({"IfMatch": f'"{version}"'} if version else {}),
            )
            etag = etag_version(r.get("ETag", ""))
            if etag and version and etag != version:  # a server that ignores If-Match
                raise StaleVersion(f"{self._name(key)}: changed (ETag {etag} != {version})")
            data: bytes = r["Body"].read()
            self._fast.boto3_succeeded()
            return data
        except FusefsError:
            raise
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # reading at or past the end of the object
            raise map_s3_error(exc, self._name(key)) from exc
        except Exception as exc:
            raise map_s3_error(exc, self._name(key)) from exc

    # --- writes (``fusefs check``'s probe) ------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        import time

        try:
            r = self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:
            raise map_s3_error(exc, self._name(key)) from exc
        return ObjectInfo(key, len(data), time.time(), etag_version(r.get("ETag", "")))

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise map_s3_error(exc, self._name(key)) from exc
