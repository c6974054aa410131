"""Worker processes (``--fetch-workers``): reads and uploads through them on every store, a
worker killed in the middle of a fetch or of an upload (single or multipart), the daemon
killed while a worker's multipart upload is open, a changed object, ``--fetch-workers 0``, and
that no worker outlives its mount. Real mounts, real servers; requests and bytes are counted,
never timed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import Bucket, MountProc, blob, drop_page_cache
from test_writes import sync

from fusefs.errors import (
    BackendError,
    NotFound,
    StaleVersion,
    error_from_kind,
    error_kind,
    to_errno,
)
from fusefs.testing.proxy import Request, is_object_get

KiB = 1024


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def _wait_until(cond, what: str, limit: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``cond`` (a deadline only so a broken build fails instead of hanging)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _start_workers(m: MountProc, n: int, first: str) -> None:
    """Read ``first`` (a cold read starts the workers; it is served in-process while they
    start), then wait until ``n`` workers take requests."""
    (m.path / first).read_bytes()
    _wait_until(lambda: m.stats()["workers_ready"] == n, f"{n} workers ready")


def test_errors_from_a_worker_map_to_the_same_errno() -> None:
    for exc in (StaleVersion("x"), NotFound("y"), BackendError("z"), OSError(errno.ENOSPC, "d"),
                ValueError("v")):
        back = error_from_kind(error_kind(exc), str(exc))
        expected = to_errno(exc) if not isinstance(exc, ValueError) else errno.EIO
        assert to_errno(back) == expected
    assert isinstance(error_from_kind("StaleVersion", "m"), StaleVersion)
    assert isinstance(error_from_kind("NoSuchKind", "m"), BackendError)


def test_reads_through_workers_on_every_store(bucket: Bucket, mount) -> None:
    files = {"small.bin": blob(100 * KiB, 1), "multi.bin": blob(200 * KiB + 7, 2),
             "empty": b"", "sub/tiny.txt": b"hello"}
    for k, v in files.items():
        bucket.put(k, v)
    bucket.put("first", b"1")
    # no link or metadata probe: on S3 a lookup fetches objects of at most 4 KiB itself, and
    # the first stat (or open) one of at most 1 MiB whose metadata is unknown (docs/posix.md)
    m = mount(bucket, "--fetch-workers", "2", "--block-size", "64K", "--link-probe-size", "0",
              "--metadata-probe", "off")
    _start_workers(m, 2, "first")
    fetches = m.stats()["fetches"]
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v
    st = m.stats()
    assert st["fetch_workers"] == 2
    pids = st["worker_pids"]
    assert len(pids) == 2 and all(_parent(p) == m.proc.pid for p in pids)  # type: ignore[union-attr]
    assert st["worker_fetches"] == 2 + 4 + 1  # 64 KiB blocks: 2 + 4 + 1
    assert st["fetches"] == fetches + st["worker_fetches"]
    assert st["worker_restarts"] == 0 and st["errors"] == 0
    # the cache the workers wrote serves the FUSE process (and the workers) again
    for k, v in files.items():
        drop_page_cache(m.path / k)
        assert (m.path / k).read_bytes() == v
    assert m.stats()["worker_fetches"] == 7
    m.stop()
    assert not [p for p in pids if _alive(p)]


def test_workers_without_a_disk_cache(local_bucket: Bucket, mount) -> None:
    data = blob(300 * KiB, 8)
    local_bucket.put("first", b"1")
    local_bucket.put("a.bin", data)
    m = mount(local_bucket, "--fetch-workers", "1", "--cache-size", "0", "--block-size", "64K")
    _start_workers(m, 1, "first")
    assert (m.path / "a.bin").read_bytes() == data
    st = m.stats()
    assert st["worker_fetches"] == 5 and st["current_count"] == 0


def test_fetch_workers_0_fetches_in_the_fuse_process(s3_bucket: Bucket, mount) -> None:
    s3_bucket.put("a.bin", blob(100 * KiB, 3))
    m = mount(s3_bucket, "--fetch-workers", "0")
    assert (m.path / "a.bin").read_bytes() == blob(100 * KiB, 3)
    st = m.stats()
    assert (st["fetch_workers"], st["worker_pids"], st["worker_fetches"]) == (0, [], 0)
    assert st["fetches"] == 1
    assert _children(m.proc.pid) == []  # type: ignore[union-attr]


def test_a_worker_killed_mid_fetch_is_restarted_and_the_read_is_right(s3_bucket: Bucket,
                                                                      mount) -> None:
    data = blob(100 * KiB, 4)
    s3_bucket.put("held.bin", data)
    s3_bucket.put("first", b"1")
    proxy = s3_bucket.proxy
    assert proxy is not None

    def held(req: Request) -> bool:
        return is_object_get(req) and req.path.endswith("/held.bin")

    # no metadata probe: the open's GET would come from the FUSE process, not the worker
    m = mount(s3_bucket, "--fetch-workers", "1", "--stall-timeout", "60",
              "--metadata-probe", "off")
    _start_workers(m, 1, "first")
    # the first GET of held.bin waits in the proxy (cut short when the test ends)
    proxy.slow(lambda method, path: method == "GET" and "/held.bin" in path
               and "list-type" not in path, 30)
    got: list[bytes | BaseException] = []

    def read() -> None:
        try:
            got.append((m.path / "held.bin").read_bytes())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            got.append(exc)

    before = proxy.count(predicate=held)
    t = threading.Thread(target=read)
    t.start()
    try:
        _wait_until(lambda: proxy.count(predicate=held) > before, "the worker's GET")
        (pid,) = m.stats()["worker_pids"]
        os.kill(pid, signal.SIGKILL)
        proxy.slow(None, 0)  # the retry goes through
        t.join(60)
    finally:
        proxy.slow(None, 0)
    assert got == [data]
    st = m.stats()
    assert st["worker_restarts"] == 1 and st["worker_retries"] >= 1
    assert st["worker_pids"] and pid not in st["worker_pids"]
    assert proxy.count(predicate=held) == before + 2  # the held GET, then one retry
    assert not _alive(pid)


def test_a_changed_object_never_yields_mixed_bytes(s3_bucket: Bucket, mount) -> None:
    old, new = blob(4096 * KiB, 5), blob(4096 * KiB, 6)
    s3_bucket.put("c.bin", old)
    s3_bucket.put("first", b"1")
    m = mount(s3_bucket, "--fetch-workers", "1", "--block-size", "64K",
              "--metadata-ttl", "3600")
    _start_workers(m, 1, "first")
    path = m.path / "c.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * KiB, 0) == old[: 4 * KiB]  # the old version, partly cached
        s3_bucket.put("c.bin", new)
        far = 3584 * KiB  # past any readahead of the first read: fetched only now
        with pytest.raises(OSError) as ei:  # the worker's GET names the old version
            os.pread(fd, 4 * KiB, far)
        assert ei.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    drop_page_cache(path)
    os.close(os.open(path, os.O_RDONLY))  # reopening sees the new version
    assert path.read_bytes() == new  # all new: never an old block mixed in
    st = m.stats()
    assert st["worker_fetches"] >= 4096 // 64 and st["worker_restarts"] == 0


def test_no_worker_outlives_a_killed_daemon(s3_bucket: Bucket, mount) -> None:
    s3_bucket.put("k.bin", blob(10 * KiB, 7))
    m: MountProc = mount(s3_bucket, "--fetch-workers", "2")
    _start_workers(m, 2, "k.bin")
    pids = m.stats()["worker_pids"]
    assert len(pids) == 2
    assert m.proc is not None
    m.proc.kill()  # SIGKILL: no cleanup code runs; the workers must still go
    m.proc.wait()
    _wait_until(lambda: not [p for p in pids if _alive(p)], "the workers exit")
    m.stop()




def test_sigterm_stops_the_daemon_and_its_workers(s3_bucket: Bucket, mount) -> None:
    s3_bucket.put("t.bin", blob(10 * KiB, 9))
    s3_bucket.put("t2.bin", b"2")
    m: MountProc = mount(s3_bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "t.bin")
    (pid,) = m.stats()["worker_pids"]
    assert m.proc is not None
    os.kill(pid, signal.SIGTERM)  # ignored: only the daemon stops its workers
    assert (m.path / "t2.bin").read_bytes() == b"2"  # through the same worker
    st = m.stats()
    assert st["worker_pids"] == [pid] and st["worker_restarts"] == 0
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(30) == 0
    assert not _alive(pid)
    m.stop()


def test_a_damaged_cached_block_found_by_a_worker_is_refetched_and_counted(
        s3_bucket: Bucket, mount, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = blob(100 * KiB, 10)
    s3_bucket.put("first", b"1")
    s3_bucket.put("s.bin", data)
    m = mount(s3_bucket, "--fetch-workers", "1")
    assert (m.path / "s.bin").read_bytes() == data
    m.stop()
    (victim,) = sorted((tmp_path / "cache").rglob("*.val"))  # the one block file
    with open(victim, "r+b") as f:  # flip one bit of the cached data
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x40]))
    gets = s3_bucket.object_gets()
    m = mount(s3_bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")
    assert (m.path / "s.bin").read_bytes() == data  # the worker refused it and fetched again
    st = m.stats()
    assert st["corrupt_blocks"] == 1 and st["worker_fetches"] == 1
    assert s3_bucket.object_gets() == gets + 2  # "first" and the damaged block


def test_small_files_whose_metadata_is_unknown_are_fetched_by_the_workers(s3_bucket: Bucket,
                                                                          mount) -> None:
    """On S3 the first stat of a small file whose metadata is unknown (the kernel's, before
    an open) fetches it whole for its metadata (``--metadata-probe auto``, docs/posix.md): that
    GET runs in a fetch worker too, which keeps its bytes in the cache, so a first epoch over
    cold small files keeps its fetch work out of the FUSE process. One GET per file; the read
    after makes none. (It ran in the FUSE process: 0 worker fetches.)"""
    assert s3_bucket.proxy is not None
    files = {f"d/f{i}": blob(50 * KiB, i) for i in range(10)}
    for k, v in files.items():
        s3_bucket.put(k, v)
    s3_bucket.put("first", b"1")
    m = mount(s3_bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")
    before = m.stats()["worker_fetches"]
    s3_bucket.proxy.reset()
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v
    st = m.stats()
    assert st["worker_fetches"] - before == len(files)
    assert s3_bucket.proxy.count(predicate=is_object_get) == len(files)
    assert st["errors"] == 0


def test_the_read_after_a_workers_metadata_get_is_answered_from_memory(s3_bucket: Bucket,
                                                                       mount,
                                                                       tmp_path) -> None:
    """The worker's GET of a small file for its metadata (the stat before an open) hands the
    bytes back too, and the read that follows is answered from them, not from the block file
    the worker wrote: with that file damaged in between, the read still gets the right bytes
    with no second GET and finds nothing damaged (it read the file: 1 damaged, 2 GETs)."""
    assert s3_bucket.proxy is not None
    data = blob(50 * KiB, 41)
    s3_bucket.put("first", b"1")
    s3_bucket.put("m/f", data)
    m = mount(s3_bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")
    s3_bucket.proxy.reset()
    os.stat(m.path / "m" / "f")  # the metadata GET, by the worker
    (victim,) = [p for p in (tmp_path / "cache").rglob("*.val") if p.stat().st_size > 40 * KiB]
    with open(victim, "r+b") as f:  # flip one bit of the block the worker cached
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x40]))
    assert (m.path / "m" / "f").read_bytes() == data
    assert s3_bucket.proxy.count(predicate=is_object_get) == 1
    st = m.stats()
    assert st["errors"] == 0 and st["corrupt_blocks"] == 0


# --- uploads -----------------------------------------------------------------------------------


def _keys(b: Bucket) -> list[str]:
    client, name = b.extra["client"], b.extra["name"]
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(out)


def _open_uploads(b: Bucket) -> int:
    client, name = b.extra["client"], b.extra["name"]
    return len(client.list_multipart_uploads(Bucket=name).get("Uploads", []))


def test_uploads_go_through_the_workers_on_every_store(bucket: Bucket, mount) -> None:
    bucket.put("first", b"1")
    m = mount(bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")
    files = {f"w{i}.bin": blob(60 * KiB + i, 20 + i) for i in range(4)} | {"sub/e": b""}
    (m.path / "sub").mkdir()
    for k, v in files.items():
        (m.path / k).write_bytes(v)
    r = sync(m)
    assert r.returncode == 0, r.stderr
    _wait_until(lambda: m.stats()["staged_bytes"] == 0, "the files leave the staging area")
    gets = bucket.object_gets()
    for k, v in files.items():
        assert bucket.get(k) == v
        drop_page_cache(m.path / k)
        assert (m.path / k).read_bytes() == v
    # the worker put what it uploaded into the block cache under the keys the reader uses:
    # reading the files back asks the store for nothing
    if gets is not None:
        assert bucket.object_gets() == gets
    st = m.stats()
    # every upload was sent by the worker, none by the FUSE process
    assert st["worker_uploads"] == st["uploads_done"] == len(files)
    assert st["uploads_failed"] == 0 and st["worker_restarts"] == 0


def _kill_the_worker_mid_request(b: Bucket, m: MountProc, held) -> int:  # type: ignore[no-untyped-def]
    """Wait until the proxy holds a request ``held(method, path)`` selects, then kill the
    worker sending it and let requests through again; the dead worker's pid."""
    proxy = b.proxy
    assert proxy is not None
    _wait_until(lambda: any(held(r.method, r.target) for r in proxy.requests()),
                "the worker's request", 60)
    (pid,) = m.stats()["worker_pids"]
    os.kill(pid, signal.SIGKILL)
    _wait_until(lambda: not _alive(pid), "the worker's end")
    proxy.slow(None, 0)
    return pid


