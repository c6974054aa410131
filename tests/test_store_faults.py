"""The S3 and GCS stores behind the fault-injecting proxy: every fault is retried or refused,
never served as wrong bytes; missing ETags; the fast path's per-request decisions; pool size.

Real servers (moto, fake-gcs-server) behind :class:`CountingProxy`; the SDKs are not mocked.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from fusefs.backends import open_store
from fusefs.backends.base import ObjectStore
from fusefs.backends.retry import RetryPolicy
from fusefs.config import LIST_AHEAD_PARALLEL, Settings
from fusefs.errors import NotFound, StaleVersion, TransientError
from fusefs.testing.proxy import CountingProxy, Request, is_list, is_object_get
from fusefs.testing.servers import FakeGCS, MotoS3, fake_gcs, gcs_client, moto_s3, s3_client

pytestmark = pytest.mark.timeout(180)

FAST = RetryPolicy(attempts=10, deadline=30.0, base=0.005, cap=0.05)  # quick backoff in tests
STALL = 0.5  # the stall timeout the stores get here (seconds)
#: Every fault that a retry must absorb (403 is final and tested apart).
RETRIED = ["500", "503", "reset", "truncate", "stall", "stall_body", "short_length", "full_200",
           "no_etag"]


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def gcs() -> Iterator[FakeGCS]:
    with fake_gcs(backend="memory") as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@dataclass
class Setup:
    kind: str
    store: ObjectStore
    proxy: CountingProxy
    put: Callable[[str, bytes], None]


def _setup(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
           proxy: CountingProxy, retry: RetryPolicy = FAST) -> Setup:
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    if kind == "s3":
        from fusefs.backends.s3 import S3Store

        client = s3_client(request.getfixturevalue("moto").endpoint_url)
        client.create_bucket(Bucket=bucket)
        store: ObjectStore = S3Store(bucket, endpoint_url=proxy.url, stall_timeout=STALL,
                                     retry=retry)
        store.check()  # the first listing teaches the fast GET path the bucket's URL
        assert store._fast._base is not None  # type: ignore[attr-defined]
        return Setup(kind, store, proxy,
                     lambda k, d: client.put_object(Bucket=bucket, Key=k, Body=d))
    from fusefs.backends.gcs import GCSStore

    gclient = gcs_client(request.getfixturevalue("gcs").url)
    b = gclient.create_bucket(bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    store = GCSStore(bucket, stall_timeout=STALL, retry=retry)
    return Setup(kind, store, proxy, lambda k, d: b.blob(k).upload_from_string(d))


@pytest.fixture(params=["s3", "s3-boto3", "gcs"])
def st(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """A store behind its own proxy; ``s3-boto3``: S3 with the fast GET path off (every GET
    through boto3's own machinery)."""
    kind = "gcs" if request.param == "gcs" else "s3"
    server = request.getfixturevalue("moto" if kind == "s3" else "gcs")
    url = server.endpoint_url if kind == "s3" else server.url
    with CountingProxy(url) as proxy:
        setup = _setup(kind, request, monkeypatch, proxy)
        if request.param == "s3-boto3":
            setup.store._fast.enabled = False  # type: ignore[attr-defined]
        yield setup


def _objects(st: Setup, n: int, size: int) -> dict[str, bytes]:
    data = {f"d/{i:03d}.bin": random.Random(i).randbytes(size) for i in range(n)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: st.put(*kv), data.items()))
    return data


@pytest.mark.parametrize("kind", RETRIED)
def test_each_fault_is_retried_never_served(st: Setup, kind: str) -> None:
    """Half the GETs get ``kind``: every range still comes back exact (whole objects, middles,
    ends), and the fault was really injected."""
    data = _objects(st, 4, 20_000)
    infos = {k: st.store.head(k) for k in data}
    rate = 0.25 if kind.startswith("stall") else 0.5  # each stall costs a stall timeout
    st.proxy.faults(rate, [kind], predicate=is_object_get, seed=7, stall_s=5 * STALL)
    ranges = [(0, 20_000), (0, 50_000), (1000, 3000), (19_000, 4096), (7, 1)]
    for key, want in data.items():
        for start, length in ranges:
            got = st.store.get_range(key, start, length, infos[key].version)
            assert got == want[start : start + length], (key, start, length)
    assert st.proxy.fault_counts()[kind] > 0 or (st.kind == "gcs" and kind == "no_etag")


