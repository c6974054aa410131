"""Lifecycle of a real mount daemon: SIGTERM/SIGINT with reads in flight against a slowed server,
a SIGKILLed daemon's dead mount recovered with its block cache, other users and containers."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, MountProc, make_local_bucket
from svc_support import (
    GROUP_MEMBER,
    OWNER,
    SHARED_GID,
    STRANGER,
    WorldDir,
    fuse_mount_at,
    fusefs_cmd,
    run_as,
    wait_answering,
)

KiB, MiB = 1024, 1024 * 1024
BLOCK = 256 * KiB
#: generous bound for "within a few seconds" on a noisy 2-core machine
STOP_BOUND = 15.0


def _gets(bucket: Bucket) -> int:
    n = bucket.object_gets()
    assert n is not None
    return n


def _slow_reader(path: Path, offset: int, size: int, out: dict[str, Any]) -> threading.Thread:
    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            out["data"] = os.pread(fd, size, offset)
        except OSError as exc:
            out["error"] = exc
        finally:
            with contextlib.suppress(OSError):  # FLUSH fails once the mount is gone
                os.close(fd)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigterm_with_read_stuck_on_slow_server(s3_bucket: Bucket, mount,
                                                record_property) -> None:
    data = os.urandom(4 * BLOCK)
    s3_bucket.put("slow/big.bin", data)
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    assert s3_bucket.proxy is not None
    before = _gets(s3_bucket)
    s3_bucket.proxy.slow(lambda method, path: method == "GET" and "big.bin" in path, 60.0)
    try:
        out: dict[str, Any] = {}
        reader = _slow_reader(m.path / "slow/big.bin", 0, 64 * KiB, out)
        _wait_for(lambda: _gets(s3_bucket) > before, 15, "the GET to reach the server")
        assert m.proc is not None
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        rc = m.proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        s3_bucket.proxy.slow(None, 0)
    record_property("sigterm_stop_seconds", round(took, 2))
    print(f"\nSIGTERM with a read stuck on a 60 s GET: exit {rc} after {took:.2f}s")
    assert rc == 0
    assert took < STOP_BOUND
    assert fuse_mount_at(m.path) is None  # unmounted, not left dead
    reader.join(STOP_BOUND)
    assert not reader.is_alive()  # the stuck reader got an error instead of hanging
    assert isinstance(out.get("error"), OSError)
    assert out["error"].errno in (errno.ECONNABORTED, errno.ENOTCONN, errno.EIO)
    log = m.log_text()
    assert "SIGTERM: stopping" in log and "unmounted " in log


def test_sigterm_lets_a_short_read_finish(s3_bucket: Bucket, mount) -> None:
    data = os.urandom(100 * KiB)
    s3_bucket.put("small.bin", data)
    # the open's stat learns the metadata with a HEAD (with "auto" it is a GET of the small
    # file, made at the open: the held GET would then be the open's, not the read's)
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--metadata-probe", "head")
    assert s3_bucket.proxy is not None
    before = _gets(s3_bucket)
    s3_bucket.proxy.slow(lambda method, path: method == "GET" and "small.bin" in path, 0.3)
    try:
        out: dict[str, Any] = {}
        reader = _slow_reader(m.path / "small.bin", 0, 4096, out)
        _wait_for(lambda: _gets(s3_bucket) > before, 15, "the GET to reach the server")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        rc = m.proc.wait(timeout=60)
    finally:
        s3_bucket.proxy.slow(None, 0)
    reader.join(5)
    assert rc == 0
    assert out.get("data") == data[:4096], out  # finished within the grace period
    assert fuse_mount_at(m.path) is None


def test_sigint_and_double_signal(tmp_path: Path, mount) -> None:
    b = make_local_bucket(tmp_path / "src")
    b.put("f.txt", b"x")
    m1 = mount(b)
    assert m1.proc is not None
    m1.proc.send_signal(signal.SIGINT)
    assert m1.proc.wait(timeout=STOP_BOUND) == 0
    assert fuse_mount_at(m1.path) is None
    assert "SIGINT: stopping" in m1.log_text()
    # a second signal does not kill it half way: still a clean exit
    m2 = mount(b)
    assert m2.proc is not None
    m2.proc.send_signal(signal.SIGTERM)
    m2.proc.send_signal(signal.SIGTERM)
    assert m2.proc.wait(timeout=STOP_BOUND) == 0
    assert fuse_mount_at(m2.path) is None


def test_sigkill_dead_mount_recovered_and_cache_survives(s3_bucket: Bucket, tmp_path: Path,
                                                          mount) -> None:
    data = os.urandom(4 * BLOCK + 123)
    s3_bucket.put("keep/data.bin", data)
    cache = tmp_path / "cache"
    m1 = mount(s3_bucket, "--block-size", str(BLOCK), cache_dir=cache)
    assert (m1.path / "keep/data.bin").read_bytes() == data
    assert m1.stats()["fetches"] == 5
    assert m1.proc is not None
    m1.proc.kill()
    m1.proc.wait(10)
    with pytest.raises(OSError) as ei:
        os.listdir(m1.path)
    assert ei.value.errno == errno.ENOTCONN  # the dead mount "Transport endpoint..."
    gets = _gets(s3_bucket)

    m2 = MountProc(s3_bucket.source, m1.path, cache, ["--block-size", str(BLOCK),
                   *s3_bucket.args], s3_bucket.env, tmp_path / "restart.log")
    try:
        m2.start()
        wait_answering(m1.path, m2.proc)
        assert "dead FUSE mount" in m2.log_text()
        assert (m1.path / "keep/data.bin").read_bytes() == data
        s = m2.stats()
        assert s["fetches"] == 0 and s["hits"] > 0
        assert _gets(s3_bucket) == gets  # every block came from the surviving cache
    finally:
        rc = m2.stop()
    assert rc == 0


def _start(world: WorldDir, src: Path, mp: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FUSEFS_CONFIG_PATH": os.devnull}
    proc = world.popen(fusefs_cmd("mount", f"file://{src}", str(mp), "--foreground",
                              "--cache-dir", str(world.path / "cache"), *args), env=env)
    wait_answering(mp, proc)
    return proc


def _seed(world: WorldDir) -> Path:
    src = world.mkdir("src", 0o700)
    (src / "d").mkdir()
    (src / "d/f.txt").write_bytes(b"hello\n")
    return src


def test_other_users_need_allow_other(world: WorldDir) -> None:
    src = _seed(world)
    mp = world.mkdir("private")
    _start(world, src, mp)
    r = run_as(OWNER, SHARED_GID, "cat", str(mp / "d/f.txt"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert (mp / "d/f.txt").read_bytes() == b"hello\n"  # the mounting user (root) can


def test_allow_other_with_owner_modes_and_read_only(world: WorldDir) -> None:
    src = _seed(world)
    mp = world.mkdir("shared")
    _start(world, src, mp, "--allow-other", "--uid", str(OWNER), "--gid", str(SHARED_GID),
           "--file-mode", "0640", "--dir-mode", "0750", "--read-only")
    st = os.stat(mp / "d/f.txt")
    assert (st.st_uid, st.st_gid) == (OWNER, SHARED_GID)
    assert st.st_mode & 0o7777 == 0o440  # read-only: no write bits
    assert os.stat(mp / "d").st_mode & 0o7777 == 0o550
    fstype, opts = fuse_mount_at(mp) or ("", "")
    # the kernel side is ro too (no atime GETATTR); commands take the control socket
    assert fstype == "fuse.fusefs" and "ro" in opts.split(",") and "allow_other" in opts
    # the kernel enforces the modes (default_permissions)
    assert run_as(OWNER, OWNER, "cat", str(mp / "d/f.txt")).stdout == "hello\n"
    member = run_as(GROUP_MEMBER, GROUP_MEMBER, "cat", str(mp / "d/f.txt"),
                    groups=(SHARED_GID,))
    assert member.returncode == 0 and member.stdout == "hello\n"
    stranger = run_as(STRANGER, STRANGER, "ls", str(mp / "d"))
    assert stranger.returncode != 0 and "Permission denied" in stranger.stderr
    with pytest.raises(OSError) as ei:
        open(mp / "d/f.txt", "r+b")
    assert ei.value.errno == errno.EROFS


def _in_container(mp: Path, target: Path, uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """What ``docker run -v MP:TARGET --user UID`` does: a new mount namespace, a bind mount of
    the host's mount into it, a process of another uid reading there. The namespace (and the bind
    mount) ends with the process."""
    script = f'mount --bind "$1" "$2" && shift 2 && exec setpriv --reuid={uid} --regid={uid} ' \
             '--clear-groups "$@"'
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh", str(mp), str(target), *cmd],
                          capture_output=True, text=True, timeout=30)


def test_container_bind_mount_read_by_another_uid(world: WorldDir) -> None:
    src = _seed(world)
    target = world.mkdir("container-data")
    private = world.mkdir("no-allow-other")
    _start(world, src, private)
    denied = _in_container(private, target, STRANGER, "cat", str(target / "d/f.txt"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    shared = world.mkdir("allow-other")
    _start(world, src, shared, "--allow-other")
    r = _in_container(shared, target, STRANGER, "cat", str(target / "d/f.txt"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    assert fuse_mount_at(target) is None  # the bind mount lived only in the namespace


def test_fusefs_in_a_namespace_shares_its_mount_rshared(world: WorldDir) -> None:
    """fusefs run inside a container with ``-v /mnt/data:/mnt/data:rshared``: the mount it makes
    on the volume appears on the host, and leaves it when fusefs stops."""
    src = _seed(world)
    vol = world.mkdir("volume")
    subprocess.run(["mount", "--bind", str(vol), str(vol)], check=True)
    subprocess.run(["mount", "--make-shared", str(vol)], check=True)
    env = {**os.environ, "FUSEFS_CONFIG_PATH": os.devnull}
    proc = world.popen(["unshare", "--mount", "--propagation", "unchanged", "--",
                        *fusefs_cmd("mount", f"file://{src}", str(vol), "--foreground",
                                "--allow-other", "--cache-dir", str(world.path / "cache"))],
                       env=env)
    wait_answering(vol, proc)  # seen from the host's namespace
    assert fuse_mount_at(vol) is not None
    r = run_as(STRANGER, STRANGER, "cat", str(vol / "d/f.txt"))
    assert r.returncode == 0 and r.stdout == "hello\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_BOUND) == 0
    assert fuse_mount_at(vol) is None
