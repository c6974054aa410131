"""What :class:`~fusefs.testing.proxy.CountingProxy` records of a request (:class:`Request`),
and what kind of store request it is: an object GET, a listing, a HEAD (S3 path-style, GCS
JSON/XML APIs, Azure Blob path-style).

Invariants: the classification reads only the recorded method, path and query (never the
body); the predicates are pure. A request's recorded headers never hold credentials.
Only standard-library modules are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote


@dataclass
class Request:
    """One request seen by the proxy (times are :func:`time.monotonic` values)."""

    method: str
    path: str  #: percent-decoded path, without the query string
    query: dict[str, str]  #: decoded query parameters (last value wins)
    headers: dict[str, str]  #: request headers with lower-cased names, minus credentials
    target: str  #: the raw request target as sent: quoted path plus query
    started: float
    connection: int  #: serial number of the client connection that carried it
    finished: float | None = None
    first_byte: float | None = None  #: when the response status line was sent
    status: int | None = None
    bytes_in: int = 0  #: request body bytes forwarded
    bytes_out: int = 0  #: response body bytes relayed
    error: str | None = None
    fault: str | None = None  #: the fault injected into this request, if any

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return a request header by case-insensitive name."""
        return self.headers.get(name.lower(), default)

    @property
    def range(self) -> str | None:
        """The ``Range`` header, if any."""
        return self.headers.get("range")

    @property
    def duration(self) -> float | None:
        """Seconds from receiving the request to finishing the response, once finished."""
        return None if self.finished is None else self.finished - self.started


# --------------------------------------------------------------------------------------
# Request classification (S3 path-style, GCS JSON/XML APIs, Azure Blob path-style)

_GCS_OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/[^/]+/o/.+$")
_GCS_LIST = re.compile(r"^/storage/v1/b/[^/]+/o/?$")
GCS_API = re.compile(r"^/(?:download/|upload/|batch/)?storage/v1(?:/|$)")
# S3 sub-resources that turn a GET on /bucket or /bucket/key into some other operation.
_S3_SUBRESOURCES = frozenset(
    {
        "accelerate", "acl", "analytics", "attributes", "cors", "delete", "delimiter",
        "encoding-type", "encryption", "intelligent-tiering", "inventory", "legal-hold",
        "lifecycle", "list-type", "location", "logging", "marker", "max-keys", "metrics",
        "notification", "object-lock", "ownershipControls", "policy", "policyStatus",
        "prefix", "publicAccessBlock", "replication", "requestPayment", "restore",
        "retention", "select", "tagging", "torrent", "uploadId", "uploads", "versioning",
        "versions", "website",
    }
)  # fmt: skip
_S3_LIST_PARAMS = frozenset(
    {
        "list-type", "prefix", "delimiter", "marker", "max-keys", "continuation-token",
        "start-after", "encoding-type", "fetch-owner",
    }
)  # fmt: skip


def _s3_parts(path: str) -> tuple[str, str] | None:
    """Split a path-style S3 path into (bucket, key); None for non-S3 paths."""
    if not path.startswith("/") or path == "/" or GCS_API.match(path):
        return None
    bucket, _, key = path[1:].partition("/")
    return bucket, key


def is_object_get(req: Request) -> bool:
    """True for an object data download.

    Covers an S3 GetObject (path-style ``GET /bucket/key`` without a listing or other
    sub-resource query parameter; ranged GETs included) and a GCS media download
    (``GET [/download]/storage/v1/b/B/o/KEY?alt=media``, or XML-style ``GET /B/KEY``), and an
    Azure Get Blob (``GET /account/container/blob`` without ``comp``/``restype``).
    """
    if req.method != "GET":
        return False
    if "comp" in req.query or "restype" in req.query:  # an Azure operation other than Get Blob
        return False
    if GCS_API.match(req.path):
        return req.query.get("alt") == "media" and bool(_GCS_OBJECT.match(req.path))
    parts = _s3_parts(req.path)
    if parts is None or not parts[1]:
        return False
    if req.query.get("x-id", "GetObject") != "GetObject":
        return False
    return not any(name in _S3_SUBRESOURCES for name in req.query)


def is_list(req: Request) -> bool:
    """True for an object listing: S3 ListObjects/ListObjectsV2, GCS ``objects.list`` or an
    Azure List Blobs (``?restype=container&comp=list``)."""
    if req.method != "GET":
        return False
    if req.query.get("comp") == "list":
        return req.query.get("restype") == "container"
    if GCS_API.match(req.path):
        return bool(_GCS_LIST.match(req.path))
    if "list-type" in req.query:
        return True
    parts = _s3_parts(req.path)
    if parts is None or parts[1]:
        return False
    return all(name in _S3_LIST_PARAMS or name not in _S3_SUBRESOURCES for name in req.query)


def is_file_head(req: Request) -> bool:
    """:func:`is_head` of an object that is not a folder's marker (a key ending in ``/``,
    whose HEAD a folder's first lookup makes)."""
    return is_head(req) and not unquote(req.path).endswith("/")


def is_head(req: Request) -> bool:
    """True for an object/bucket stat: any ``HEAD``, or a GCS JSON object metadata GET.

    GCS has no HEAD in its JSON API; ``GET /storage/v1/b/B/o/KEY`` without ``alt=media`` is
    the equivalent of S3 HeadObject, so it is counted here rather than as an object get.
    """
    if req.method == "HEAD":
        return True
    return (
        req.method == "GET"
        and req.path.startswith("/storage/v1/")
        and bool(_GCS_OBJECT.match(req.path))
        and req.query.get("alt", "json") != "media"
    )
