"""What the S3 store and its writes (:mod:`.s3_write`) share: versions from ETags (or, with no
ETag, a weak version from size and last-modified second), Last-Modified as epoch seconds, and
the one translation of botocore failures into the fusefs error family.

A weak version (``~SIZE-SECONDS``) is never sent as ``If-Match``: it is checked against an
answer's size and Last-Modified instead (:func:`is_weak`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from email.utils import parsedate_to_datetime

import botocore.exceptions
import urllib3.exceptions

from ..errors import (
    AccessDenied,
    BackendError,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)

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
