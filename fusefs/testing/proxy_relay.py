"""The relay of :class:`~fusefs.testing.proxy.CountingProxy`: its HTTP server, one thread
per client connection, each with its own kept-alive upstream connection, relaying requests
and responses and injecting the proxy's delays and faults.

Invariants: requests and responses are relayed byte for byte (the ``Host`` header kept, so
SigV4 signatures stay valid), bodies streamed (a request body up to ``_REPLAYABLE_BODY`` is
buffered so that a stale kept-alive upstream connection can be retried), never buffered
whole; only the hop-by-hop headers are dropped, and a response without a ``Content-Length`` is
re-framed with chunked encoding. Every request is recorded (``CountingProxy._record_start``)
before it is forwarded. Only standard-library modules are used.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .proxy_requests import GCS_API, Request

if TYPE_CHECKING:
    from .proxy import CountingProxy

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024  # relay buffer size
_REPLAYABLE_BODY = 1 << 20  # request bodies up to this size are buffered so they can be retried
_MAX_LINE = 65536
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})
_BODY_FAULTS = frozenset({"truncate", "stall_body", "short_length", "no_etag", "corrupt"})
_ETAG_XML = re.compile(rb"<ETag>[^<]*</ETag>")


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


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], proxy: CountingProxy) -> None:
        self.proxy = proxy
        super().__init__(address, RelayHandler)

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


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: RelayServer
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
        if GCS_API.match(rec.path):
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
