"""Azure Blob Storage through azure-storage-blob: ``az://container[/prefix]``.

Credentials, first found wins: ``AZURE_STORAGE_CONNECTION_STRING``; ``AZURE_STORAGE_ACCOUNT``
with ``AZURE_STORAGE_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``; ``DefaultAzureCredential`` (Entra
ID: environment, workload/managed identity, Azure CLI...) when azure-identity is installed.
``endpoint_url`` replaces the account URL (Azurite ``http://127.0.0.1:10000/devstoreaccount1``,
sovereign clouds). Versions are ETags; ranged reads carry ``If-Match``. Keys, SAS tokens and
connection strings never reach a log line, an error message or ``source_id``.

Parts: :class:`AzureStore` (the one store class) here; credentials and the Shared Key signer
in :mod:`.azure_auth`; the lean GET path in :mod:`.azure_lean`; versions and error mapping in
:mod:`.azure_common`; uploads, copies and metadata changes in :mod:`.azure_write`. Imports go
one way: store -> write -> common, store -> lean -> auth.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit
from xml.etree import ElementTree

from azure.core import MatchConditions
from azure.core import exceptions as aexc
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.storage.blob import BlobPrefix, ContainerClient, ExponentialRetry

from ..errors import (
    Conflict,
    FusefsError,
    NotFound,
    StaleVersion,
)
from .attrs import decode as meta_decode
from .attrs import owner as meta_owner
from .attrs import rdev as meta_rdev
from .attrs import token as meta_token
from .azure_auth import (
    ACCOUNT_ENV,
    CONNECTION_STRING_ENV,
    KEY_ENV,
    SAS_ENV,
    SharedKey,
    parse_connection_string,
    redact_account_url,
    resolve_credentials,
)
from .azure_common import epoch, etag_version, map_azure_error
from .azure_lean import SDK_STATUSES, LeanBlobGet, account_session
from .azure_write import copy as write_copy
from .azure_write import put_file as write_put_file
from .azure_write import set_attrs as write_set_attrs
from .base import Attrs, Condition, ListPage, ObjectInfo, Upload

# the credential helpers and map_azure_error are imported from here by tests and tools
__all__ = [
    "ACCOUNT_ENV",
    "CONNECTION_STRING_ENV",
    "KEY_ENV",
    "SAS_ENV",
    "AzureStore",
    "SharedKey",
    "etag_version",
    "map_azure_error",
    "parse_connection_string",
    "resolve_credentials",
]

log = logging.getLogger(__name__)

PAGE_SIZE = 5000  # the service's maximum page of a listing
#: 5 attempts, about 0.2, 1.7, 2.5 and 3.6 s apart (the SDK's default waits 15 s and more)
_RETRY: dict[str, Any] = {
    "initial_backoff": 0.2,
    "increment_base": 1.5,
    "retry_total": 4,
    "random_jitter_range": 0.2,
}
#: socket reads of up to 1 MiB while streaming a body (the SDK's default is 4 KiB)
_READ_CHUNK = 1 << 20


def _info(key: str, p: Any) -> ObjectInfo:
    """A blob's info from its properties (HEAD or a listing item), metadata included."""
    meta_mtime, mode = meta_decode(p.metadata)
    uid, gid = meta_owner(p.metadata)
    return ObjectInfo(key, int(p.size or 0), epoch(p.last_modified), etag_version(p.etag),
                      meta_mtime, mode, meta_token(p.metadata), uid, gid,
                      meta_rdev(p.metadata))


