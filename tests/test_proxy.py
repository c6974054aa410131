"""Tests for fusefs.testing.proxy.CountingProxy against real servers (moto and http.server)."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from moto.server import ThreadedMotoServer

from fusefs.testing import servers
from fusefs.testing.proxy import CountingProxy, Request, is_head, is_list, is_object_get

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def no_leaked_proxy_threads() -> Iterator[None]:
    before = set(threading.enumerate())  # session-wide proxies of other test files may run
    yield
    leaked = [t.name for t in threading.enumerate()
              if t.name.startswith("CountingProxy") and t not in before]
    assert not leaked, leaked


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def proxy(moto_url: str) -> Iterator[CountingProxy]:
    with CountingProxy(moto_url) as p:
        yield p


def s3_client(endpoint: str) -> Any:
    """No retries: every request the test makes reaches the proxy exactly once."""
    return servers.s3_client(endpoint, max_attempts=1)


@pytest.fixture
def s3(proxy: CountingProxy) -> Any:
    return s3_client(proxy.url)


@pytest.fixture
def bucket(s3: Any, proxy: CountingProxy) -> str:
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    proxy.reset()
    return name


def wait_finished(proxy: CountingProxy, timeout: float = 5.0) -> list[Request]:
    """Wait until every recorded request has finished (the proxy records them live)."""
    deadline = time.monotonic() + timeout
    while True:
        reqs = proxy.requests()
        if all(r.finished is not None for r in reqs) or time.monotonic() > deadline:
            return reqs
        time.sleep(0.01)


# A plain http.server backend for framing corner cases.

STREAM_PARTS = [os.urandom(n) for n in (1, 100, 4096, 65536, 300_000, 7, 1 << 20)]
BIG_SIZE = 64 * MiB


class Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    gate: threading.Event  # set per server
    seen: list[tuple[str, str, dict[str, str]]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.served = 0

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.served += 1
        self.seen.append((self.command, self.path, dict(self.headers.items())))
        if self.path == "/stream":  # chunked, the first part held until the gate opens
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, part in enumerate(STREAM_PARTS):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part))
                if i == 0:
                    self.gate.wait(5)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/noframing":  # body delimited by connection close
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close" * 1000)
            self.close_connection = True
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_SIZE))
            self.end_headers()
            block = b"\xab" * MiB
            try:
                for _ in range(BIG_SIZE // MiB):
                    self.wfile.write(block)
            except OSError:
                self.close_connection = True
        elif self.path == "/silent-close":  # closes the kept-alive connection without notice
            self._send(200, b"ok")
            self.close_connection = True
        elif self.path == "/drop-second":  # drops the 2nd request on a connection unanswered
            if self.served >= 2:
                self.close_connection = True
                return
            self._send(200, b"served")
        else:
            self._send(200, b"hello " + self.path.encode())

    def do_POST(self) -> None:
        self.seen.append((self.command, self.path, dict(self.headers.items())))
        body = bytearray()
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body += self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(201, f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())


@pytest.fixture
def backend() -> Iterator[tuple[str, type[Backend]]]:
    handler = cast(type[Backend], type("B", (Backend,), {"gate": threading.Event(), "seen": []}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        handler.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def connect(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=10)


# --------------------------------------------------------------------------------------
# S3 through moto


def test_s3_operations_and_counts(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"dir/k{i}", Body=f"value {i}".encode())
    assert proxy.count("PUT") == 3

    proxy.reset()
    assert proxy.requests() == [] and not proxy.counts()
    n = 7
    for i in range(n):
        assert s3.get_object(Bucket=bucket, Key=f"dir/k{i % 3}")["Body"].read() == (
            f"value {i % 3}".encode()
        )
    assert proxy.count(predicate=is_object_get) == n
    assert proxy.counts()[("GET", f"/{bucket}/dir/k0")] == 3

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
    assert [o["Key"] for o in listing["Contents"]] == ["dir/k0", "dir/k1", "dir/k2"]
    head = s3.head_object(Bucket=bucket, Key="dir/k1")
    assert head["ContentLength"] == len(b"value 1")
    s3.delete_object(Bucket=bucket, Key="dir/k2")  # a 204 response
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 2

    reqs = wait_finished(proxy)
    assert proxy.count(predicate=is_object_get) == n  # lists and heads are not object gets
    assert proxy.count(predicate=is_list) == 2
    assert proxy.count(predicate=is_head) == 1
    assert proxy.count("DELETE", path_prefix=f"/{bucket}/dir/") == 1
    assert proxy.count("get", path_prefix=f"/{bucket}/dir/") == n
    assert [r.status for r in reqs if r.method == "DELETE"] == [204]
    assert all(r.status == 200 for r in reqs if r.method != "DELETE")
    lst = next(r for r in reqs if is_list(r))
    assert lst.path == f"/{bucket}" and lst.query["prefix"] == "dir/"
    assert "authorization" not in lst.headers  # credentials are not recorded
    assert len({r.connection for r in reqs}) == 1  # boto3 kept its proxy connection alive


def test_large_object_full_and_ranged_get(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    data = os.urandom(20 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data
    start, end = 3 * MiB + 17, 11 * MiB + 5
    part = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={start}-{end}")
    assert part["Body"].read() == data[start : end + 1]

    put, full, ranged = wait_finished(proxy)
    assert put.method == "PUT" and put.bytes_in == len(data)
    assert full.range is None and full.bytes_out == len(data)
    assert ranged.header("Range") == f"bytes={start}-{end}" and ranged.status == 206
    assert ranged.bytes_out == end + 1 - start
    assert proxy.count(predicate=is_object_get) == 2


def test_latency_per_request_and_connection(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    proxy.latency_ms = 50
    proxy.reset()
    t0 = time.monotonic()
    for _ in range(5):
        s3.head_object(Bucket=bucket, Key="k")
    assert time.monotonic() - t0 >= 0.25
    reqs = wait_finished(proxy)
    assert len(reqs) == 5 and proxy.connections == 0  # all on the kept-alive connection
    assert all(r.first_byte is not None and r.first_byte - r.started >= 0.05 for r in reqs)

    # A new connection pays the latency once more (connection set-up) before its request.
    conn = connect(proxy.url)
    t0 = time.monotonic()
    conn.request("GET", "/")
    conn.getresponse().read()
    assert time.monotonic() - t0 >= 0.1
    conn.close()

    proxy.latency_ms = 0  # may be changed while running
    t0 = time.monotonic()
    s3.head_object(Bucket=bucket, Key="k")
    assert time.monotonic() - t0 < 1.0


def test_latency_is_applied_in_parallel(backend: tuple[str, type[Backend]]) -> None:
    url, _ = backend
    n = 8
    with CountingProxy(url, latency_ms=200) as px:
        barrier = threading.Barrier(n)

        def one(i: int) -> None:
            conn = connect(px.url)
            barrier.wait()
            conn.request("GET", f"/p{i}")
            assert conn.getresponse().read() == f"hello /p{i}".encode()
            conn.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reqs = px.requests()
        assert px.count("GET") == n
    # Delays overlap rather than queue: every request started before any one finished
    # (an ordering property, not a timing bound).
    assert max(r.started for r in reqs) < min(r.finished for r in reqs if r.finished)
    assert all(r.duration is not None and r.duration >= 0.2 for r in reqs)


def test_slow_delays_only_matching_requests(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="A", Body=b"a" * 1000)
    s3.put_object(Bucket=bucket, Key="B", Body=b"b" * 1000)
    proxy.slow(lambda method, path: method == "GET" and path == f"/{bucket}/A", 1.0)
    proxy.reset()

    result: dict[str, bytes] = {}
    thread = threading.Thread(
        target=lambda: result.update(A=s3.get_object(Bucket=bucket, Key="A")["Body"].read())
    )
    thread.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert s3.get_object(Bucket=bucket, Key="B")["Body"].read() == b"b" * 1000
    assert time.monotonic() - t0 < 0.8
    s3.head_object(Bucket=bucket, Key="A")  # HEAD is not selected by the predicate
    thread.join(5)
    assert result["A"] == b"a" * 1000

    reqs = wait_finished(proxy)
    get_a = next(r for r in reqs if r.method == "GET" and r.path.endswith("/A"))
    get_b = next(r for r in reqs if r.method == "GET" and r.path.endswith("/B"))
    head_a = next(r for r in reqs if r.method == "HEAD")
    assert get_a.started < get_b.started
    assert get_a.finished is not None and get_b.finished is not None
    assert get_a.finished > get_b.finished
    assert (get_a.duration or 0) >= 1.0
    assert (head_a.duration or 0) < 1.0

    proxy.slow(None, 0)  # rule removed
    t0 = time.monotonic()
    s3.get_object(Bucket=bucket, Key="A")["Body"].read()
    assert time.monotonic() - t0 < 0.8


def test_stop_closes_everything(moto_url: str) -> None:
    before = set(threading.enumerate())
    px = CountingProxy(moto_url).start()
    port = px.port
    idle = connect(px.url)  # a kept-alive idle connection
    idle.request("GET", "/")
    idle.getresponse().read()
    px.slow(None, 30.0)  # and a request stuck in a long delay
    stuck = connect(px.url)
    stuck.request("GET", "/")
    time.sleep(0.1)

    t0 = time.monotonic()
    px.stop()
    assert time.monotonic() - t0 < 15.0  # did not wait for the 30 s stall
    px.stop()  # idempotent
    assert not [t for t in threading.enumerate()
                if t.name.startswith("CountingProxy") and t not in before]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    for conn in (idle, stuck):
        conn.close()


# --------------------------------------------------------------------------------------
# Framing corner cases against a plain http.server backend


def test_chunked_response_is_streamed(backend: tuple[str, type[Backend]]) -> None:
    url, handler = backend
    with CountingProxy(url) as px:
        conn = connect(px.url)
        conn.request("GET", "/stream")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        # The first part arrives while the backend is still holding back the rest.
        assert resp.read1(100) == STREAM_PARTS[0]
        handler.gate.set()
        assert STREAM_PARTS[0] + resp.read() == b"".join(STREAM_PARTS)

        # Same client connection: a response framed by connection close is re-chunked.
        conn.request("GET", "/noframing")
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read() == b"until-close" * 1000
        conn.request("GET", "/after")
        assert conn.getresponse().read() == b"hello /after"
        conn.close()
        assert px.connections == 1
        assert [r.bytes_out for r in wait_finished(px)] == [
            sum(map(len, STREAM_PARTS)),
            11000,
            len(b"hello /after"),
        ]


def test_request_bodies_forwarded_exactly(backend: tuple[str, type[Backend]]) -> None:
    url, handler = backend
    parts = [os.urandom(n) for n in (10, 70_000, 1, 2 * MiB)]
    blob = b"".join(parts)
    digest = hashlib.sha256(blob).hexdigest()
    with CountingProxy(url) as px:
        conn = connect(px.url)
        conn.request("POST", "/chunked?x=1", body=iter(parts), encode_chunked=True)
        assert conn.getresponse().read() == f"{len(blob)} {digest}".encode()
        conn.request("POST", "/sized", body=blob, headers={"Host": "example.test:1234"})
        assert conn.getresponse().read() == f"{len(blob)} {digest}".encode()
        conn.close()
        chunked, sized = wait_finished(px)
    assert chunked.bytes_in == sized.bytes_in == len(blob)
    assert chunked.query == {"x": "1"} and chunked.header("transfer-encoding") == "chunked"
    (_, path1, hdrs1), (_, _, hdrs2) = handler.seen
    assert path1 == "/chunked?x=1" and hdrs1["Transfer-Encoding"] == "chunked"
    assert hdrs2["Host"] == "example.test:1234"  # Host kept as the client sent it


def test_upstream_reconnects(backend: tuple[str, type[Backend]]) -> None:
    url, _ = backend
    with CountingProxy(url) as px:
        conn = connect(px.url)
        # The backend closes the idle connection after each response without notice.
        for _ in range(3):
            conn.request("GET", "/silent-close")
            assert conn.getresponse().read() == b"ok"
            time.sleep(0.05)
        assert px.upstream_connections == 3
        # The backend drops the 2nd request on a connection: the proxy retries once.
        px.reset()
        for _ in range(2):
            conn.request("GET", "/drop-second")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"served")
        assert px.upstream_connections == 2 and px.connections == 0
        conn.close()


def test_upstream_down_gives_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with CountingProxy(dead) as px:
        conn = connect(px.url)
        conn.request("GET", "/x")
        resp = conn.getresponse()
        assert resp.status == 502 and b"upstream error" in resp.read()
        conn.close()
        assert px.requests()[0].status == 502


def test_client_disconnect_mid_response(
    backend: tuple[str, type[Backend]], capfd: pytest.CaptureFixture[str]
) -> None:
    url, _ = backend
    with CountingProxy(url) as px:
        host, port = px.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            got = 0
            while got < 256 * 1024:
                got += len(sock.recv(65536))
        (rec,) = wait_finished(px)
        assert rec.error is not None and "client gone" in rec.error
        assert 0 < rec.bytes_out < BIG_SIZE
        # The proxy is still healthy.
        conn = connect(px.url)
        conn.request("GET", "/ok")
        assert conn.getresponse().read() == b"hello /ok"
        conn.close()
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------
# Classification


def req(method: str, target: str) -> Request:
    from urllib.parse import parse_qsl, unquote

    path, _, query = target.partition("?")
    return Request(
        method=method,
        path=unquote(path),
        query=dict(parse_qsl(query, keep_blank_values=True)),
        headers={},
        target=target,
        started=0.0,
        connection=1,
    )


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("GET", "/bkt/key", "get"),
        ("GET", "/bkt/dir/key?versionId=3&partNumber=1", "get"),
        ("GET", "/bkt/dir/key?x-id=GetObject", "get"),
        ("GET", "/bkt?list-type=2&prefix=a/&delimiter=/", "list"),
        ("GET", "/bkt/", "list"),
        ("GET", "/bkt?prefix=a", "list"),
        ("GET", "/bkt/key?tagging", None),
        ("GET", "/bkt/key?uploadId=1", None),
        ("GET", "/bkt?location", None),
        ("GET", "/", None),
        ("HEAD", "/bkt/key", "head"),
        ("PUT", "/bkt/key", None),
        ("GET", "/download/storage/v1/b/bkt/o/dir%2Fkey?alt=media", "get"),
        ("GET", "/storage/v1/b/bkt/o/dir%2Fkey?alt=media&generation=5", "get"),
        ("GET", "/storage/v1/b/bkt/o/dir%2Fkey", "head"),
        ("GET", "/storage/v1/b/bkt/o/dir%2Fkey?alt=json", "head"),
        ("GET", "/storage/v1/b/bkt/o?prefix=dir%2F&delimiter=%2F", "list"),
        ("GET", "/storage/v1/b/bkt", None),
        ("POST", "/upload/storage/v1/b/bkt/o?uploadType=media&name=k", None),
        ("GET", "/devstoreaccount1/cont/dir/key", "get"),
        ("GET", "/devstoreaccount1/cont?restype=container&comp=list&prefix=a%2F&delimiter=%2F",
         "list"),
        ("GET", "/devstoreaccount1?comp=list", None),  # list containers
        ("GET", "/devstoreaccount1/cont/key?comp=tags", None),
        ("GET", "/devstoreaccount1/cont?restype=container", None),
        ("HEAD", "/devstoreaccount1/cont/key", "head"),
    ],
)
def test_classifiers(method: str, target: str, kind: str | None) -> None:
    r = req(method, target)
    assert (is_object_get(r), is_list(r), is_head(r)) == (
        kind == "get",
        kind == "list",
        kind == "head",
    )


# --------------------------------------------------------------------------------------
# Fault injection


def _raw_get(url: str, target: str, headers: dict[str, str] | None = None,
             timeout: float = 10) -> tuple[int, dict[str, str], bytes, str | None]:
    """One GET on a fresh connection: status, headers, the body bytes that arrived, and the
    error that ended the body early (None if it arrived whole)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return 0, {}, b"", type(exc).__name__
    got = b""
    error = None
    try:
        while chunk := resp.read1(65536):
            got += chunk
        if resp.length:  # read1 ends quietly when the connection closes early
            error = "IncompleteRead"
    except (OSError, http.client.HTTPException) as exc:
        error = type(exc).__name__
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, got, error


