"""Prometheus metrics of one mount, served on ``--metrics HOST:PORT`` at ``/metrics``.

Counters and gauges are read from the mount's statistics at scrape time (the same numbers as
``cat MOUNT/.fusefs``: nothing is counted twice). Latency histograms are observed by two thin
wrappers: :class:`InstrumentedStore` around the ObjectStore (head, list, get...) and the FUSE
adapter's ``observe`` hook (lookup, getattr, read...). Every series carries a ``source`` label:
the mounted URL without any user-info part. Metric names are the constants below.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from .backends.base import Attrs, Condition, ListPage, ObjectInfo, ObjectStore, Upload
from .config import parse_host_port
from .errors import UserError
from .safety import redact_url

log = logging.getLogger(__name__)

PREFIX = "fusefs_"
STORE_LATENCY = PREFIX + "store_request_duration_seconds"
FUSE_LATENCY = PREFIX + "fuse_request_duration_seconds"
#: From 100 µs (a cached FUSE reply) to a minute (a slow store under retries).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: Connections served at once (a thread each); more are answered 503 and closed at once.
MAX_CONNECTIONS = 8
#: Seconds a connection may take to send its request (and to take the answer) before it is
#: closed: idle connections cannot pile up.
IDLE_TIMEOUT = 5.0

#: stats key -> (metric name without prefix, help); counters get ``_total`` from the library.
COUNTERS = {
    "hits": ("cache_hits", "block lookups of reads served from the cache"),
    "misses": ("cache_misses", "block lookups of reads not in the cache"),
    "bytes_served": ("served_bytes", "bytes returned to programs"),
    "bytes_fetched": ("fetched_bytes", "bytes fetched from the store"),
    "fetches": ("fetches", "ranged GETs fetched from the store"),
    "errors": ("fetch_errors", "failed fetches"),
    "evictions": ("evictions", "blocks of this mount evicted by the size bound"),
    "readahead_blocks": ("readahead_blocks", "blocks fetched ahead of sequential readers"),
    "prefetch_queued": ("prefetch_queued_files", "files given to prefetch"),
    "prefetch_done": ("prefetch_done_files", "prefetched files completed"),
    "prefetch_failed": ("prefetch_failed_files", "prefetched files that failed"),
    "prefetch_cancelled": ("prefetch_cancelled_files", "prefetched files cancelled"),
    "prefetch_bytes_queued": ("prefetch_queued_bytes", "bytes given to prefetch"),
    "prefetch_bytes_done": ("prefetch_done_bytes", "prefetched bytes completed"),
    "prefetch_bytes_failed": ("prefetch_failed_bytes", "prefetched bytes that failed"),
    "prefetch_bytes_cancelled": ("prefetch_cancelled_bytes", "prefetched bytes cancelled"),
    "uploads_done": ("uploads_done_files", "files uploaded to the store"),
    "upload_bytes": ("uploaded_bytes", "bytes of the files uploaded"),
    "conflicts": ("upload_conflicts", "uploads that found the object changed by another writer"),
    "fuse_requests_total": ("fuse_requests", "FUSE requests answered (by kind: the latency "
                            "histogram's _count, or fuse_requests in the statistics)"),
    "cpu_s": ("cpu_seconds", "CPU seconds (user + system) of the mount daemon, all threads"),
    "cpu_loop_s": ("fuse_loop_cpu_seconds", "CPU seconds of the thread answering FUSE requests"),
    "worker_fetches": ("worker_fetches", "blocks fetch worker processes fetched from the store"),
    "worker_uploads": ("worker_uploads", "uploads worker processes sent to the store"),
    "worker_lists": ("worker_lists", "listings worker processes sent and parsed"),
    "worker_restarts": ("worker_restarts", "fetch worker processes restarted after dying"),
    "worker_cpu_s": ("worker_cpu_seconds", "CPU seconds of the fetch worker processes"),
}
GAUGES = {
    "fetches_in_flight": ("fetches_in_flight", "GETs running now"),
    "current_size": ("cache_used_bytes", "bytes the cache directory holds (all its mounts)"),
    "current_count": ("cache_blocks", "items the cache directory holds"),
    "cache_size": ("cache_limit_bytes", "the cache size bound (0: cache disabled)"),
    "load_factor": ("cache_load_ratio", "cache_used_bytes / cache_limit_bytes"),
    "block_size": ("block_size_bytes", "the block size"),
    "prefetch_pending": ("prefetch_pending_files", "prefetch files not finished"),
    "prefetch_bytes_pending": ("prefetch_pending_bytes", "prefetch bytes not finished"),
    "open_files": ("open_files", "open file handles"),
    "staged_bytes": ("staged_bytes", "bytes the staging area holds (written, not yet uploaded)"),
    "uploads_pending": ("uploads_pending_files", "files waiting for their upload"),
    "uploads_failed": ("uploads_failed_files", "files whose last upload attempt failed (kept)"),
    "deletes_pending": ("deletes_pending", "removed names whose object is still in the store "
                        "(a descriptor reads it, or its delete is retried)"),
    "uptime_s": ("uptime_seconds", "seconds since the mount started"),
    "fetch_workers": ("fetch_workers", "fetch worker processes (0: fetches in the daemon)"),
}


def source_label(source: str) -> str:
    """The source URL without user-info (``s3://key:secret@b`` -> ``s3://b``) or query."""
    return redact_url(source) or ""


class StatsCollector(Collector):
    """Every counter and gauge of the mount's statistics, read at scrape time."""

    def __init__(self, read_stats: Callable[[], dict[str, Any]], source: str) -> None:
        self._read = read_stats
        self._source = source_label(source)

    def _snapshot(self) -> dict[str, Any]:
        # read from the scrape thread while the mount runs: a dict that changes size during
        # the read is simply read again
        for _ in range(5):
            try:
                return self._read()
            except RuntimeError:
                time.sleep(0.001)
        return self._read()

    def collect(self) -> Iterable[Metric]:
        stats = self._snapshot()
        labels = ["source"]
        info = GaugeMetricFamily(PREFIX + "mount_info", "the mount (always 1)",
                                 labels=["source", "cache_dir"])
        info.add_metric([self._source, str(stats.get("cache_dir") or "")], 1)
        yield info
        for key, (name, doc) in COUNTERS.items():
            if stats.get(key) is not None:
                c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
                c.add_metric([self._source], float(stats[key]))
                yield c
        for key, (name, doc) in GAUGES.items():
            if stats.get(key) is not None:
                g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
                g.add_metric([self._source], float(stats[key]))
                yield g


class _Handler(BaseHTTPRequestHandler):
    """``GET /metrics`` (and ``HEAD``); 404 for any other path. One request per connection."""

    timeout = IDLE_TIMEOUT  # the socket's: a silent client is dropped after this long
    server: _Server

    def _reply(self, head_only: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._reply(False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._reply(True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # no line per scrape


class _Server(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections served at once, each in a daemon thread; the
    accept loop answers any more with 503 and closes them without starting a thread."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self.registry = registry
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(0)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class Metrics:
    """A mount's registry: the stats collector and the two latency histograms."""

    def __init__(self, source: str) -> None:
        disable_created_metrics()  # no *_created series: one mount, one process
        self.source = source_label(source)
        self.registry = CollectorRegistry(auto_describe=True)
        self.store_latency = Histogram(
            STORE_LATENCY, "object-store requests by operation (head, list, get...)",
            ["source", "operation"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.fuse_latency = Histogram(
            FUSE_LATENCY, "FUSE requests by operation (lookup, getattr, read...)",
            ["source", "operation"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self._fuse: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def add_stats(self, read_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(StatsCollector(read_stats, self.source))

    def store_timer(self, operation: str) -> Any:
        """The histogram child for one store operation (observe seconds on it)."""
        return self.store_latency.labels(self.source, operation)

    def observe_fuse(self, operation: str, seconds: float) -> None:
        """The FUSE adapter's hook: one request of ``operation`` took ``seconds``."""
        child = self._fuse.get(operation)
        if child is None:
            with self._lock:
                child = self._fuse.setdefault(
                    operation, self.fuse_latency.labels(self.source, operation))
        child.observe(seconds)

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``address`` in a daemon thread; UserError (one line) if the
        address is malformed, unknown or in use."""
        try:
            host, port = parse_host_port(address)
        except ValueError as exc:
            raise UserError(f"--metrics: {exc}") from None
        try:
            self._server = _Server((host, port), self.registry)
        except OSError as exc:
            raise UserError(
                f"--metrics {address}: cannot listen there ({exc.strerror or exc})") from None
        threading.Thread(target=self._server.serve_forever, name="fusefs-metrics",
                         daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class InstrumentedStore:
    """An ObjectStore that times every request of the store it wraps (histogram by operation).

    A listing is timed page by page (each page is one request).
    """

    def __init__(self, inner: ObjectStore, metrics: Metrics) -> None:
        self.inner = inner
        self.source_id = inner.source_id
        self.lists_after: bool = getattr(inner, "lists_after", True)
        self.enforces_conditions: bool = getattr(inner, "enforces_conditions", True)
        self.enforces_delete_conditions: bool = getattr(
            inner, "enforces_delete_conditions", self.enforces_conditions)
        self.prefix: str = getattr(inner, "prefix", "")
        self._t = {op: metrics.store_timer(op)
                   for op in ("check", "head", "list", "get", "put", "delete", "put_file",
                              "copy", "set_attrs")}

    def check(self) -> None:
        with self._t["check"].time():
            self.inner.check()

    def head(self, key: str) -> ObjectInfo:
        with self._t["head"].time():
            return self.inner.head(key)

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        pages = iter(self.inner.list(prefix, max_keys=max_keys, start_after=start_after))
        timer = self._t["list"]
        while True:
            start = time.perf_counter()
            try:
                page = next(pages, None)
            except BaseException:
                timer.observe(time.perf_counter() - start)
                raise
            if page is None:  # the end of the listing: no request was made
                return
            timer.observe(time.perf_counter() - start)
            yield page

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        with self._t["get"].time():
            return self.inner.get_range(key, start, length, version)

    def put(self, key: str, data: bytes) -> ObjectInfo:
        with self._t["put"].time():
            return self.inner.put(key, data)

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        with self._t["delete"].time():
            self.inner.delete(key, condition=condition)

    def put_file(
        self, key: str, upload: Upload, *, condition: Condition = Condition(),
        attrs: Attrs | None = None, progress: Callable[[int], None] | None = None,
    ) -> ObjectInfo:
        """Timed as one operation (a multipart upload's parts are not timed one by one)."""
        with self._t["put_file"].time():
            return self.inner.put_file(key, upload, condition=condition, attrs=attrs,
                                       progress=progress)

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        with self._t["copy"].time():
            return self.inner.copy(src, version, dst, condition=condition)

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        with self._t["set_attrs"].time():
            return self.inner.set_attrs(key, version, attrs)

    def abort_upload(self, key: str, upload_id: str) -> None:
        abort = getattr(self.inner, "abort_upload", None)
        if abort is not None:
            abort(key, upload_id)
