"""Google Cloud Storage through google-cloud-storage (JSON API over requests).

Credentials: Application Default Credentials, falling back to anonymous access (public
buckets) with a warning. With ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server), the client is
anonymous and uses a placeholder project, as the library expects for emulators.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import google.auth
import google.auth.exceptions
import requests
import urllib3.exceptions
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from requests.adapters import HTTPAdapter

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
from .base import ListPage, ObjectInfo

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
_TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
# 429/5xx/connection errors, exponential backoff, for at most a minute (with_deadline: old api-core)
_RETRY = getattr(DEFAULT_RETRY, "with_timeout", DEFAULT_RETRY.with_deadline)(60.0)
_PAGE_SIZE = 1000  # the API maximum
# Only what ObjectInfo needs; nextPageToken and prefixes are required for paging.
_LIST_FIELDS = "items(name,size,updated,timeCreated,generation),prefixes,nextPageToken"
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


def _make_client(project: str | None, emulator: str | None) -> Any:
    """A storage client: anonymous for the emulator, else ADC or anonymous as a fallback."""
    if emulator:
        return storage.Client(
            project=project or "fusefs",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator},
        )
    try:
        credentials, adc_project = google.auth.default(scopes=[_READ_ONLY_SCOPE])
    except google.auth.exceptions.DefaultCredentialsError:
        log.warning(
            "no Google Application Default Credentials found; accessing GCS anonymously "
            "(only public buckets will work)"
        )
        # An explicit project=None means "no project" (no lookup); reads do not need one.
        return storage.Client(
            project=project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )
    return storage.Client(project=project or adc_project, credentials=credentials)


def _size_pool(client: Any, max_connections: int) -> None:
    """Let ``max_connections`` threads hold a connection each (requests' default is 10)."""
    session = client._http  # google.auth AuthorizedSession (a requests.Session), built lazily
    for prefix, adapter in list(session.adapters.items()):
        if type(adapter) is HTTPAdapter:  # leave special adapters (mTLS) alone
            session.mount(
                prefix,
                HTTPAdapter(
                    pool_connections=4,
                    pool_maxsize=max_connections,
                    max_retries=adapter.max_retries,
                ),
            )


class GCSStore:
    """One GCS bucket; object versions are generations, so a rewritten object is detected."""

    def __init__(
        self, bucket: str, *, project: str | None = None, max_connections: int = 32
    ) -> None:
        self.bucket_name = bucket
        emulator = (os.environ.get(EMULATOR_ENV) or "").strip().rstrip("/") or None
        if emulator and "://" not in emulator:
            emulator = "http://" + emulator
        self.source_id = f"gs+{emulator}/{bucket}" if emulator else f"gs://{bucket}"
        try:
            self.client: Any = _make_client(project, emulator)
            _size_pool(self.client, max_connections)
        except Exception as exc:
            raise map_gcs_error(exc, f"gs://{bucket}") from exc
        self.bucket: Any = self.client.bucket(bucket)

    def _name(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()

    def check(self) -> None:
        # Listing needs only storage.objects.list, which readers have (buckets.get they may not).
        try:
            iterator = self.client.list_blobs(
                self.bucket_name,
                max_results=1,
                fields="items(name),nextPageToken",
                timeout=_TIMEOUT,
                retry=_RETRY,
            )
            next(iter(iterator.pages), None)
        except Exception as exc:
            err = map_gcs_error(exc, f"gs://{self.bucket_name}")
            if isinstance(err, NotFound):
                raise NotFound(f"bucket gs://{self.bucket_name} does not exist", cause=exc) from exc
            raise err from exc

    def head(self, key: str) -> ObjectInfo:
        if not key:
            raise NotFound(f"{self._name(key)}: not an object")
        blob = self.bucket.blob(key)
        try:
            blob.reload(timeout=_TIMEOUT, retry=_RETRY)
        except Exception as exc:
            raise map_gcs_error(exc, self._name(key)) from exc
        return ObjectInfo(
            key, int(blob.size or 0), _mtime(blob.updated, blob.time_created), str(blob.generation)
        )

    def list(self, prefix: str, *, max_keys: int | None = None) -> Iterator[ListPage]:
        page_size = min(max_keys, _PAGE_SIZE) if max_keys else _PAGE_SIZE
        seen = 0
        seen_prefixes: set[str] = set()  # fake-gcs-server repeats all prefixes on every page
        try:
            iterator = self.client.list_blobs(
                self.bucket_name,
                prefix=prefix or None,
                delimiter="/",
                page_size=page_size,
                fields=_LIST_FIELDS,
                timeout=_TIMEOUT,
                retry=_RETRY,
            )
            # Each API page carries its own items and prefixes (``page.prefixes``); the
            # iterator-wide ``prefixes`` set only fills in as pages are consumed.
            for api_page in iterator.pages:
                page = ListPage(
                    [
                        ObjectInfo(
                            b.name,
                            int(b.size or 0),
                            _mtime(b.updated, b.time_created),
                            str(b.generation),
                        )
                        for b in api_page
                    ],
                    [],
                )
                for p in api_page.prefixes:
                    if p not in seen_prefixes:
                        seen_prefixes.add(p)
                        page.prefixes.append(str(p))
                seen += len(page.objects) + len(page.prefixes)
                yield page
                if max_keys and seen >= max_keys:
                    return
        except FusefsError:
            raise
        except Exception as exc:
            raise map_gcs_error(exc, self._name(prefix)) from exc

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        try:
            generation = int(version)
        except ValueError:
            raise StaleVersion(f"{self._name(key)}: {version!r} is not a GCS generation") from None
        # Pin the generation (exact bytes, even where preconditions are ignored, as in
        # fake-gcs-server) and require it to still be the live one (412 on real GCS).
        blob = self.bucket.blob(key, generation=generation)
        try:
            data: bytes = blob.download_as_bytes(
                start=start,
                end=start + length - 1,
                raw_download=True,  # stored bytes: no gzip transcoding, offsets match the size
                checksum=None,  # ranged reads carry no whole-object checksum anyway
                if_generation_match=generation,
                timeout=_TIMEOUT,
                retry=_RETRY,
            )
        except gexc.RequestRangeNotSatisfiable:
            return b""  # at or past the end of the object (or an empty object)
        except Exception as exc:
            err = map_gcs_error(exc, self._name(key))
            if isinstance(err, NotFound):
                raise self._gone_or_stale(key, version, err) from exc
            raise err from exc
        got = blob.generation
        if got is not None and str(got) != version:  # a server that ignores the pinning
            raise StaleVersion(f"{self._name(key)}: changed (generation {got} != {version})")
        return data

    def _gone_or_stale(self, key: str, version: str, err: NotFound) -> FusefsError:
        """A 404 for a pinned generation: StaleVersion if the object lives on, else NotFound."""
        try:
            current = self.head(key)
        except NotFound:
            return err
        except FusefsError as exc:
            return exc
        if current.version != version:
            return StaleVersion(
                f"{self._name(key)}: changed (generation {current.version} != {version})",
                cause=err,
            )
        return err

    # --- writes (``fusefs check``'s probe) ------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        blob = self.bucket.blob(key)
        try:
            blob.upload_from_string(data, timeout=_TIMEOUT, retry=_RETRY)
        except Exception as exc:
            raise map_gcs_error(exc, self._name(key)) from exc
        return ObjectInfo(
            key, len(data), _mtime(blob.updated, blob.time_created), str(blob.generation)
        )

    def delete(self, key: str) -> None:
        try:
            self.bucket.blob(key).delete(timeout=_TIMEOUT, retry=_RETRY)
        except gexc.NotFound:
            return  # already absent
        except Exception as exc:
            raise map_gcs_error(exc, self._name(key)) from exc
