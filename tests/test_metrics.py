"""Prometheus metrics (``--metrics HOST:PORT``): scraped over HTTP from live mounts."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Bucket, _base_env, blob, drop_page_cache, make_local_bucket
from prometheus_client.parser import text_string_to_metric_families

from fusefs.testing.servers import free_port

BLOCK = 256 * 1024


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The raw text and every sample as ``(name, sorted labels) -> value``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items()
             if n == name and all(dict(ls).get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_numbers_move_with_reads(bucket: Bucket, mount) -> None:
    data = blob(3 * BLOCK + 100, seed=5)
    bucket.put("m/data.bin", data)
    port = free_port()
    m = mount(bucket, "--block-size", str(BLOCK), "--metrics", f"127.0.0.1:{port}")
    src = {"source": bucket.source}
    text, before = scrape(port)
    assert value(before, "fusefs_fetched_bytes_total", **src) == 0
    assert value(before, "fusefs_mount_info", **src) == 1
    assert value(before, "fusefs_block_size_bytes", **src) == BLOCK
    for secret in ("testing", "Eby8vdM02x"):  # S3 keys, Azurite's account key
        assert secret not in text

    assert (m.path / "m/data.bin").read_bytes() == data
    _, after = scrape(port)
    stats = m.stats()
    assert value(after, "fusefs_fetched_bytes_total", **src) == len(data) == stats["bytes_fetched"]
    assert value(after, "fusefs_fetches_total", **src) == 4 == stats["fetches"]
    assert value(after, "fusefs_cache_misses_total", **src) == stats["misses"] > 0
    assert value(after, "fusefs_served_bytes_total", **src) >= len(data)
    assert value(after, "fusefs_cache_used_bytes", **src) >= len(data)
    assert value(after, "fusefs_fetches_in_flight", **src) == 0
    # one store GET observed per fetch; lookups and reads of the FUSE side are timed too
    assert value(after, "fusefs_store_request_duration_seconds_count",
                 operation="get", **src) == 4
    assert value(after, "fusefs_store_request_duration_seconds_count",
                 operation="list", **src) >= 1
    reads = value(after, "fusefs_fuse_request_duration_seconds_count", operation="read", **src)
    assert reads >= 1
    assert value(after, "fusefs_fuse_request_duration_seconds_count",
                 operation="lookup", **src) >= 2

    # read again from fusefs's cache (not the kernel's): hits move, fetches do not
    drop_page_cache(m.path / "m/data.bin")
    assert (m.path / "m/data.bin").read_bytes() == data
    _, again = scrape(port)
    assert value(again, "fusefs_cache_hits_total", **src) > value(after, "fusefs_cache_hits_total",
                                                                  **src)
    assert value(again, "fusefs_fetches_total", **src) == 4
    assert value(again, "fusefs_fuse_request_duration_seconds_count", operation="read",
                 **src) > reads


def _write_and_sync(m) -> None:  # type: ignore[no-untyped-def]
    """Write a 5,000-byte file and wait with ``fusefs sync`` until the store holds it."""
    (m.path / "w.bin").write_bytes(b"w" * 5000)
    r = subprocess.run([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0


def test_upload_numbers_move_with_writes(local_bucket: Bucket, mount) -> None:
    port = free_port()
    # the daemon times the requests it sends itself: no worker process sends the upload
    m = mount(local_bucket, "--metrics", f"127.0.0.1:{port}", "--fetch-workers", "0")
    src = {"source": local_bucket.source}
    _, before = scrape(port)
    assert value(before, "fusefs_uploads_done_files_total", **src) == 0
    _write_and_sync(m)
    _, after = scrape(port)
    assert value(after, "fusefs_uploads_done_files_total", **src) == 1
    assert value(after, "fusefs_uploaded_bytes_total", **src) == 5000
    assert value(after, "fusefs_uploads_pending_files", **src) == 0
    assert value(after, "fusefs_upload_conflicts_total", **src) == 0
    assert value(after, "fusefs_store_request_duration_seconds_count",
                 operation="put_file", **src) == 1


def test_what_the_workers_send_is_counted(local_bucket: Bucket, mount) -> None:
    import time

    port = free_port()
    local_bucket.put("first", b"1")
    m = mount(local_bucket, "--metrics", f"127.0.0.1:{port}", "--fetch-workers", "1")
    src = {"source": local_bucket.source}
    assert (m.path / "first").read_bytes() == b"1"  # starts the worker
    deadline = time.monotonic() + 30
    while m.stats()["workers_ready"] < 1:
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.05)
    _write_and_sync(m)
    _, after = scrape(port)
    assert value(after, "fusefs_worker_uploads_total", **src) == 1
    assert value(after, "fusefs_uploads_done_files_total", **src) == 1


def test_off_by_default(local_bucket: Bucket, mount) -> None:
    local_bucket.put("f", b"x")
    m = mount(local_bucket)
    assert "metrics on" not in m.log_text()


def fusefs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                          text=True, env=env or _base_env(), timeout=60)


def test_bad_address_and_port_in_use_are_one_line(tmp_path: Path) -> None:
    b = make_local_bucket(tmp_path / "objects")
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = fusefs("mount", b.source, str(mp), "--metrics", "localhost:http")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("fusefs: invalid --metrics='localhost:http'")
    r = fusefs("mount", b.source, str(mp), env={**_base_env(), "FUSEFS_METRICS": "1:2:x"})
    assert r.returncode == 1 and "FUSEFS_METRICS" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = fusefs("mount", b.source, str(mp), "--cache-dir", str(tmp_path / "c"),
                   "--metrics", f"127.0.0.1:{port}")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith(f"fusefs: --metrics 127.0.0.1:{port}: cannot listen there")
    assert "Traceback" not in r.stderr
    assert not __import__("os").path.ismount(mp)


def test_source_label_has_no_user_info() -> None:
    from fusefs.metrics import source_label

    assert source_label("s3://key:secret@bucket/prefix?x=1") == "s3://bucket/prefix"
    assert source_label("az://container/datasets") == "az://container/datasets"


def test_instrumented_store_times_each_request(tmp_path: Path) -> None:
    from fusefs.backends.local import LocalStore
    from fusefs.metrics import InstrumentedStore, Metrics

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"hello")
    metrics = Metrics("file:///x")
    store = InstrumentedStore(LocalStore(str(tmp_path)), metrics)
    info = store.head("a/f")
    assert store.get_range("a/f", 0, 5, info.version) == b"hello"
    assert [p.prefixes for p in store.list("")] == [["a/"]]
    with pytest.raises(Exception):  # noqa: B017 - any fusefs error: timed all the same
        store.head("nope")

    def count(op: str) -> float | None:
        return metrics.registry.get_sample_value(
            "fusefs_store_request_duration_seconds_count",
            {"source": "file:///x", "operation": op})

    assert (count("head"), count("get"), count("list")) == (2, 1, 1)
