"""Reads through a real mount while the store misbehaves (issue 10 items 3, 4, 7).

Each test puts its own fault-injecting :class:`CountingProxy` between the mount and the server
(moto for S3, fake-gcs-server for GCS); the bucket is seeded directly, past the proxy. The disk
cache is off and every read first drops the file's kernel pages, so reads reach the store.
Counts and bytes are asserted, never times (wall times are printed for information).
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Bucket, MountProc, drop_page_cache, make_gcs_bucket, make_s3_bucket

from fusefs.testing.proxy import CountingProxy, is_list, is_object_get

pytestmark = pytest.mark.timeout(300)

STALL = "0.5"  # --stall-timeout in these tests (seconds)
#: The soak's faults: all that a retry must absorb, in a fifth of all requests.
SOAK_FAULTS = ["500", "503", "reset", "truncate", "stall", "stall_body", "short_length",
               "full_200", "no_etag", "corrupt"]
NO_CACHE = ["--cache-size", "0", "--block-size", "64K", "--readahead-max", "0",
            "--metadata-ttl", "600", "--stall-timeout", STALL, "--workers", "8"]


@pytest.fixture(params=["s3", "gcs"])
def faulty(request: pytest.FixtureRequest) -> Iterator[Bucket]:
    """A fresh bucket whose mount goes through a proxy of its own (faults off at first)."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        with CountingProxy(server.endpoint_url) as proxy:
            yield make_s3_bucket(SimpleNamespace(endpoint_url=server.endpoint_url, proxy=proxy))
    else:
        server = request.getfixturevalue("gcs_server")
        with CountingProxy(server.url) as proxy:
            yield make_gcs_bucket(SimpleNamespace(url=server.url, proxy=proxy))


def _seed(b: Bucket, n: int, size: int) -> dict[str, bytes]:
    data = {f"s/{i:04d}.bin": random.Random(i).randbytes(size) for i in range(n)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: b.put(*kv), data.items()))
    return data


def _read(path: Path) -> bytes:
    drop_page_cache(path)  # the kernel's pages; fusefs's own cache is off
    fd = os.open(path, os.O_RDONLY)
    try:
        out = b""
        while chunk := os.read(fd, 1 << 20):
            out += chunk
        return out
    finally:
        os.close(fd)


def _good_gets(proxy: CountingProxy) -> int:
    """Object GETs whose answer was taken (faults that leave the bytes intact included)."""
    return proxy.count(predicate=lambda r: is_object_get(r) and r.status in (200, 206)
                       and r.fault in (None, "no_etag", "full_200"))


def test_soak_5000_reads_at_20_percent_faults(faulty: Bucket, mount: Callable[..., MountProc]
                                              ) -> None:
    """>= 5,000 reads with a fifth of all requests faulty: 0 wrong bytes, 0 EIO."""
    data = _seed(faulty, 520, 4096)
    proxy = faulty.proxy
    assert proxy is not None
    m = mount(faulty, *NO_CACHE)
    assert len(os.listdir(m.path / "s")) == len(data)  # the listing, before the faults
    proxy.reset()
    proxy.faults(0.2, SOAK_FAULTS, seed=2026, stall_s=5.0)
    rng = random.Random(1)
    keys = [k for _ in range(10) for k in rng.sample(list(data), len(data))]  # 10 rounds
    wrong, eio = [], []

    def one(key: str) -> None:
        try:
            if _read(m.path / key) != data[key]:
                wrong.append(key)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            eio.append(key)

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, keys))
    elapsed = time.monotonic() - t0
    proxy.faults(0)
    faults = proxy.fault_counts()
    print(f"\n{faulty.kind} soak: {len(keys)} reads, {sum(faults.values())} faults "
          f"{dict(faults)}, {_good_gets(proxy)} good GETs, {len(wrong)} wrong, {len(eio)} EIO, "
          f"{elapsed:.1f}s")
    assert wrong == [] and eio == []
    assert len(keys) >= 5000 and _good_gets(proxy) >= 5000  # (nearly) every read reached the store
    assert sum(faults.values()) >= 0.15 * proxy.count()
    assert set(faults) == set(SOAK_FAULTS)  # every kind was injected


def test_stalled_gets_are_abandoned_and_retried(faulty: Bucket, mount: Callable[..., MountProc]
                                                ) -> None:
    """15% of GETs stall far longer than the stall timeout: every 100 KiB file arrives right."""
    data = _seed(faulty, 120, 100 * 1024)
    proxy = faulty.proxy
    assert proxy is not None
    m = mount(faulty, *NO_CACHE)
    assert len(os.listdir(m.path / "s")) == len(data)
    proxy.reset()
    proxy.faults(0.15, ["stall"], predicate=is_object_get, seed=15, stall_s=20.0)
    times = []

    def one(key: str) -> bool:
        t0 = time.monotonic()
        ok = _read(m.path / key) == data[key]
        times.append(time.monotonic() - t0)
        return ok

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, data))
    proxy.faults(0)
    stalls = proxy.fault_counts()["stall"]
    print(f"\n{faulty.kind} stalls: {len(data)} files, {stalls} stalled GETs, slowest "
          f"{max(times):.2f}s (--stall-timeout {STALL})")
    assert all(results) and stalls >= 5


def test_every_get_stalling_gives_eio_and_the_mount_keeps_serving(
    faulty: Bucket, mount: Callable[..., MountProc]
) -> None:
    data = _seed(faulty, 3, 1000)
    proxy = faulty.proxy
    assert proxy is not None
    m = mount(faulty, *NO_CACHE)
    assert len(os.listdir(m.path / "s")) == 3
    proxy.reset()
    proxy.faults(1.0, ["stall"], predicate=is_object_get, stall_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        _read(m.path / "s/0000.bin")
    elapsed = time.monotonic() - t0
    assert err.value.errno == errno.EIO
    attempts = proxy.count(predicate=is_object_get)
    print(f"\n{faulty.kind} all stalled: EIO after {attempts} GETs, {elapsed:.1f}s")
    assert attempts >= 10  # every attempt of the retry policy was made (and abandoned)
    proxy.faults(0)
    for key in ("s/0000.bin", "s/0001.bin"):
        assert _read(m.path / key) == data[key]
    assert m.proc is not None and m.proc.poll() is None
    assert sorted(os.listdir(m.path / "s")) == sorted(k[2:] for k in data)


def test_a_failing_listing_is_eio_never_an_empty_folder(
    faulty: Bucket, mount: Callable[..., MountProc]
) -> None:
    data = _seed(faulty, 3, 10)
    proxy = faulty.proxy
    assert proxy is not None
    m = mount(faulty, *NO_CACHE)
    proxy.faults(1.0, ["503"], predicate=is_list)
    with pytest.raises(OSError) as err:
        os.listdir(m.path / "s")
    assert err.value.errno == errno.EIO
    proxy.faults(0.5, ["503", "reset", "truncate"], predicate=is_list, seed=4)
    assert sorted(os.listdir(m.path / "s")) == sorted(k[2:] for k in data)  # retried
    assert proxy.fault_counts()["503"] >= 10