def test_listing_and_head_are_retried_and_a_failed_listing_raises(st: Setup) -> None:
    data = _objects(st, 30, 10)
    st.proxy.faults(0.4, ["500", "503", "reset", "truncate", "stall"], predicate=None, seed=3,
                    stall_s=5 * STALL)
    for _ in range(5):
        listed = [o.key for p in st.store.list("d/") for o in p.objects]
        assert sorted(listed) == sorted(data)
        assert st.store.head("d/001.bin").size == 10
    assert sum(st.proxy.fault_counts().values()) > 5
    st.proxy.faults(1.0, ["503"], predicate=is_list)
    st.proxy.reset()
    with pytest.raises(TransientError):  # never an empty (or partial) listing
        list(st.store.list("d/"))
    assert st.proxy.count(predicate=is_list) == FAST.attempts


def test_every_get_stalling_fails_boundedly(st: Setup) -> None:
    """A store whose GETs all stall: the read fails (EIO) after the policy's attempts, each
    abandoned after the stall timeout, and the store serves again once the stalls end."""
    data = _objects(st, 1, 1000)
    info = st.store.head("d/000.bin")
    st.proxy.faults(1.0, ["stall"], predicate=is_object_get, stall_s=30)
    st.proxy.reset()
    short = RetryPolicy(attempts=3, base=0.005, cap=0.05)
    st.store._retry = short  # type: ignore[attr-defined]
    with pytest.raises(TransientError, match="gave up after 3 attempts"):
        st.store.get_range("d/000.bin", 0, 1000, info.version)
    assert st.proxy.count(predicate=is_object_get) == 3
    st.proxy.faults(0)
    assert st.store.get_range("d/000.bin", 0, 1000, info.version) == data["d/000.bin"]


def test_whole_object_checksum_mismatch_is_retried(st: Setup) -> None:
    """A body whose bytes were flipped in transit (same length) is caught by the store's own
    checksum (S3 MD5 ETag, GCS x-goog-hash) and fetched again."""
    data = _objects(st, 1, 5000)["d/000.bin"]
    info = st.store.head("d/000.bin")
    assert st.store.get_range("d/000.bin", 0, 5000, info.version) == data  # S3: MD5s confirmed
    st.proxy.reset()
    st.proxy.faults(1.0, ["corrupt"], predicate=_first(2, is_object_get))
    assert st.store.get_range("d/000.bin", 0, 5000, info.version) == data
    assert st.proxy.fault_counts()["corrupt"] == 2
    assert st.proxy.count(predicate=is_object_get) == 3


def _first(n: int, pred: Callable[[Request], bool]) -> Callable[[Request], bool]:
    """A predicate that selects the first ``n`` requests ``pred`` selects."""
    left = [n]
    lock = threading.Lock()

    def select(req: Request) -> bool:
        with lock:
            if left[0] > 0 and pred(req):
                left[0] -= 1
                return True
            return False

    return select


