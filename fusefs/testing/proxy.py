"""A counting, latency-injecting HTTP/1.1 reverse proxy for tests and benchmarks.

:class:`CountingProxy` sits between a client (boto3, google-cloud-storage, fusefs) and an
object-store server (moto, fake-gcs-server, ...).  It records every request that reaches the
server and can add latency in user space, since the test kernel has no ``sch_netem``:

* ``latency_ms`` is added once per new client connection (a TCP handshake) and once per
  request, before the first response byte is relayed (a request/response round trip);
* :meth:`CountingProxy.slow` adds an extra delay, before forwarding, to selected requests
  (models a server that is slow for some objects);
* :meth:`CountingProxy.faults` injects seeded faults into a share of selected requests: error
  answers (500, 503 SlowDown, 403), a reset connection, a body cut short, a stall before the
  answer or in the middle of the body, a wrong (short) ``Content-Length``, a whole-object 200
  for a ranged request, and responses without ETags (see :data:`FAULTS`).

Requests and responses are relayed byte for byte (the ``Host`` header is kept, so AWS SigV4
signatures stay valid) and bodies are streamed, never buffered whole.  Only the hop-by-hop
``Connection``/``Keep-Alive`` headers are dropped, and a response without a ``Content-Length``
is re-framed with chunked encoding.  Each client connection gets its own thread and its own
kept-alive upstream connection, so delays of concurrent requests overlap.

Only standard-library modules are used.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import random
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["FAULTS", "CountingProxy", "Request", "is_head", "is_list", "is_object_get"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024  # relay buffer size
_REPLAYABLE_BODY = 1 << 20  # request bodies up to this size are buffered so they can be retried
_MAX_LINE = 65536
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})
_NOT_RECORDED = frozenset({"authorization", "proxy-authorization", "x-amz-security-token"})

SlowPredicate = Callable[[str, str], bool]

#: Fault kinds of :meth:`CountingProxy.faults`:
#: ``500``, ``503`` (S3 ``SlowDown`` XML, or a GCS JSON error), ``403`` (AccessDenied), ``401`` (an
#: expired or refused token): an error answer, the server never sees the request; ``reset``: the
#: connection is reset (RST) with no answer; ``truncate``: the headers announce the whole body, half
#: of it is sent, then the connection is closed; ``stall``: nothing is sent for ``stall_s``, then
#: the request is served; ``stall_body``: half the body, ``stall_s`` of silence, then the rest;
#: ``short_length``: a well-framed answer whose ``Content-Length`` and body lack their last third
#: (what a broken middlebox does); ``full_200``: the ``Range`` header is dropped, so the whole
#: object comes back as a 200; ``no_etag``: the ``ETag`` header and listing ``<ETag>`` elements are
#: removed; ``corrupt``: one byte in the middle of the body is flipped (length and headers
#: unchanged).
FAULTS = ("500", "503", "403", "401", "reset", "truncate", "stall", "stall_body", "short_length",
          "full_200", "no_etag", "corrupt")
_BODY_FAULTS = frozenset({"truncate", "stall_body", "short_length", "no_etag", "corrupt"})
_ETAG_XML = re.compile(rb"<ETag>[^<]*</ETag>")


@dataclass
class _FaultRule:
    rate: float
    kinds: tuple[str, ...]
    predicate: Callable[[Request], bool] | None
    rng: random.Random
    stall_s: float


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
_GCS_API = re.compile(r"^/(?:download/|upload/|batch/)?storage/v1(?:/|$)")
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
    if not path.startswith("/") or path == "/" or _GCS_API.match(path):
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
    if _GCS_API.match(req.path):
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
    if _GCS_API.match(req.path):
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


# --------------------------------------------------------------------------------------
# Implementation


class _ClientGone(Exception):
    """The client connection failed while we were reading from or writing to it."""


class _UpstreamConnection(http.client.HTTPConnection):
    """An upstream connection that reports each (re)connect to the proxy."""

    def __init__(self, proxy: CountingProxy) -> None:
        super().__init__(proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout)
        self._proxy = proxy

    def connect(self) -> None:
        super().connect()
        self._proxy._count_upstream_connect()


def _is_stale(sock: socket.socket) -> bool:
    """True if an idle kept-alive socket was closed by the peer (or has unexpected data)."""
    try:
        if hasattr(select, "poll"):  # unlike select(), works for fds >= FD_SETSIZE
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], proxy: CountingProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"CountingProxy-{self.server_address[1]}-conn",
            daemon=True,
        )
        self.proxy._register(thread, request)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.proxy._unregister(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("proxy: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    proxy: CountingProxy
    upstream: _UpstreamConnection | None = None

    # -- connection lifecycle -----------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.proxy = self.server.proxy
        self.upstream = None
        self.conn_id = self.proxy._attach(self)

    def handle(self) -> None:
        self.proxy._delay(self.proxy.latency_ms / 1000.0)  # connection set-up cost
        if not self.proxy._stopping.is_set():
            super().handle()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("proxy %s: " + format, self.address_string(), *args)

    # -- one request --------------------------------------------------------------------

    def _proxy_request(self) -> None:
        proxy = self.proxy
        rec = proxy._record_start(self.command, self.path, self.headers, self.conn_id)
        try:
            self._forward(rec)
        except _ClientGone as exc:
            rec.error = f"client gone: {exc.__cause__ or exc}"
            log.debug("proxy: client went away during %s %s: %s", rec.method, rec.target, exc)
            self.close_connection = True
            if self.upstream is not None:
                self.upstream.close()  # the upstream response may be half read
        finally:
            rec.finished = time.monotonic()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _proxy_request

    def _forward(self, rec: Request) -> None:
        proxy = self.proxy
        headers = self._upstream_headers()
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = 0
        if not chunked:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ValueError(length)
            except ValueError:
                self.close_connection = True
                self._reply_error(rec, 400, "bad Content-Length")
                return
        body: bytes | None = None
        if not chunked and length <= _REPLAYABLE_BODY:
            body = self._read_client(length)
            rec.bytes_in = length

        raw_query = rec.target.partition("?")[2]
        path_with_query = f"{rec.path}?{raw_query}" if "?" in rec.target else rec.path
        proxy._delay(proxy._slow_delay(rec.method, path_with_query))
        fault = rec.fault = proxy._pick_fault(rec)
        if fault in ("500", "503", "403", "401"):
            if body is None:
                self.close_connection = True  # the request body is unread
            self._reply_fault(rec, int(fault))
            return
        if fault == "reset":
            self._reset(rec)
            return
        if fault == "stall":
            proxy._delay(proxy._fault_stall())
        if fault == "full_200":
            headers = [(n, v) for n, v in headers if n.lower() != "range"]

        resp: http.client.HTTPResponse | None = None
        for attempt in (0, 1):
            conn = self._upstream_connection()
            reused = conn.sock is not None
            try:
                self._send_upstream(conn, headers, rec, body, chunked, length)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt == 0 and reused and body is not None and not proxy._stopping.is_set():
                    log.debug("proxy: upstream connection dropped (%s); reconnecting", exc)
                    continue
                log.debug("proxy: upstream request %s %s failed: %s", rec.method, rec.target, exc)
                if body is None:
                    self.close_connection = True  # the client body may be partly unread
                self._reply_error(rec, 502, f"upstream error: {exc!r}")
                return
        assert resp is not None
        if fault in _BODY_FAULTS:
            self._relay_faulty(rec, conn, resp, fault)
        else:
            self._relay_response(rec, conn, resp)

    def _upstream_headers(self) -> list[tuple[str, str]]:
        extra_hop = {
            token.strip().lower()
            for value in self.headers.get_all("Connection", [])
            for token in value.split(",")
        }
        return [
            (name, value)
            for name, value in self.headers.items()
            if name.lower() not in _HOP_BY_HOP and name.lower() not in extra_hop
        ]

    def _upstream_connection(self) -> _UpstreamConnection:
        conn = self.upstream
        if conn is None:
            conn = self.upstream = _UpstreamConnection(self.proxy)
        elif conn.sock is not None and _is_stale(conn.sock):
            log.debug("proxy: kept-alive upstream connection was closed; reconnecting")
            conn.close()
        return conn

    def _send_upstream(
        self,
        conn: _UpstreamConnection,
        headers: list[tuple[str, str]],
        rec: Request,
        body: bytes | None,
        chunked: bool,
        length: int,
    ) -> None:
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if "Host" not in self.headers:
            conn.putheader("Host", self.proxy._up_netloc)
        conn.endheaders()
        if body is not None:
            if body:
                conn.send(body)
        elif chunked:
            self._relay_chunked_body(conn, rec)
        else:
            remaining = length
            while remaining:
                data = self._read_client(min(_CHUNK, remaining))
                conn.send(data)
                remaining -= len(data)
                rec.bytes_in += len(data)

    def _read_client(self, n: int) -> bytes:
        try:
            data = self.rfile.read(n) if n else b""
        except OSError as exc:
            raise _ClientGone("reading request body") from exc
        if len(data) != n:
            raise _ClientGone("request body truncated")
        return data

    def _readline_client(self) -> bytes:
        try:
            line = self.rfile.readline(_MAX_LINE + 1)
        except OSError as exc:
            raise _ClientGone("reading chunked request body") from exc
        if not line.endswith(b"\n") or len(line) > _MAX_LINE:
            raise _ClientGone("bad chunked request body")
        return line

    def _relay_chunked_body(self, conn: _UpstreamConnection, rec: Request) -> None:
        """Forward a chunked request body verbatim (framing, extensions and trailers)."""
        while True:
            line = self._readline_client()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _ClientGone("bad chunk size line") from exc
            conn.send(line)
            if size == 0:
                while True:  # trailers, then the final empty line
                    line = self._readline_client()
                    conn.send(line)
                    if line in (b"\r\n", b"\n"):
                        return
            remaining = size
            while remaining:
                data = self._read_client(min(_CHUNK, remaining))
                conn.send(data)
                remaining -= len(data)
            rec.bytes_in += size
            conn.send(self._readline_client())  # CRLF after the chunk data

    def _relay_response(
        self, rec: Request, conn: _UpstreamConnection, resp: http.client.HTTPResponse
    ) -> None:
        proxy = self.proxy
        proxy._delay(proxy.latency_ms / 1000.0)  # hold back the first response byte
        has_body = self.command != "HEAD" and resp.status >= 200 and resp.status not in (204, 304)
        mode = "length"
        if has_body and resp.length is None:  # chunked or read-until-close upstream
            mode = "chunked" if self.request_version >= "HTTP/1.1" else "close"

        self.send_response_only(resp.status, resp.reason or None)
        for name, value in resp.getheaders():
            lname = name.lower()
            if lname in _HOP_BY_HOP or (mode != "length" and lname == "transfer-encoding"):
                continue
            self.send_header(name, value)
        if mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        if mode == "close" or self.close_connection:
            self.send_header("Connection", "close")
        rec.status = resp.status
        rec.first_byte = time.monotonic()
        self._write_client(None)

        if not has_body:
            resp.close()
            return
        while True:
            try:
                data = resp.read1(_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                # Cannot signal this to the client other than by closing the connection.
                rec.error = f"upstream failed mid-body: {exc!r}"
                log.debug("proxy: upstream failed mid-body for %s: %s", rec.target, exc)
                conn.close()
                self.close_connection = True
                return
            if not data:
                break
            if mode == "chunked":
                self._write_client(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._write_client(data)
            rec.bytes_out += len(data)
        if mode == "chunked":
            self._write_client(b"0\r\n\r\n")
        elif mode == "close":
            self.close_connection = True
        resp.close()

    def _relay_faulty(
        self, rec: Request, conn: _UpstreamConnection, resp: http.client.HTTPResponse, fault: str
    ) -> None:
        """Relay a response (buffered whole) with ``fault`` applied to its headers or body."""
        proxy = self.proxy
        try:
            body = resp.read() if self.command != "HEAD" else b""
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            self._reply_error(rec, 502, f"upstream error: {exc!r}")
            return
        proxy._delay(proxy.latency_ms / 1000.0)
        if fault == "no_etag":
            body = _ETAG_XML.sub(b"", body)
        if fault == "corrupt" and body:
            mid = len(body) // 2
            body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1 :]
        announced = len(body)
        if fault == "short_length" and len(body) > 1:
            body = body[: len(body) - max(1, len(body) // 3)]
            announced = len(body)
        self.send_response_only(resp.status, resp.reason or None)
        for name, value in resp.getheaders():
            lname = name.lower()
            if lname in _HOP_BY_HOP or lname in ("transfer-encoding", "content-length"):
                continue
            if fault == "no_etag" and lname == "etag":
                continue
            self.send_header(name, value)
        if self.command == "HEAD":
            length = resp.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(announced))
        rec.status = resp.status
        rec.first_byte = time.monotonic()
        self._write_client(None)
        half = len(body) // 2
        if fault == "truncate" and body:
            self._write_client(body[:half])
            rec.bytes_out += half
            self.close_connection = True
            conn.close()
            return
        if fault == "stall_body" and body:
            self._write_client(body[:half])
            self.wfile.flush()
            proxy._delay(proxy._fault_stall())
            self._write_client(body[half:])
        elif body:
            self._write_client(body)
        rec.bytes_out += len(body)

    def _reply_fault(self, rec: Request, status: int) -> None:
        """An error answer shaped like the store's own (S3 XML, GCS JSON)."""
        code, message = {
            500: ("InternalError", "We encountered an internal error. Please try again."),
            503: ("SlowDown", "Please reduce your request rate."),
            403: ("AccessDenied", "Access Denied"),
            401: ("Unauthorized", "Invalid Credentials"),
        }[status]
        if _GCS_API.match(rec.path):
            body = json.dumps({"error": {"code": status, "message": message}}).encode()
            ctype = "application/json; charset=UTF-8"
        else:
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>fault</RequestId></Error>").encode()
            ctype = "application/xml"
        self.proxy._delay(self.proxy.latency_ms / 1000.0)
        self.send_response_only(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        rec.status = status
        rec.first_byte = time.monotonic()
        self._write_client(None)
        self._write_client(body)

    def _reset(self, rec: Request) -> None:
        """Drop the client connection with a TCP reset, answering nothing."""
        rec.error = "fault: connection reset"
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True

    def _write_client(self, data: bytes | None) -> None:
        """Write ``data`` to the client, or flush the buffered headers if ``data`` is None."""
        try:
            if data is None:
                self.end_headers()
            else:
                self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone("writing response") from exc

    def _reply_error(self, rec: Request, status: int, message: str) -> None:
        self.proxy._delay(self.proxy.latency_ms / 1000.0)
        body = f"CountingProxy: {message}\n".encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        rec.status = status
        rec.error = rec.error or message
        rec.first_byte = time.monotonic()
        self._write_client(None)
        self._write_client(body)


class CountingProxy:
    """Threaded HTTP/1.1 reverse proxy that counts requests and adds latency.

    ``upstream`` is a base URL such as ``"http://127.0.0.1:5000"``.  ``latency_ms`` (which may
    be changed while running) is added once per new client connection and once per request
    before its first response byte.  Use as a context manager or call :meth:`start` /
    :meth:`stop`.
    """

    def __init__(
        self,
        upstream: str,
        latency_ms: float = 0.0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout: float | None = 300.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"upstream must not have a path or query: {upstream!r}")
        self.upstream = upstream
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._up_netloc = parts.netloc
        self.latency_ms = float(latency_ms)
        self.upstream_timeout = upstream_timeout
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._connections = 0
        self._upstream_connections = 0
        self._conn_serial = 0
        self._slow: tuple[SlowPredicate | None, float] | None = None
        self._fault: _FaultRule | None = None
        self._fault_counts: collections.Counter[str] = collections.Counter()
        self._active: dict[threading.Thread, tuple[socket.socket, _Handler | None]] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._bound: tuple[str, int] = (host, port)
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CountingProxy:
        """Bind, start serving in a background thread and return ``self``."""
        if self._server is not None:
            raise RuntimeError("CountingProxy already started")
        self._stopping.clear()
        server = _Server((self._host, self._port), self)
        bound_host, bound_port = server.server_address[:2]
        if not isinstance(bound_host, str):
            bound_host = bytes(bound_host).decode()
        self._bound = (bound_host, int(bound_port))
        self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"CountingProxy-{server.server_address[1]}",
            daemon=True,
        )
        self._serve_thread.start()
        log.debug("CountingProxy %s -> %s started", self.url, self.upstream)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving, drop all client and upstream connections and join all threads."""
        server, self._server = self._server, None
        if server is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()  # wakes handlers sleeping in a delay
        server.shutdown()
        server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(max(0.0, deadline - time.monotonic()))
            self._serve_thread = None
        with self._lock:
            active = list(self._active.items())
        for _thread, (sock, handler) in active:
            socks = [sock]
            if handler is not None and handler.upstream is not None and handler.upstream.sock:
                socks.append(handler.upstream.sock)
            for s in socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread, _ in active:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t, _ in active if t.is_alive()]
        if alive:
            log.warning("CountingProxy: %d connection threads still running", len(alive))

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("CountingProxy not started")
        return self._bound[1]

    @property
    def url(self) -> str:
        """Base URL of the running proxy, e.g. ``"http://127.0.0.1:41234"``."""
        if self._server is None:
            raise RuntimeError("CountingProxy not started")
        return f"http://{self._bound[0]}:{self._bound[1]}"

    # -- fault injection -------------------------------------------------------------------

    def slow(self, predicate: SlowPredicate | None, delay_s: float) -> None:
        """Delay requests selected by ``predicate(method, path_with_query)`` by ``delay_s``.

        The delay is applied before forwarding, so it models a slow server.  The path is
        percent-decoded; the query string is appended raw.  ``predicate=None`` selects every
        request; ``delay_s <= 0`` removes the rule.  A new call replaces the previous rule.
        """
        with self._lock:
            self._slow = (predicate, float(delay_s)) if delay_s > 0 else None

    def faults(
        self,
        rate: float,
        kinds: tuple[str, ...] | list[str] = FAULTS,
        *,
        predicate: Callable[[Request], bool] | None = None,
        seed: int = 0,
        stall_s: float = 30.0,
    ) -> None:
        """Inject a fault into a ``rate`` share of the requests ``predicate`` selects (every
        request if None), each a kind drawn from ``kinds`` (see :data:`FAULTS`) by a generator
        seeded with ``seed``. ``stall_s``: the length of a stall. ``rate <= 0`` removes the rule;
        a new call replaces the previous one. :meth:`fault_counts` tells what was injected.
        """
        unknown = set(kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        with self._lock:
            self._fault = (
                _FaultRule(float(rate), tuple(kinds), predicate, random.Random(seed), stall_s)
                if rate > 0 and kinds
                else None
            )

    def fault_counts(self) -> collections.Counter[str]:
        """Faults injected per kind since the last :meth:`reset`."""
        with self._lock:
            return collections.Counter(self._fault_counts)

    # -- statistics ------------------------------------------------------------------------

    def counts(self) -> collections.Counter[tuple[str, str]]:
        """Requests per ``(method, path)`` (path percent-decoded, without query string)."""
        with self._lock:
            return collections.Counter(self._counts)

    def requests(self) -> list[Request]:
        """All requests since the last :meth:`reset`, in arrival order (live records)."""
        with self._lock:
            return list(self._requests)

    def count(
        self,
        method: str | None = None,
        *,
        path_prefix: str | None = None,
        predicate: Callable[[Request], bool] | None = None,
    ) -> int:
        """Number of recorded requests matching all of the given filters."""
        return sum(
            1
            for r in self.requests()
            if (method is None or r.method == method.upper())
            and (path_prefix is None or r.path.startswith(path_prefix))
            and (predicate is None or predicate(r))
        )

    @property
    def connections(self) -> int:
        """Client connections accepted since the last :meth:`reset`."""
        with self._lock:
            return self._connections

    @property
    def upstream_connections(self) -> int:
        """Upstream connections opened since the last :meth:`reset`."""
        with self._lock:
            return self._upstream_connections

    def reset(self) -> None:
        """Forget recorded requests and zero all counters."""
        with self._lock:
            self._requests.clear()
            self._counts.clear()
            self._connections = 0
            self._upstream_connections = 0
            self._fault_counts.clear()

    # -- internals used by the handler -----------------------------------------------------

    def _register(self, thread: threading.Thread, sock: socket.socket) -> None:
        with self._lock:
            self._active[thread] = (sock, None)

    def _attach(self, handler: _Handler) -> int:
        thread = threading.current_thread()
        with self._lock:
            if thread in self._active:
                self._active[thread] = (self._active[thread][0], handler)
            self._connections += 1
            self._conn_serial += 1
            return self._conn_serial

    def _unregister(self, thread: threading.Thread) -> None:
        with self._lock:
            self._active.pop(thread, None)

    def _count_upstream_connect(self) -> None:
        with self._lock:
            self._upstream_connections += 1

    def _record_start(self, method: str, target: str, headers: Any, conn_id: int) -> Request:
        raw_path, _, raw_query = target.partition("?")
        recorded: dict[str, str] = {}
        for name, value in headers.items():
            lname = name.lower()
            if lname not in _NOT_RECORDED:
                recorded[lname] = f"{recorded[lname]}, {value}" if lname in recorded else value
        rec = Request(
            method=method,
            path=unquote(raw_path),
            query=dict(parse_qsl(raw_query, keep_blank_values=True)),
            headers=recorded,
            target=target,
            started=time.monotonic(),
            connection=conn_id,
        )
        with self._lock:
            self._requests.append(rec)
            self._counts[(rec.method, rec.path)] += 1
        return rec

    def _slow_delay(self, method: str, path_with_query: str) -> float:
        rule = self._slow
        if rule is None:
            return 0.0
        predicate, delay = rule
        if predicate is None:
            return delay
        try:
            return delay if predicate(method, path_with_query) else 0.0
        except Exception:
            log.debug("proxy: slow() predicate raised", exc_info=True)
            return 0.0

    def _pick_fault(self, rec: Request) -> str | None:
        rule = self._fault
        if rule is None:
            return None
        try:
            if rule.predicate is not None and not rule.predicate(rec):
                return None
        except Exception:
            log.debug("proxy: faults() predicate raised", exc_info=True)
            return None
        with self._lock:
            hit = rule.rng.random() < rule.rate
            kind = rule.rng.choice(rule.kinds)
            if not hit or (kind == "full_200" and not rec.range):
                return None
            self._fault_counts[kind] += 1
        return kind

    def _fault_stall(self) -> float:
        rule = self._fault
        return rule.stall_s if rule is not None else 0.0

    def _delay(self, seconds: float) -> None:
        """Sleep in the calling handler thread; cut short by :meth:`stop`."""
        if seconds > 0:
            self._stopping.wait(seconds)
