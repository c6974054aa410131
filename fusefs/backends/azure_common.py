"""What the Azure store and its writes (:mod:`.azure_write`) share: versions from ETags, blob
times as epoch seconds, and the one translation of azure-core/azure-storage failures into the
fusefs error family (only the service's error code and the first line of its message are kept:
never a URL, which may carry a SAS token, nor a header).
"""

from __future__ import annotations

from datetime import datetime

from azure.core import exceptions as aexc

from ..errors import (
    AccessDenied,
    BackendError,
    FusefsError,
    NotFound,
    StaleVersion,
    TransientError,
)

_BAD_CREDENTIALS = {
    "AuthenticationFailed",
    "InvalidAuthenticationInfo",
    "NoAuthenticationInformation",
}
_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}


def etag_version(etag: str | None) -> str:
    """An ETag as a version: without quotes or weak prefix (listings and HEAD differ)."""
    etag = (etag or "").strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def epoch(when: datetime | None) -> float:
    return when.timestamp() if when is not None else 0.0


def _first_line(text: str) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line[:200] + ("..." if len(line) > 200 else "")


def map_azure_error(exc: BaseException, what: str) -> FusefsError:
    """Translate an azure-core/azure-storage failure into the fusefs error family.

    Only the service's error code and the first line of its message are kept: never a URL
    (it may carry a SAS token) or a header.
    """
    if isinstance(exc, FusefsError):
        return exc
    if isinstance(exc, aexc.ServiceRequestError | aexc.ServiceResponseError):
        return TransientError(
            f"{what}: cannot reach the endpoint ({type(exc).__name__})", cause=exc
        )
    if isinstance(exc, aexc.HttpResponseError) and getattr(exc, "status_code", None):
        status = int(exc.status_code or 0)
        code_obj = getattr(exc, "error_code", None) or ""
        code = str(getattr(code_obj, "value", code_obj))  # StorageErrorCode is an enum
        reason = _first_line(str(getattr(exc, "reason", "") or ""))
        msg = f"{what}: {code or status} {_first_line(str(exc.message or '')) or reason}".strip()
        if status == 404:
            return NotFound(msg, cause=exc)
        if status in (401, 403) or code in _BAD_CREDENTIALS:
            return AccessDenied(msg, cause=exc)
        if status == 412 or code == "ConditionNotMet":
            return StaleVersion(msg, cause=exc)
        if status in (408, 429) or status >= 500 or code in _TRANSIENT_CODES:
            return TransientError(msg, cause=exc)
        return BackendError(msg, cause=exc)
    if isinstance(exc, aexc.ClientAuthenticationError):  # no status: a token that failed
        return AccessDenied(
            f"{what}: authentication failed ({type(exc).__name__}: "
            f"{_first_line(str(exc.message or ''))})",
            cause=exc,
        )
    if isinstance(exc, aexc.AzureError):
        return BackendError(f"{what}: {type(exc).__name__}", cause=exc)
    return BackendError(f"{what}: {exc!r}"[:300], cause=exc)
