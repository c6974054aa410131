"""Google Cloud Storage through google-cloud-storage (JSON API over requests).

Credentials: Application Default Credentials, falling back to anonymous access (public
buckets) with a warning. With ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server), the client is
anonymous and uses a placeholder project, as the library expects for emulators.

Every call goes through the one retry loop (:mod:`.retry`); the library's own retries are off.
Ranged GETs are sent by this module through the client's authorized session (stored bytes, no
transcoding), so that the whole body is read under the stall timeout and checked: the right
range and length, and for a whole object its ``x-goog-hash`` (CRC32C). A body cut short, reset
or stalled is a transient failure, retried on a new request.

Parts: :class:`GCSStore` (the one store class) here; object info and error mapping in
:mod:`.gcs_common`; uploads, copies and metadata changes in :mod:`.gcs_write`. Imports go one
way: store -> write -> common.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import google.auth
import google.auth.exceptions
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from requests.adapters import HTTPAdapter

from ..errors import (
    Conflict,
    FusefsError,
    NotFound,
    StaleVersion,
)
from .base import Attrs, Condition, ListPage, ObjectInfo, Upload
from .gcs_common import map_gcs_error, object_info
from .gcs_write import BINARY
from .gcs_write import copy as write_copy
from .gcs_write import put_file as write_put_file
from .gcs_write import set_attrs as write_set_attrs
from .lean import Answer, SessionPool
from .retry import DEFAULT_RETRY, RetryPolicy
from .verify import refuse_whole, take_range, verify_goog_hash

# map_gcs_error is imported from here by tests and tools
__all__ = ["EMULATOR_ENV", "GCSStore", "map_gcs_error"]

T = TypeVar("T")

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# read_write: the mount writes (user credentials ignore scopes; service accounts honour them)
_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
#: Read timeout of a listing's retries: a big prefix may take a server a while before its first
#: byte; the first attempt has the stall timeout, as everything.
LIST_TIMEOUT = 10.0
_PAGE_SIZE = 1000  # the API maximum
# Only what ObjectInfo needs; nextPageToken and prefixes are required for paging.
# ``metadata``: the mtime/mode a writer kept (no extra request, a bigger answer only)
_LIST_FIELDS = ("items(name,size,updated,timeCreated,generation,metadata),prefixes,"
                "nextPageToken")


def _make_client(project: str | None, emulator: str | None) -> Any:
    """A storage client: anonymous for the emulator, else ADC or anonymous as a fallback."""
    if emulator:
        return storage.Client(
            project=project or "fusefs",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": emulator},
        )
    try:
        credentials, adc_project = google.auth.default(scopes=[_SCOPE])
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


#: Answers the lean path leaves to the session: 401 (the session refreshes the token and asks
#: again), 407 and redirects (followed by requests).
_SESSION_STATUSES = frozenset({301, 302, 303, 307, 308, 401, 407})


class _LeanGet:
    """Media GETs without requests' per-request machinery (about half of a small GET's CPU):
    the credentials' headers applied as the client's ``AuthorizedSession`` applies them, and
    the request sent on that session's own urllib3 pool (:class:`.lean.SessionPool`).

    Used only where the session would do nothing more (no proxy, no mTLS). An answer this path
    leaves to the session (:data:`_SESSION_STATUSES`) is repeated through it; if the session
    then succeeds, this path is turned off for the rest of the mount. ``enabled`` only ever goes
    from True to False; ``sent`` counts the requests this path made.
    """

    def __init__(self, session: Any, api_base: str, timeout: tuple[float, float]) -> None:
        self.sent = 0
        self._session = session
        self._pool = SessionPool(session, api_base, timeout)
        self._auth_request = getattr(session, "_auth_request", None)
        self.enabled = self._pool.usable and self._auth_request is not None

    def get(self, what: str, url: str, target: str, headers: dict[str, str],
            length: int) -> Answer | None:
        """The answer to one GET (None: leave it to the session). Connection trouble, a stall
        or a body cut short raise TransientError."""
        self.sent += 1
        try:
            self._session.credentials.before_request(self._auth_request, "GET", url, headers)
        except Exception as exc:
            raise map_gcs_error(exc, what) from exc
        return self._pool.get(what, target, headers, length, map_gcs_error, _SESSION_STATUSES)

    def session_worked(self) -> None:
        """An answer left to the session was a success there: stop using this path."""
        if self.enabled:
            log.info("lean GCS GET path off for this mount: the session handled what it could not")
            self.enabled = False


class GCSStore:
    """One GCS bucket; object versions are generations, so a rewritten object is detected.

    Writes: one request up to ``part_size``, else a resumable upload in chunks of
    ``part_size`` (rounded up to 256 KiB) streamed from the staged file; conditions are
    generation preconditions (``ifGenerationMatch``, 0 for "absent"), enforced by GCS.
    """

    enforces_conditions = True

    def __init__(
        self,
        bucket: str,
        *,
        project: str | None = None,
        max_connections: int = 48,
        stall_timeout: float = 2.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        part_size: int = 8 << 20,
        parts: int = 8,
    ) -> None:
        self.bucket_name = bucket
        self._retry = retry
        self.part_size = part_size
        self.parts = parts  # resumable uploads send one chunk at a time
        connect = max(stall_timeout, 10.0)
        self._timeout = (connect, stall_timeout)  # no progress for stall_timeout: abandoned
        self._patient_timeout = (connect, max(stall_timeout, LIST_TIMEOUT))
        emulator = (os.environ.get(EMULATOR_ENV) or "").strip().rstrip("/") or None
        if emulator and "://" not in emulator:
            emulator = "http://" + emulator
        #: GCS honours ifGenerationMatch on deletes; an emulator may not (fake-gcs-server
        #: deletes anyway): the caller checks with a HEAD first there
        self.enforces_delete_conditions = not emulator
        self.source_id = f"gs+{emulator}/{bucket}" if emulator else f"gs://{bucket}"
        try:
            self.client: Any = _make_client(project, emulator)
            _size_pool(self.client, max_connections)
        except Exception as exc:
            raise map_gcs_error(exc, f"gs://{bucket}") from exc
        self.bucket: Any = self.client.bucket(bucket)
        self._api_base = str(self.client._connection.API_BASE_URL).rstrip("/")
        api = urlsplit(self._api_base)
        self._api_origin = f"{api.scheme}://{api.netloc}"
        self._lean = _LeanGet(self.client._http, self._api_base, self._timeout)

    def _name(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{key}"

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (a library call) with errors mapped, retried while transient."""

        def once() -> T:
            try:
                return fn()
            except FusefsError:
                raise
            except Exception as exc:
                raise map_gcs_error(exc, what) from exc

        return self._retry.call(once, what)

    def check(self) -> None:
        # Listing needs only storage.objects.list, which readers have (buckets.get they may not).
        attempts = itertools.count()

        def one() -> None:
            iterator = self.client.list_blobs(
                self.bucket_name,
                max_results=1,
                fields="items(name),nextPageToken",
                timeout=self._timeout if next(attempts) == 0 else self._patient_timeout,
                retry=None,
            )
            next(iter(iterator.pages), None)

        try:
            self._call(f"gs://{self.bucket_name}", one)
        except NotFound as exc:
            raise NotFound(f"bucket gs://{self.bucket_name} does not exist", cause=exc) from exc

    def head(self, key: str) -> ObjectInfo:
        if not key:
            raise NotFound(f"{self._name(key)}: not an object")
        blob = self.bucket.blob(key)
        self._call(self._name(key), lambda: blob.reload(timeout=self._timeout, retry=None))
        return object_info(key, blob)

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        page_size = min(max_keys, _PAGE_SIZE) if max_keys else _PAGE_SIZE
        seen = 0
        seen_prefixes: set[str] = set()  # fake-gcs-server repeats all prefixes on every page
        token: str | None = None
        while True:
            attempts = itertools.count()
            objects, prefixes, token = self._call(
                self._name(prefix),
                lambda t=token, n=attempts: self._list_page(  # type: ignore[misc]
                    prefix, page_size, t, start_after, patient=next(n) > 0
                ),
            )
            # GCS's startOffset is inclusive: the key itself is dropped here
            page = ListPage([o for o in objects if o.key > start_after], [], bool(token))
            for p in sorted(prefixes):
                if p not in seen_prefixes and p > start_after:
                    seen_prefixes.add(p)
                    page.prefixes.append(p)
            seen += len(page.objects) + len(page.prefixes)
            yield page
            if not token or (max_keys and seen >= max_keys):
                return

    def _list_page(
        self,
        prefix: str,
        page_size: int,
        token: str | None,
        start_after: str = "",
        *,
        patient: bool = False,
    ) -> tuple[Sequence[ObjectInfo], Sequence[str], str | None]:
        """One page of a listing, from ``token``: objects, prefixes, the next page's token.
        ``patient``: a retry, which waits LIST_TIMEOUT for the first byte."""
        iterator = self.client.list_blobs(
            self.bucket_name,
            prefix=prefix or None,
            delimiter="/",
            page_size=page_size,
            page_token=token,
            fields=_LIST_FIELDS,
            timeout=self._patient_timeout if patient else self._timeout,
            retry=None,
            **({"start_offset": start_after} if start_after else {}),
        )
        api_page = next(iter(iterator.pages), None)
        if api_page is None:
            return [], [], None
        objects = [object_info(b.name, b) for b in api_page]
        return objects, [str(p) for p in api_page.prefixes], iterator.next_page_token

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        what = self._name(key)
        if not version.startswith("~"):
            try:
                int(version)
            except ValueError:
                raise StaleVersion(f"{what}: {version!r} is not a GCS generation") from None
        try:
            return self._retry.call(lambda: self._get_once(what, key, start, length, version), what)
        except NotFound as err:
            raise self._gone_or_stale(key, version, err) from err

    def _get_once(self, what: str, key: str, start: int, length: int, version: str) -> bytes:
        # Pin the generation (exact bytes, even where preconditions are ignored, as in
        # fake-gcs-server) and require it to still be the live one (412 on real GCS).
        query = "alt=media"
        if not version.startswith("~"):
            query += f"&generation={version}&ifGenerationMatch={version}"
        url = (f"{self._api_base}/download/storage/v1/b/{quote(self.bucket_name, safe='')}"
               f"/o/{quote(key, safe='')}?{query}")
        # Accept-Encoding gzip: the stored bytes, never transcoded, so offsets match the size
        headers = {"Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "gzip"}
        answer = None
        if self._lean.enabled:
            target = url[len(self._api_origin):]
            answer = self._lean.get(what, url, target, dict(headers), length)
        if answer is None:
            answer = self._session_get(what, url, headers, length)
            if self._lean.enabled and answer.status in (200, 206, 416):
                self._lean.session_worked()
        status, body = answer.status, answer.body
        if status == 416:
            return b""  # at or past the end of the object (or an empty object)
        if status not in (200, 206):
            text = body[:300].decode("utf-8", "replace")
            raise map_gcs_error(gexc.from_http_status(status, text), what)
        got = answer.headers.get("x-goog-generation")
        if got and not version.startswith("~") and got != version:  # pinning ignored
            raise StaleVersion(f"{what}: changed (generation {got} != {version})")
        data, whole = take_range(
            what, status, answer.headers.get("content-range"), body, start, length
        )
        if whole is not None:
            verify_goog_hash(what, answer.headers.get("x-goog-hash"), whole)
        return data

    def _session_get(self, what: str, url: str, headers: dict[str, str], length: int) -> Answer:
        """One GET through the client's authorized session (token refresh, proxies, mTLS,
        redirects): the answer, its body read whole unless refused unread."""
        try:
            resp = self.client._http.request(
                "GET", url, headers=headers, stream=True, timeout=self._timeout
            )
            try:
                answer_headers = {k.lower(): v for k, v in resp.headers.items()}
                refuse_whole(what, resp.status_code, answer_headers, length)
                body: bytes = resp.raw.read(decode_content=False)
            finally:
                resp.close()
        except FusefsError:
            raise
        except Exception as exc:  # connection trouble, a stall, a body cut short
            raise map_gcs_error(exc, what) from exc
        return Answer(resp.status_code, answer_headers, body)

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

    # --- writes ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """One upload (a ``dir/`` folder marker is an empty object)."""
        blob = self.bucket.blob(key)
        self._call(self._name(key), lambda: blob.upload_from_string(
            data, content_type=BINARY, timeout=self._patient_timeout, retry=None))
        return object_info(key, blob)

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        match = (int(condition.version) if condition.version and condition.version.isdigit()
                 else None)
        try:
            self._call(self._name(key), lambda: self.bucket.blob(key).delete(
                timeout=self._timeout, retry=None, if_generation_match=match))
        except NotFound:
            return  # already absent
        except StaleVersion as exc:
            raise Conflict(f"{self._name(key)}: changed", cause=exc) from exc

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