def test_each_fault_kind(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    data = os.urandom(3000)
    s3.put_bucket_acl(Bucket=bucket, ACL="public-read")
    s3.put_object(Bucket=bucket, Key="obj", Body=data, ACL="public-read")  # no signing here
    proxy.reset()
    ranged = {"Range": "bytes=100-1099"}
    target = f"/{bucket}/obj"

    def only(kind: str, **kw: Any) -> tuple[int, dict[str, str], bytes, str | None]:
        proxy.faults(1.0, [kind], predicate=is_object_get, stall_s=kw.pop("stall_s", 30.0))
        try:
            return _raw_get(proxy.url, target, ranged, **kw)
        finally:
            proxy.faults(0)

    status, _, body, _ = only("503")
    assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert only("500")[0] == 500 and only("403")[0] == 403
    status, _, _, error = only("reset")
    assert status == 0 and error is not None
    status, headers, body, error = only("truncate")
    assert status == 206 and headers["content-length"] == "1000"
    assert body == data[100:600] and error == "IncompleteRead"
    status, headers, body, error = only("short_length")
    assert status == 206 and error is None and data[100:1100].startswith(body)
    assert int(headers["content-length"]) == len(body) < 1000
    status, headers, body, error = only("full_200")
    assert status == 200 and body == data and error is None
    status, headers, body, error = only("no_etag")
    assert status == 206 and "etag" not in headers and body == data[100:1100]
    status, _, body, error = only("stall", timeout=0.5)
    assert status == 0 and error == "TimeoutError"
    status, _, body, error = only("stall_body", timeout=0.5)
    assert status == 206 and body == data[100:600] and error == "TimeoutError"
    status, _, body, error = only("stall_body", stall_s=0.2)
    assert status == 206 and body == data[100:1100] and error is None
    assert proxy.count(predicate=lambda r: r.fault is None) == 0
    assert set(proxy.fault_counts()) == {"503", "500", "403", "reset", "truncate",
                                         "short_length", "full_200", "no_etag", "stall",
                                         "stall_body"}
    # listings lose their <ETag> elements too; a non-matching predicate injects nothing
    proxy.faults(1.0, ["no_etag"])
    assert b"<ETag>" not in _raw_get(proxy.url, f"/{bucket}?list-type=2")[2]
    proxy.faults(1.0, ["500"], predicate=lambda r: False)
    assert _raw_get(proxy.url, target)[2] == data


def test_faults_are_seeded_and_rated(s3: Any, proxy: CountingProxy, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="obj", Body=b"x", ACL="public-read")
    outcomes = []
    for _ in range(2):
        proxy.reset()
        proxy.faults(0.3, ["500", "503"], predicate=is_object_get, seed=42)
        outcomes.append([_raw_get(proxy.url, f"/{bucket}/obj")[0] for _ in range(200)])
    assert outcomes[0] == outcomes[1]  # same seed, same sequence
    failed = sum(s != 200 for s in outcomes[0])
    assert 30 <= failed <= 90 and sum(proxy.fault_counts().values()) == failed