def test_a_whole_big_object_for_a_range_is_refused_unread(
    st: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores Range must not make a block fetch pull a huge object into memory:
    past WHOLE_OBJECT_MAX (made small here) such a 200 is refused before its body is read."""
    import fusefs.backends.verify as verify

    data = _objects(st, 1, 50_000)["d/000.bin"]
    info = st.store.head("d/000.bin")
    monkeypatch.setattr(verify, "WHOLE_OBJECT_MAX", 10_000)
    st.proxy.faults(1.0, ["full_200"], predicate=is_object_get)
    st.store._retry = RetryPolicy(attempts=2, base=0.005, cap=0.05)  # type: ignore[attr-defined]
    with pytest.raises(TransientError, match="ignored the range"):
        st.store.get_range("d/000.bin", 100, 1000, info.version)
    monkeypatch.setattr(verify, "WHOLE_OBJECT_MAX", 50_000)  # small enough: read and sliced
    assert st.store.get_range("d/000.bin", 100, 1000, info.version) == data[100:1100]


# --------------------------------------------------------------------------- S3 specifics


@pytest.fixture
def s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
       moto: MotoS3) -> Iterator[Setup]:
    with CountingProxy(moto.endpoint_url) as proxy:
        yield _setup("s3", request, monkeypatch, proxy)


def test_s3_objects_without_etags(s3: Setup) -> None:
    """A store that sends no ETags (issue 8 item 12): a weak, non-empty version from size and
    last-modified, the same from LIST and HEAD; no If-Match; a same-size rewrite is stale."""
    s3.put("a.bin", b"1" * 100)
    s3.proxy.faults(1.0, ["no_etag"])
    listed = next(iter(s3.store.list(""))).objects[0]
    head = s3.store.head("a.bin")
    assert listed.version and listed.version.startswith("~") and head.version == listed.version
    s3.proxy.reset()
    assert s3.store.get_range("a.bin", 10, 20, head.version) == b"1" * 20
    gets = [r for r in s3.proxy.requests() if is_object_get(r)]
    assert len(gets) == 1 and gets[0].header("If-Match") is None
    time.sleep(1.1)  # a new last-modified second
    s3.put("a.bin", b"2" * 100)
    with pytest.raises(StaleVersion):
        s3.store.get_range("a.bin", 10, 20, head.version)
    assert s3.store.get_range("a.bin", 0, 5, s3.store.head("a.bin").version) == b"22222"


def test_s3_fast_path_refusal_is_decided_per_request(s3: Setup) -> None:
    """One thread's 404 must not turn the fast path off because another thread's request
    went through boto3 at the same moment (issue 8 item 14)."""
    s3.put("good.bin", b"g" * 1000)
    v = s3.store.head("good.bin").version
    s3.store.check()  # teaches the fast path the bucket URL
    arrived = threading.Event()

    def hold(method: str, path: str) -> bool:  # hold the first GET of good.bin back a second
        if path.split("?")[0].endswith("/good.bin") and not arrived.is_set():
            arrived.set()
            return True
        return False

    s3.proxy.slow(hold, 1.0)  # ... then reset it: its retry goes through boto3 (before the fix)
    s3.proxy.faults(1.0, ["reset"], predicate=_first(1, lambda r: r.path.endswith("/good.bin")))
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(s3.store.get_range, "good.bin", 0, 1000, v)
        assert arrived.wait(5)
        with pytest.raises(NotFound):  # a 404 on the fast path, then through boto3
            s3.store.get_range("missing.bin", 0, 10, v)
        assert good.result() == b"g" * 1000
    assert s3.proxy.fault_counts()["reset"] == 1
    assert s3.store._fast.enabled  # type: ignore[attr-defined]


def test_connection_pool_covers_every_concurrent_caller(moto: MotoS3,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Data fetches, metadata calls and list-ahead all run at once: the pool holds them all, so
    urllib3 never discards connections (issue 8 item 15)."""
    client = s3_client(moto.endpoint_url)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    settings = Settings(workers=4)
    callers = settings.workers + settings.metadata_workers + LIST_AHEAD_PARALLEL
    with CountingProxy(moto.endpoint_url, latency_ms=150) as proxy:
        settings.endpoint_url = proxy.url
        store: Any = open_store(f"s3://{bucket}", settings)
        v = store.head("k").version
        barrier = threading.Barrier(callers)

        def one(_: int) -> bytes:
            barrier.wait()
            data: bytes = store.get_range("k", 0, 1000, v)
            return data

        with caplog.at_level(logging.WARNING, logger="urllib3"):
            for _ in range(3):
                with ThreadPoolExecutor(callers) as pool:
                    assert set(pool.map(one, range(callers))) == {b"x" * 1000}
    full = [r for r in caplog.records if "Connection pool is full" in r.getMessage()]
    assert full == [] and proxy.upstream_connections >= callers


def test_a_slow_listing_gets_a_patient_retry(st: Setup) -> None:
    """Every LIST takes 1 s to answer (a big prefix), longer than the stall timeout: the first
    attempt is abandoned, the retry waits longer and gets it."""
    data = _objects(st, 3, 10)
    st.proxy.slow(lambda method, path: "list-type" in path or "/o?" in path
                  or path.endswith("/o"), 1.0)
    st.proxy.reset()
    listed = [o.key for p in st.store.list("d/") for o in p.objects]
    assert sorted(listed) == sorted(data)
    assert st.proxy.count(predicate=is_list) == 2


# ------------------------------------------------------------------- the pieces, offline


def test_take_range_accepts_only_the_asked_bytes() -> None:
    from fusefs.backends.verify import take_range

    obj = bytes(range(256)) * 4  # 1024 bytes
    assert take_range("k", 206, "bytes 10-19/1024", obj[10:20], 10, 10) == (obj[10:20], None)
    assert take_range("k", 206, "bytes 0-1023/1024", obj, 0, 4096) == (obj, obj)  # whole
    assert take_range("k", 206, "bytes 1000-1023/1024", obj[1000:], 1000, 100)[0] == obj[1000:]
    assert take_range("k", 200, None, obj, 10, 10) == (obj[10:20], obj)  # whole object: sliced
    assert take_range("k", 200, "bytes 10-19/1024", obj[10:20], 10, 10)[0] == obj[10:20]
    assert take_range("k", 206, None, obj[10:20], 10, 10)[0] == obj[10:20]
    bad = [
        (206, "bytes 11-20/1024", obj[11:21]),  # shifted
        (206, "bytes 10-19/1024", obj[10:19]),  # short body
        (206, "bytes 10-14/1024", obj[10:15]),  # short range, not at the end
        (206, None, obj[10:15]),  # short, and no way to tell where it ends
        (206, "bytes 10-19/*", obj[10:25]),  # too long
        (500, None, b""),
    ]
    for status, content_range, body in bad:
        with pytest.raises(TransientError):
            take_range("k", status, content_range, body, 10, 10)


def test_checksums() -> None:
    import base64
    import hashlib

    import google_crc32c

    from fusefs.backends.verify import Md5Etag, verify_goog_hash

    body = os.urandom(5000)
    crc = base64.b64encode(google_crc32c.value(body).to_bytes(4, "big")).decode()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    verify_goog_hash("k", f"crc32c={crc},md5={md5}", body)
    verify_goog_hash("k", f"md5={md5}", body)
    verify_goog_hash("k", None, body)
    for header in (f"crc32c={crc}", f"md5={md5}"):
        with pytest.raises(TransientError):
            verify_goog_hash("k", header, body[:-1] + bytes([body[-1] ^ 1]))  # never equal
    check = Md5Etag()
    etag = hashlib.md5(body).hexdigest()
    check.verify("k", etag, body, {})
    check.verify("k", f"{etag}-2", b"other", {})  # multipart: not an MD5
    check.verify("k", etag, b"other", {"x-amz-server-side-encryption": "aws:kms"})
    with pytest.raises(TransientError):
        check.verify("k", etag, b"other", {})
    with pytest.raises(TransientError):  # confirmed MD5s: the same bad bytes stay an error
        check.verify("k", etag, b"other", {})
    assert check.enabled
    odd = Md5Etag()  # a store whose 32-hex ETags are something else
    with pytest.raises(TransientError):
        odd.verify("k", "0" * 32, body, {})
    odd.verify("k", "0" * 32, body, {})  # same bytes again: not MD5s, check off
    assert not odd.enabled


def test_retry_policy_is_bounded() -> None:
    now = [0.0]
    calls = []

    def failing() -> None:
        calls.append(now[0])
        now[0] += 2.0  # each attempt stalls 2 s
        raise TransientError("stalled")

    policy = RetryPolicy(attempts=10, deadline=15.0, base=0.05, cap=1.0)
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    with pytest.raises(TransientError, match="gave up after"):
        policy.call(failing, "k", sleep=sleep, clock=lambda: now[0])
    assert 5 <= len(calls) <= 10 and max(calls) <= 15.0 and now[0] <= 15.0 + 2.0
    calls.clear()

    def gone() -> None:
        calls.append(0.0)
        raise NotFound("gone")

    with pytest.raises(NotFound):  # an answer, not a failure: no retry
        policy.call(gone, "k")
    assert calls == [0.0]