def test_a_worker_killed_mid_upload_is_replaced_and_the_upload_lands_once(
        s3_bucket: Bucket, mount) -> None:
    proxy = s3_bucket.proxy
    assert proxy is not None
    s3_bucket.put("first", b"1")
    data = blob(300 * KiB, 30)
    m = mount(s3_bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")

    def held(method: str, path: str) -> bool:
        return method == "PUT" and f"/{s3_bucket.extra['name']}/up.bin" in path

    proxy.slow(held, 30)
    try:
        (m.path / "up.bin").write_bytes(data)
        pid = _kill_the_worker_mid_request(s3_bucket, m, held)
    finally:
        proxy.slow(None, 0)
    r = sync(m)
    assert r.returncode == 0, r.stderr
    assert s3_bucket.get("up.bin") == data
    assert _keys(s3_bucket) == ["first", "up.bin"]  # no conflict copy of its own upload
    st = m.stats()
    assert st["worker_restarts"] == 1 and pid not in st["worker_pids"]
    assert st["uploads_failed"] == 0 and st["uploads_pending"] == 0
    log = m.log_text()
    assert "with 1 request(s) in flight" in log  # the worker died sending the upload
    assert "Traceback" not in log


MiB = 1024 * KiB


def _parts_of(b: Bucket, key: str):  # type: ignore[no-untyped-def]
    """``(method, path) -> bool``: a part of a multipart upload of ``key`` in ``b`` (the
    proxy serves every bucket of the session)."""
    where = f"/{b.extra['name']}/{key}"
    return lambda method, path: method == "PUT" and "uploadId=" in path and where in path


def test_a_worker_killed_mid_multipart_upload_leaves_none_open(s3_bucket: Bucket,
                                                                  mount) -> None:
    proxy = s3_bucket.proxy
    assert proxy is not None
    s3_bucket.put("first", b"1")
    data = blob(12 * MiB, 31)
    m = mount(s3_bucket, "--fetch-workers", "1", "--upload-part-size", "5M")
    _start_workers(m, 1, "first")
    is_part = _parts_of(s3_bucket, "big")
    proxy.slow(is_part, 30)
    try:
        (m.path / "big").write_bytes(data)
        _kill_the_worker_mid_request(s3_bucket, m, is_part)
    finally:
        proxy.slow(None, 0)
    r = sync(m)
    assert r.returncode == 0, r.stderr
    assert s3_bucket.get("big") == data
    # the upload the dead worker began was aborted by the FUSE process, which had journaled it
    assert _open_uploads(s3_bucket) == 0, "none left to bill"
    assert "aborted a multipart upload a worker process that died left" in m.log_text()
    assert m.stats()["worker_restarts"] == 1


def test_a_workers_multipart_upload_is_journaled_before_its_first_part(
        s3_bucket: Bucket, mount, tmp_path) -> None:
    """``kill -9`` of the daemon while a worker's part is held: the next mount finds the
    upload id in the journal (it was journaled before any part was sent) and aborts it."""
    proxy = s3_bucket.proxy
    assert proxy is not None
    s3_bucket.put("first", b"1")
    data = blob(12 * MiB, 32)
    cache = tmp_path / "c"
    m = mount(s3_bucket, "--fetch-workers", "1", "--upload-part-size", "5M", cache_dir=cache)
    _start_workers(m, 1, "first")
    (pid,) = m.stats()["worker_pids"]
    is_part = _parts_of(s3_bucket, "big")
    proxy.slow(is_part, 30)
    try:
        (m.path / "big").write_bytes(data)
        bg = subprocess.Popen([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(lambda: proxy.count(predicate=lambda r: is_part(r.method, r.target)) > 0,
                    "a part", 60)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        m.stop()
        bg.wait(30)
        _wait_until(lambda: not _alive(pid), "the worker's end (it dies with the daemon)")
    finally:
        proxy.slow(None, 0)
    assert _open_uploads(s3_bucket) == 1
    m2 = mount(s3_bucket, "--fetch-workers", "1", "--upload-part-size", "5M", cache_dir=cache)
    r = sync(m2)
    assert r.returncode == 0, r.stderr
    assert s3_bucket.get("big") == data
    assert _open_uploads(s3_bucket) == 0, "none left to bill"
    assert "aborted a multipart upload an earlier mount left" in m2.log_text()


# --- listings ----------------------------------------------------------------------------------


def test_listings_go_through_the_workers_on_every_store(bucket: Bucket, mount) -> None:
    bucket.put("first", b"1")
    names = [f"f{i:03d}" for i in range(30)]
    for n in names:
        bucket.put(f"sub/{n}", n.encode())
    bucket.put("sub/deeper/x", b"x")
    m = mount(bucket, "--fetch-workers", "1")
    _start_workers(m, 1, "first")
    before = m.stats()["worker_lists"]
    assert sorted(os.listdir(m.path / "sub")) == sorted([*names, "deeper"])
    assert (m.path / "sub" / "f007").read_bytes() == b"f007"
    assert os.listdir(m.path / "sub" / "deeper") == ["x"]
    st = m.stats()
    assert st["worker_lists"] - before >= 2  # sub/ and sub/deeper/, by the worker
    assert st["errors"] == 0 and st["worker_restarts"] == 0


def test_a_worker_killed_mid_listing_is_restarted_and_the_listing_is_right(
        s3_bucket: Bucket, mount) -> None:
    proxy = s3_bucket.proxy
    assert proxy is not None
    s3_bucket.put("first", b"1")
    names = [f"n{i:03d}" for i in range(40)]
    for n in names:
        s3_bucket.put(f"dir/{n}", b"")
    name = s3_bucket.extra["name"]

    def held(method: str, path: str) -> bool:
        return method == "GET" and f"/{name}" in path and "prefix=dir" in path

    m = mount(s3_bucket, "--fetch-workers", "1", "--stall-timeout", "60")
    _start_workers(m, 1, "first")
    proxy.slow(held, 30)
    got: list[list[str] | BaseException] = []

    def listing() -> None:
        try:
            got.append(sorted(os.listdir(m.path / "dir")))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            got.append(exc)

    t = threading.Thread(target=listing)
    t.start()
    try:
        _kill_the_worker_mid_request(s3_bucket, m, held)
        t.join(60)
    finally:
        proxy.slow(None, 0)
    assert got == [names]
    st = m.stats()
    assert st["worker_restarts"] == 1 and st["worker_retries"] >= 1
    assert st["worker_lists"] >= 1 and st["errors"] == 0


def test_a_prefetch_fetches_a_block_the_cache_evicted_since_this_mount_read_it(
        s3_bucket: Bucket, mount) -> None:
    """The prefetcher skips blocks this mount fetched lately without asking the cache, but
    only while the cache is far from its bound: in a full cache such a block may be gone, and
    a prefetch of it then fetches it (a read after it makes no request)."""
    import json

    assert s3_bucket.proxy is not None
    files = {f"e/f{i:02d}": blob(64 * KiB, 60 + i) for i in range(32)}  # 2 MiB
    for k, v in files.items():
        s3_bucket.put(k, v)
    s3_bucket.put("first", b"1")
    m = mount(s3_bucket, "--fetch-workers", "1", "--block-size", "64K", "--cache-size", "1M",
              "--metadata-probe", "off")
    _start_workers(m, 1, "first")
    for k, v in files.items():  # e/f00 first: evicted by the files after it
        assert (m.path / k).read_bytes() == v

    def cached(key: str) -> int:
        r = subprocess.run([sys.executable, "-m", "fusefs", "stats", str(m.path), key,
                            "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["cached_blocks"])

    _wait_until(lambda: cached("e/f00") == 0, "e/f00 evicted")
    gets = s3_bucket.object_gets()
    r = subprocess.run([sys.executable, "-m", "fusefs", "prefetch", str(m.path), "e/f00",
                        "--wait"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert s3_bucket.object_gets() == gets + 1  # fetched again, not skipped
    assert (m.path / "e" / "f00").read_bytes() == files["e/f00"]
    assert s3_bucket.object_gets() == gets + 1