class AzureStore:
    """One Azure Blob container. Object versions are ETags.

    Ranged GETs take a lean path: one raw request through the client's own pipeline (its
    authentication, retries and transport), skipping the SDK's download machinery (operation
    layer, header deserialisation, chunked streaming: a third of a small GET's CPU). Only a
    200/206 of the right length is taken; anything else is repeated through ``download_blob``,
    which maps the error exactly.

    Writes (see :mod:`.azure_write`): one Put Blob up to ``part_size``, else staged blocks and
    one block list; conditions (ETag ``If-Match``, ``If-None-Match: *``) are enforced by Azure.
    """

    enforces_conditions = True

    def __init__(
        self,
        container: str,
        *,
        endpoint_url: str | None = None,
        max_connections: int = 32,
        page_size: int = PAGE_SIZE,
        env: dict[str, str] | None = None,
        part_size: int = 8 << 20,
        parts: int = 8,
    ) -> None:
        self.container = container
        self.page_size = page_size
        self.part_size = part_size
        self.parts = parts
        url, credential, kind = resolve_credentials(endpoint_url, env)
        account_url = redact_account_url(url)
        host = urlsplit(account_url).hostname or ""
        default = host.endswith(".blob.core.windows.net") and not endpoint_url
        self.source_id = (
            f"az://{host.split('.')[0]}/{container}" if default else f"az+{account_url}/{container}"
        )
        if isinstance(credential, str):  # a SAS token: the SDK appends it to every URL
            url = account_url
        session = account_session(account_url, max_connections)
        transport = RequestsTransport(
            session=session,
            session_owner=False,
            connection_timeout=10,
            read_timeout=60,
            connection_data_block_size=_READ_CHUNK,
        )
        try:
            self.client: Any = ContainerClient(
                url,
                container,
                credential=credential,
                retry_policy=ExponentialRetry(**_RETRY),
                transport=transport,
                max_single_get_size=256 << 20,  # one GET per block, never split
            )
        except (ValueError, aexc.AzureError) as exc:
            raise map_azure_error(exc, f"az://{container}") from exc
        base, _, query = str(self.client.url).partition("?")  # query: a SAS token, if any
        self._blob_url = (base.rstrip("/") + "/", "?" + query if query else "")
        self._pipeline = getattr(self.client, "_pipeline", None)
        self._api_version = str(getattr(self.client, "api_version", "") or "")
        self._lean = LeanBlobGet(session, account_url, credential)
        self._lean.enabled = self._lean.enabled and bool(self._api_version)
        log.debug("azure %s with %s", self.source_id, kind)

    def _name(self, key: str) -> str:
        return f"az://{self.container}/{key}"

    def check(self) -> None:
        try:
            next(iter(self.client.list_blob_names(results_per_page=1).by_page()), None)
        except Exception as exc:
            err = map_azure_error(exc, f"az://{self.container}")
            if isinstance(err, NotFound):
                raise NotFound(
                    f"container az://{self.container} does not exist", cause=exc
                ) from exc
            raise err from exc

    def head(self, key: str) -> ObjectInfo:
        if not key:
            raise NotFound(f"{self._name(key)}: not an object")
        try:
            p = self.client.get_blob_client(key).get_blob_properties()
        except Exception as exc:
            raise map_azure_error(exc, self._name(key)) from exc
        return _info(key, p)

    #: Azure Blob has no "start after" parameter: a listing after a key reads the pages before
    #: it and drops their entries, so lookups wait for a folder's fill instead (see fs.py).
    lists_after = False

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        size = min(max_keys, self.page_size) if max_keys else self.page_size
        seen = 0
        marker: str | None = None  # where the SDK takes over if a lean page is refused
        while self._pipeline is not None and self._api_version:
            lean = self._lean_list_page(prefix, size, marker)
            if lean is None:
                break  # the SDK asks for this page again (and maps its error exactly)
            objects, prefixes, marker = lean
            page = ListPage([o for o in objects if o.key > start_after],
                            [p for p in prefixes if p > start_after], bool(marker))
            seen += len(page.objects) + len(page.prefixes)
            yield page
            if not marker or (max_keys and seen >= max_keys):
                return
        try:
            pages = self.client.walk_blobs(  # metadata: the same request, a bigger answer
                name_starts_with=prefix or None, delimiter="/", results_per_page=size,
                include=["metadata"],
            ).by_page(continuation_token=marker)
            for api_page in pages:
                page = ListPage()
                page.more = bool(getattr(pages, "continuation_token", None))
                for item in api_page:
                    if start_after and item.name <= start_after:
                        continue
                    if isinstance(item, BlobPrefix):
                        page.prefixes.append(item.name)
                    else:
                        page.objects.append(_info(item.name, item))
                seen += len(page.objects) + len(page.prefixes)
                yield page
                if max_keys and seen >= max_keys:
                    return
        except FusefsError:
            raise
        except Exception as exc:
            raise map_azure_error(exc, self._name(prefix)) from exc

    def _lean_list_page(
        self, prefix: str, size: int, marker: str | None
    ) -> tuple[Sequence[ObjectInfo], Sequence[str], str | None] | None:
        """One page of a delimited listing read from the raw XML, through the client's own
        pipeline (authentication, retries, transport): (objects, prefixes, next marker), or
        None: use the SDK. The SDK's model deserialisation is most of a listing's CPU (about
        0.4 ms per object, five times S3's)."""
        params = {"restype": "container", "comp": "list", "delimiter": "/", "include": "metadata",
                  "maxresults": str(size), **({"prefix": prefix} if prefix else {}),
                  **({"marker": marker} if marker else {})}  # fmt: skip
        base, query = self._blob_url
        url = f"{base.rstrip('/')}?{urlencode(params, quote_via=quote)}"
        url += "&" + query[1:] if query else ""
        request = HttpRequest("GET", url, headers={"x-ms-version": self._api_version})
        pipeline: Any = self._pipeline
        try:
            response = pipeline.run(request).http_response
            if response.status_code != 200:
                return None
            root = ElementTree.fromstring(response.body())
        except (aexc.AzureError, ElementTree.ParseError) as exc:
            log.debug("lean listing of %r failed (%s); using the SDK", prefix, type(exc).__name__)
            return None
        blobs = root.find("Blobs")
        if blobs is None:
            return None
        objects: builtins.list[ObjectInfo] = []
        prefixes: builtins.list[str] = []
        for item in blobs:
            name_el = item.find("Name")
            if name_el is None:
                return None
            name = name_el.text or ""
            if name_el.get("Encoded", "").lower() == "true":
                name = unquote(name)
            if item.tag == "BlobPrefix":
                prefixes.append(name)
                continue
            props = item.find("Properties")
            if item.tag != "Blob" or props is None:
                return None
            modified = props.findtext("Last-Modified")
            meta = item.find("Metadata")
            pairs = {m.tag: m.text or "" for m in meta} if meta is not None else None
            meta_mtime, mode = meta_decode(pairs)
            uid, gid = meta_owner(pairs)
            objects.append(ObjectInfo(
                name, int(props.findtext("Content-Length") or 0),
                parsedate_to_datetime(modified).timestamp() if modified else 0.0,
                etag_version(props.findtext("Etag")), meta_mtime, mode, None, uid, gid,
                meta_rdev(pairs),
            ))  # fmt: skip
        return objects, prefixes, root.findtext("NextMarker") or None

    def _fast_get(self, key: str, start: int, length: int, version: str) -> bytes | None:
        """The bytes, StaleVersion if the answer has another ETag, or None: use the SDK."""
        if self._pipeline is None or not self._api_version:
            return None
        headers = {"x-ms-range": f"bytes={start}-{start + length - 1}",
                   "x-ms-version": self._api_version}
        if version:
            headers["If-Match"] = f'"{version}"'
        base, query = self._blob_url
        request = HttpRequest("GET", base + quote(key, safe="~/") + query, headers=headers)
        try:
            response = self._pipeline.run(request).http_response
        except aexc.AzureError as exc:  # retries ran out: the SDK path maps it
            log.debug("lean GET of %s failed (%s); using the SDK", key, type(exc).__name__)
            return None
        if response.status_code not in (200, 206):
            return None
        return self._accept(key, start, length, version, response.status_code, response.headers,
                            response.body())

    def _accept(self, key: str, start: int, length: int, version: str, status: int,
                headers: Mapping[str, str], data: bytes) -> bytes | None:
        """The bytes of a 200/206 answer, StaleVersion if it has another ETag, or None if it is
        not the range asked for (the SDK then asks again). A 200 without ``Content-Range`` is
        the whole blob (a server or middlebox that ignored the range): sliced here."""
        etag = etag_version(headers.get("etag"))
        if etag and version and etag != version:
            raise StaleVersion(f"{self._name(key)}: changed (ETag {etag} != {version})")
        if status == 200 and not headers.get("content-range"):
            whole = len(data)
            data = data[start : start + length]
            return data if len(data) == length or start + len(data) == whole else None
        if len(data) == length:
            return data
        total = str(headers.get("content-range", "")).rpartition("/")[2]
        at_end = total.isdigit() and start + len(data) == int(total)
        return data if at_end else None  # short only at the end of the object

    def _lean_get(self, key: str, start: int, length: int, version: str) -> bytes | bool:
        """The bytes through :class:`LeanBlobGet`, else whether the SDK must answer (True: an
        answer this path does not map) or the pipeline (False: retried there)."""
        headers = {"x-ms-range": f"bytes={start}-{start + length - 1}",
                   "x-ms-version": self._api_version}
        if version:
            headers["If-Match"] = f'"{version}"'
        base, query = self._blob_url
        answer = self._lean.get(self._name(key), base + quote(key, safe="~/") + query, headers,
                                length)  # fmt: skip
        if answer is None:
            return False
        if answer.status == 416:
            return b""  # at or past the end of the object (or an empty object)
        if answer.status in (200, 206):
            data = self._accept(key, start, length, version, answer.status, answer.headers,
                                answer.body)
            return False if data is None else data
        return answer.status in SDK_STATUSES

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        if length <= 0:
            return b""
        refused = False
        if self._lean.enabled:
            lean = self._lean_get(key, start, length, version)
            if isinstance(lean, bytes):
                return lean
            refused = lean
        fast = None if refused else self._fast_get(key, start, length, version)
        if fast is not None:
            return fast
        conditions: dict[str, Any] = (
            {"etag": f'"{version}"', "match_condition": MatchConditions.IfNotModified}
            if version
            else {}
        )
        try:
            downloader = self.client.get_blob_client(key).download_blob(
                start, length, max_concurrency=1, validate_content=False, **conditions
            )
            data: bytes = downloader.readall()
        except aexc.HttpResponseError as exc:
            if exc.status_code == 416:
                return b""  # at or past the end of the object (or an empty object)
            err = map_azure_error(exc, self._name(key))
            if isinstance(err, StaleVersion):  # Azurite answers 412 for a deleted blob too
                raise self._gone_or_stale(key, err) from exc
            raise err from exc
        except Exception as exc:
            raise map_azure_error(exc, self._name(key)) from exc
        etag = etag_version(downloader.properties.etag)
        if etag and version and etag != version:  # a server that ignores If-Match
            raise StaleVersion(f"{self._name(key)}: changed (ETag {etag} != {version})")
        if refused:
            self._lean.refused_but_sdk_worked()
        return data

    def _gone_or_stale(self, key: str, err: StaleVersion) -> FusefsError:
        """A failed If-Match: NotFound if the blob is gone, else the StaleVersion."""
        try:
            self.head(key)
        except NotFound as gone:
            return gone
        except FusefsError:
            return err
        return err

    # --- writes (see :mod:`.azure_write`) -----------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """One Put Blob (a block blob; bodies this small need no staged blocks)."""
        try:
            r = self.client.get_blob_client(key).upload_blob(
                data, overwrite=True, max_concurrency=1
            )
        except Exception as exc:
            raise map_azure_error(exc, self._name(key)) from exc
        return ObjectInfo(key, len(data), epoch(r.get("last_modified")), etag_version(r["etag"]))

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        kw: dict[str, Any] = {}
        if condition.version:
            kw = {"etag": f'"{condition.version}"',
                  "match_condition": MatchConditions.IfNotModified}
        try:
            self.client.delete_blob(key, **kw)
        except aexc.ResourceNotFoundError:
            return  # already absent
        except Exception as exc:
            err = map_azure_error(exc, self._name(key))
            if isinstance(err, StaleVersion):
                raise Conflict(f"{self._name(key)}: changed", cause=exc) from exc
            if isinstance(err, NotFound):
                return
            raise err from exc

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
