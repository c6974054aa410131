"""What the GCS store and its writes (:mod:`.gcs_write`) share: an object's info from a blob
(its version is the generation) and the one translation of google-cloud-storage failures into
the fusefs error family (messages carry no URL and no secret).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import google.auth.exceptions
import requests
import urllib3.exceptions
from google.api_core import exceptions as gexc

try:  # google-cloud-storage >= 3 vendors google-resumable-media
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
except ImportError:  # pragma: no cover - google-cloud-storage 2.x
    from google.resumable_media.common import DataCorruption, InvalidResponse

from ..errors import (
    AccessDenied,
    BackendError,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)
from .attrs import decode as meta_decode
from .attrs import owner as meta_owner
from .attrs import rdev as meta_rdev
from .attrs import token as meta_token
from .base import ObjectInfo

_DENIED = (gexc.Forbidden, gexc.Unauthorized)
_TRANSIENT = (
    gexc.TooManyRequests,
    gexc.InternalServerError,
    gexc.BadGateway,
    gexc.ServiceUnavailable,
    gexc.GatewayTimeout,
    gexc.RetryError,
    gexc.DeadlineExceeded,
)
_NETWORK = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    google.auth.exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)
_HTTP_PREFIX = re.compile(r"^(GET|HEAD|POST|PUT|PATCH|DELETE) \S+: ")


def _reason(exc: gexc.GoogleAPICallError) -> str:
    """The server's message without the request line (URL) and clipped to one short line."""
    text = _HTTP_PREFIX.sub("", str(exc.message or ""), count=1)
    text = " ".join(text.split())
    return text[:200] + ("..." if len(text) > 200 else "")


def map_gcs_error(exc: BaseException, what: str) -> FusefsError:
    """Translate a google-cloud-storage failure into the fusefs error family (no secrets)."""
    if isinstance(exc, FusefsError):
        return exc
    if isinstance(exc, gexc.RetryError) and exc.cause is not None:
        inner = map_gcs_error(exc.cause, what)  # retries ran out: report the last failure
        return TransientError(f"{inner.message} (gave up retrying)", cause=exc)
    if isinstance(exc, InvalidResponse):  # a raw media response the library did not wrap
        status = getattr(getattr(exc, "response", None), "status_code", 0) or 0
        exc = gexc.from_http_status(status, str(exc))
    if isinstance(exc, gexc.GoogleAPICallError):
        code = int(exc.code or 0)
        msg = f"{what}: {code} {_reason(exc)}".strip()
        if isinstance(exc, gexc.NotFound) or code == 404:
            return NotFound(msg, cause=exc)
        if isinstance(exc, _DENIED) or code in (401, 403):
            return AccessDenied(msg, cause=exc)
        if isinstance(exc, gexc.PreconditionFailed) or code == 412:
            return StaleVersion(msg, cause=exc)
        if isinstance(exc, _TRANSIENT) or code == 429 or code >= 500 or code == 408:
            return TransientError(msg, cause=exc)
        return BackendError(msg, cause=exc)
    if isinstance(exc, google.auth.exceptions.DefaultCredentialsError):
        return AccessDenied(
            f"{what}: no Google credentials found (run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS)",
            cause=exc,
        )
    if isinstance(exc, google.auth.exceptions.RefreshError):
        if exc.retryable:
            return TransientError(f"{what}: could not refresh credentials (will retry)", cause=exc)
        return AccessDenied(f"{what}: credentials were rejected when refreshed", cause=exc)
    if isinstance(exc, _NETWORK):
        return TransientError(
            f"{what}: cannot reach the endpoint ({type(exc).__name__})", cause=exc
        )
    if isinstance(exc, DataCorruption):
        return TransientError(f"{what}: corrupted download (checksum mismatch)", cause=exc)
    if isinstance(exc, google.auth.exceptions.GoogleAuthError):
        return AccessDenied(f"{what}: authentication failed ({type(exc).__name__})", cause=exc)
    return BackendError(f"{what}: {exc!r}"[:300], cause=exc)


def _mtime(updated: datetime | None, created: datetime | None) -> float:
    when = updated or created
    return when.timestamp() if when is not None else 0.0


def object_info(key: str, blob: Any) -> ObjectInfo:
    """An object's info; its version is the generation (never empty: a size+time fallback)."""
    size = int(blob.size or 0)
    mtime = _mtime(blob.updated, blob.time_created)
    version = str(blob.generation) if blob.generation else f"~{size:x}-{int(mtime):x}"
    meta_mtime, mode = meta_decode(blob.metadata)
    uid, gid = meta_owner(blob.metadata)
    return ObjectInfo(key, size, mtime, version, meta_mtime, mode, meta_token(blob.metadata),
                      uid, gid, meta_rdev(blob.metadata))
