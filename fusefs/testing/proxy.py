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

The relay itself is :mod:`.proxy_relay`; :mod:`.proxy_requests` records and classifies
requests (``Request``, ``is_object_get``, ``is_list``, ``is_head``, ``is_file_head``: part of
this module's API).

Only standard-library modules are used.
"""

from __future__ import annotations

import collections
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .proxy_relay import RelayHandler, RelayServer
from .proxy_requests import Request, is_file_head, is_head, is_list, is_object_get

__all__ = [
    "FAULTS", "CountingProxy", "Request", "is_file_head", "is_head", "is_list", "is_object_get"
]

log = logging.getLogger(__name__)

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


@dataclass
class _FaultRule:
    rate: float
    kinds: tuple[str, ...]
    predicate: Callable[[Request], bool] | None
    rng: random.Random
    stall_s: float


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
        self._active: dict[threading.Thread, tuple[socket.socket, RelayHandler | None]] = {}
        self._stopping = threading.Event()
        self._server: RelayServer | None = None
        self._bound: tuple[str, int] = (host, port)
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CountingProxy:
        """Bind, start serving in a background thread and return ``self``."""
        if self._server is not None:
            raise RuntimeError("CountingProxy already started")
        self._stopping.clear()
        server = RelayServer((self._host, self._port), self)
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

    def _attach(self, handler: RelayHandler) -> int:
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
