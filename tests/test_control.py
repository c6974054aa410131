"""The control file ``MOUNT/.fusefs`` and the CLI verbs that use it, on real mounts.

S3 (moto behind the counting proxy) where the server's request log is the evidence, the local
backend elsewhere. No timing assertions: ordering comes from the proxy's request log and a gate
that holds prefetch GETs at the server until the test opens it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, MountProc, blob, drop_page_cache

from fusefs.testing.proxy import Request, is_object_get

KiB = 1024
BLOCK = 256 * KiB


def blocks_of(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def command(mp: Path, *chunks: bytes) -> tuple[int, dict[str, Any]]:
    """Write ``chunks`` (one write each) on one handle, then read it: (errno or 0, JSON)."""
    fd = os.open(mp / ".fusefs", os.O_RDWR)
    err = 0
    try:
        for c in chunks:
            try:
                assert os.write(fd, c) == len(c)
            except OSError as exc:
                err = exc.errno or -1
                break
        out = b""
        while data := os.read(fd, 65536):
            out += data
    finally:
        os.close(fd)
    return err, json.loads(out)


def ok(mp: Path, line: str) -> dict[str, Any]:
    err, result = command(mp, (line + "\n").encode())
    assert err == 0, result
    return result


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusefs", *args], capture_output=True, text=True, env=env,
        timeout=120,
    )


def gets(bucket: Bucket, under: str = "") -> list[Request]:
    """Object GETs the server saw for this bucket (keys under ``under``)."""
    assert bucket.proxy is not None
    prefix = f"/{bucket.extra['name']}/{under}"
    return [r for r in bucket.proxy.requests() if is_object_get(r) and r.path.startswith(prefix)]


def wait_for(cond: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def request_state(m: MountProc, req_id: int) -> dict[str, Any]:
    return next(r for r in m.stats()["prefetch_requests"] if r["id"] == req_id)


# --- statistics ------------------------------------------------------------------------------


def test_stats_follow_reads_and_the_server_log(s3_bucket: Bucket, mount) -> None:
    data = {"d/a.bin": blob(3 * BLOCK + 100, 1), "d/b.bin": blob(BLOCK, 2), "d/e/c": b"tiny"}
    for k, v in data.items():
        s3_bucket.put(k, v)
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    s0 = m.stats()
    for key in ("cache_dir", "cache_size", "cache_size_str", "current_size", "current_size_str",
                "current_count", "load_factor", "block_size", "hits", "misses", "hit_ratio",
                "bytes_served", "bytes_fetched", "fetches", "fetches_in_flight", "evictions",
                "prefetch_queued", "prefetch_done", "prefetch_failed", "errors", "uptime_s",
                "source"):
        assert key in s0, key
    assert s0["block_size"] == BLOCK and s0["cache_size_str"] == "32.0GB"
    assert "testing" not in json.dumps(s0)  # no credentials
    assert s0["fetches"] == s0["hits"] == s0["misses"] == 0

    before = len(gets(s3_bucket))
    assert (m.path / "d/a.bin").read_bytes() == data["d/a.bin"]
    s1 = m.stats()
    new = gets(s3_bucket)[before:]
    assert s1["fetches"] == len(new) == blocks_of(len(data["d/a.bin"]))
    assert s1["bytes_fetched"] == sum(r.bytes_out for r in new) == len(data["d/a.bin"])
    assert s1["bytes_served"] == len(data["d/a.bin"])
    assert s1["misses"] >= 1 and s1["current_count"] == 4
    assert s1["current_size"] >= len(data["d/a.bin"])

    drop_page_cache(m.path / "d/a.bin")  # the kernel's copy; the block cache stays
    assert (m.path / "d/a.bin").read_bytes() == data["d/a.bin"]
    s2 = m.stats()
    assert len(gets(s3_bucket)) == before + 4  # served from the block cache
    assert s2["fetches"] == s1["fetches"] and s2["misses"] == s1["misses"]
    assert s2["hits"] > s1["hits"] and s2["bytes_served"] == 2 * len(data["d/a.bin"])
    assert 0 < s2["hit_ratio"] <= 1

    # per path: a folder of which one file is cached, one file, a file not cached
    d = ok(m.path, "stats d")
    total = sum(len(v) for v in data.values())
    assert d == {"path": "d", "type": "directory", "files": 3, "size": total,
                 "size_str": d["size_str"], "cached_bytes": len(data["d/a.bin"]),
                 "cached_bytes_str": d["cached_bytes_str"], "blocks": 4 + 1 + 1,
                 "cached_blocks": 4, "fraction_cached": round(len(data["d/a.bin"]) / total, 4)}
    a = ok(m.path, f"stats {m.path}/d/a.bin")  # an absolute path inside the mount
    assert (a["type"], a["files"], a["cached_blocks"], a["fraction_cached"]) == ("file", 1, 4, 1.0)
    assert ok(m.path, "stats d/b.bin")["cached_bytes"] == 0

    # the CLI: a human table by default, JSON on request
    r = cli("stats", str(m.path))
    assert r.returncode == 0, r.stderr
    assert "hits / misses" in r.stdout and "32.0GB" in r.stdout
    r = cli("stats", str(m.path), "d", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["cached_blocks"] == 4


# --- clear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_clear_removes_only_that_subtree(kind: str, request: pytest.FixtureRequest,
                                         mount, tmp_path: Path) -> None:
    from conftest import make_local_bucket, make_s3_bucket

    bucket = (make_s3_bucket(request.getfixturevalue("s3_server")) if kind == "s3"
              else make_local_bucket(tmp_path / "objects"))
    files = {"a/x.bin": blob(2 * BLOCK, 1), "a/sub/y.bin": blob(BLOCK + 1, 2),
             "ab.bin": blob(BLOCK, 3), "b/z.bin": blob(3 * BLOCK, 4)}
    for k, v in files.items():
        bucket.put(k, v)
    m = mount(bucket, "--block-size", str(BLOCK))
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v
    assert m.stats()["current_count"] == 2 + 2 + 1 + 3

    r = cli("clear", str(m.path), "a")
    assert r.returncode == 0 and "cleared 4 blocks" in r.stdout, (r.stdout, r.stderr)
    assert ok(m.path, "stats a")["cached_blocks"] == 0
    assert ok(m.path, "stats ab.bin")["fraction_cached"] == 1.0  # "a" is not a key prefix
    assert ok(m.path, "stats b")["fraction_cached"] == 1.0
    assert m.stats()["current_count"] == 4
    assert m.stats()["evictions"] == 0  # cleared blocks are not evictions

    fetches = m.stats()["fetches"]
    n_gets = len(gets(bucket)) if kind == "s3" else 0
    for k in ("ab.bin", "b/z.bin"):
        drop_page_cache(m.path / k)
        assert (m.path / k).read_bytes() == files[k]
    assert m.stats()["fetches"] == fetches  # still cached
    if kind == "s3":
        assert len(gets(bucket)) == n_gets
    drop_page_cache(m.path / "a/x.bin")
    assert (m.path / "a/x.bin").read_bytes() == files["a/x.bin"]
    assert m.stats()["fetches"] == fetches + 2  # cleared: fetched again

    res = ok(m.path, "clear b/z.bin")
    assert (res["cleared"], res["blocks_removed"]) == ("file", 3)
    assert ok(m.path, "stats ab.bin")["cached_blocks"] == 1
    res = ok(m.path, "clear")  # the whole cache
    assert res["cleared"] == "cache" and m.stats()["current_count"] == 0


# --- prefetch --------------------------------------------------------------------------------


def test_prefetch_folder_then_reads_make_no_gets(s3_bucket: Bucket, mount) -> None:
    warm = {f"warm/{i}.bin": blob(BLOCK + i * 1000, i) for i in range(5)}
    warm["warm/deep/er/x.bin"] = blob(2 * BLOCK, 9)
    warm["warm/empty"] = b""
    for k, v in warm.items():
        s3_bucket.put(k, v)
    s3_bucket.put("cold.bin", blob(BLOCK, 10))
    m = mount(s3_bucket, "--block-size", str(BLOCK))
    assert (m.path / "warm/0.bin").read_bytes() == warm["warm/0.bin"]  # one file already cached

    r = cli("prefetch", str(m.path), "warm", "--wait")
    assert r.returncode == 0, r.stderr
    assert "prefetch #1: 5 files" in r.stderr and "2 already cached" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "100%" in last and "5/5 files" in last and "/s" in last, r.stderr
    s = m.stats()
    assert (s["prefetch_queued"], s["prefetch_done"], s["prefetch_failed"]) == (5, 5, 0)
    assert s["prefetch_pending"] == 0 and s["prefetch_bytes_pending"] == 0
    assert not gets(s3_bucket, "cold")  # only what was asked for

    n = len(gets(s3_bucket))
    fetches = s["fetches"]
    for k, v in warm.items():
        assert (m.path / k).read_bytes() == v
    assert len(gets(s3_bucket)) == n  # every block came from the cache
    assert m.stats()["fetches"] == fetches

    again = ok(m.path, f"prefetch warm {m.path}/warm/1.bin")
    assert (again["files_queued"], again["bytes_queued"], again["files_cached"]) == (0, 0, 7)
    assert request_state(m, again["id"])["state"] == "finished"


def test_prefetch_never_starves_a_foreground_read(s3_bucket: Bucket, mount) -> None:
    """With prefetch GETs held at the server, a program's read is still served; cancel works."""
    proxy = s3_bucket.proxy
    assert proxy is not None
    for i in range(6):
        s3_bucket.put(f"warm/{i}.bin", blob(BLOCK, i))
    hot = blob(BLOCK, 99)
    s3_bucket.put("hot.bin", hot)
    m = mount(s3_bucket, "--block-size", str(BLOCK), "--workers", "2")
    os.stat(m.path / "hot.bin")
    gate = threading.Event()
    held = f"/{s3_bucket.extra['name']}/warm/"

    def hold_prefetch(method: str, path: str) -> bool:
        if method == "GET" and path.startswith(held):
            gate.wait(60)  # the server "is slow" until the test opens the gate
        return False

    proxy.slow(hold_prefetch, 0.001)
    try:
        req = ok(m.path, "prefetch warm")
        assert req["files_queued"] == 6
        wait_for(lambda: gets(s3_bucket, "warm"), "the first prefetch GET")

        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append((m.path / "hot.bin").read_bytes()))
        t.start()
        t.join(60)
        assert result == [hot], "the foreground read waited behind the prefetch"
        hot_get = gets(s3_bucket, "hot.bin")
        warm_gets = gets(s3_bucket, "warm")
        assert len(hot_get) == 1 and hot_get[0].finished is not None
        # ordering: the program's read finished while every prefetch GET was still held, and
        # prefetch took no more than its share of the connections (with --workers 2: one)
        assert len(warm_gets) == 1 and warm_gets[0].finished is None

        cancelled = ok(m.path, "cancel-prefetch warm")
        assert cancelled["files_cancelled"] == 5
    finally:
        gate.set()
        proxy.slow(None, 0)
    wait_for(lambda: request_state(m, req["id"])["state"] == "finished", "prefetch to finish")
    state = request_state(m, req["id"])
    assert (state["files_done"], state["files_cancelled"], state["files_failed"]) == (1, 5, 0)
    assert len(gets(s3_bucket, "warm")) == 1  # the cancelled ones never reached the server
    assert m.stats()["prefetch_cancelled"] == 5


# --- errors and permissions ------------------------------------------------------------------


def test_bad_commands_get_errors_and_the_mount_keeps_serving(tmp_path: Path, mount) -> None:
    from conftest import make_local_bucket

    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("dir/with space.txt", b"spaced")
    bucket.put("f.txt", b"f")
    m = mount(bucket, "--block-size", str(BLOCK))
    bad = {
        "frobnicate": (errno.EINVAL, "unknown command"),
        "stats ../etc": (errno.EINVAL, "outside the mount"),
        "stats dir/../../x": (errno.EINVAL, "outside the mount"),
        "stats /etc/passwd": (errno.EINVAL, "not inside"),
        "stats nope": (errno.ENOENT, "no such file"),
        "clear f.txt/child": (errno.ENOENT, "no such file"),
        "prefetch": (errno.EINVAL, "usage"),
        "prefetch f.txt missing": (errno.ENOENT, "missing"),
        "stats a b": (errno.EINVAL, "one path"),
    }
    for line, (code, text) in bad.items():
        err, result = command(m.path, (line + "\n").encode())
        assert err == code, (line, result)
        assert result["errno"] == code and text in result["error"], (line, result)
    assert m.stats()["prefetch_queued"] == 0  # the failed prefetch queued nothing

    # words are split like a shell does; writes split anywhere; several commands per write
    assert ok(m.path, "stats 'dir/with space.txt'")["size"] == 6
    err, result = command(m.path, b"sta", b"ts di", b"r\n")
    assert err == 0 and result["files"] == 1
    err, result = command(m.path, b"stats f.txt\nstats dir\n")
    assert err == 0 and result["path"] == "dir"
    err, result = command(m.path, b"stats nope\nprefetch dir\n")  # stops at the first error
    assert err == errno.ENOENT and result["command"] == "stats"
    assert m.stats()["prefetch_queued"] == 0
    # a last line without a newline runs at close; `echo cmd > .fusefs` works from a shell
    for last in (b"frobnicate", b"stats 'unclosed quote\n"):
        fd = os.open(m.path / ".fusefs", os.O_WRONLY)
        os.write(fd, last)
        with pytest.raises(OSError) as ei:
            os.close(fd)
        assert ei.value.errno == errno.EINVAL
    r = subprocess.run(["sh", "-c", f"echo 'prefetch dir' > '{m.path}/.fusefs'"])
    assert r.returncode == 0
    wait_for(lambda: m.stats()["prefetch_done"] == 1, "the shell's prefetch")

    # the CLI: one line, non-zero exit, no traceback
    for args in (["stats", str(m.path), "nope"], ["prefetch", str(m.path), "/etc"],
                 ["clear", str(tmp_path), "x"]):
        r = cli(*args)
        assert r.returncode == 1, (args, r)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("fusefs: ")
    assert (m.path / "f.txt").read_bytes() == b"f"
    assert sorted(os.listdir(m.path)) == ["dir", "f.txt"]


def _as_user(uid: int, cwd: Path, fn: Any) -> tuple[int, str]:
    """Run ``fn()`` in a forked child as ``uid`` with ``cwd`` as its working directory."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.chdir(cwd)  # as root; /proc/self/cwd then reaches the mount without the 0700 tmp
            os.dup2(w, 1)
            os.dup2(w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - pytest replaced them
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            code = fn()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(2, f"child: {exc!r}\n".encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode()


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root")
def test_only_the_mounting_user_may_write(tmp_path: Path, mount) -> None:
    from conftest import make_local_bucket

    from fusefs import cli as fusefs_cli

    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("f.txt", b"data")
    # files shown as owned by nobody; the control file stays the mounting user's (root's)
    m = mount(bucket, "--allow-other", "--uid", "65534", "--gid", "65534")
    (m.path / "f.txt").read_bytes()
    assert os.stat(m.path / "f.txt").st_uid == 65534
    st = os.stat(m.path / ".fusefs")
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    cached = m.stats()["current_count"]
    assert cached == 1

    def read_stats() -> int:
        with open("/proc/self/cwd/.fusefs", "rb") as f:
            return 0 if "hits" in json.loads(f.read()) else 1

    def write_command() -> int:
        try:
            fd = os.open("/proc/self/cwd/.fusefs", os.O_WRONLY)
        except PermissionError:
            return 13
        os.close(fd)
        return 0

    assert _as_user(65534, m.path, read_stats) == (0, "")  # anyone may read the stats
    assert _as_user(65534, m.path, write_command)[0] == errno.EACCES
    code, out = _as_user(65534, m.path, lambda: fusefs_cli.main(["clear", "/proc/self/cwd"]))
    assert code == 1 and out.strip().splitlines() == [
        "fusefs: /proc/self/cwd: only the user who mounted it (or root) may send commands"
    ]
    code, out = _as_user(65534, m.path, lambda: fusefs_cli.main(["stats", "/proc/self/cwd"]))
    assert code == 0 and "hits / misses" in out
    assert m.stats()["current_count"] == cached  # nothing was cleared
    assert ok(m.path, "clear")["blocks_removed"] == 1  # the mounting user may


def test_disabled_cache_has_no_disk_and_refuses_prefetch(tmp_path: Path, mount) -> None:
    from conftest import make_local_bucket

    bucket = make_local_bucket(tmp_path / "objects")
    data = blob(3 * BLOCK, 5)
    bucket.put("f.bin", data)
    cache = tmp_path / "no-cache"
    m = mount(bucket, "--block-size", str(BLOCK), "--cache-size", "0", cache_dir=cache)
    assert (m.path / "f.bin").read_bytes() == data
    s = m.stats()
    assert (s["cache_dir"], s["cache_size"], s["current_size"], s["current_count"]) == (
        None, 0, 0, 0)
    assert s["fetches"] == 3 and not cache.exists()
    err, result = command(m.path, b"prefetch f.bin\n")
    assert err == errno.EINVAL and "disabled" in result["error"]
    assert ok(m.path, "stats f.bin")["cached_blocks"] == 0
    r = cli("stats", str(m.path))
    assert r.returncode == 0 and "disabled" in r.stdout


# --- the core, without a kernel mount --------------------------------------------------------


def _core(tmp_path: Path, **settings: Any) -> Any:
    """A real Mount's parts (local store, disk cache) over ``tmp_path/objects``, not mounted."""
    from fusefs.config import load_settings
    from fusefs.mount import build

    cli = {"cache_dir": str(tmp_path / "cache"), "block_size": str(BLOCK), **settings}
    return build(f"file://{tmp_path}/objects", "/mnt/data",
                 load_settings(cli, env={}, config_path=os.devnull))


def test_paths_and_line_splitting_without_a_mount(tmp_path: Path) -> None:
    import trio

    from fusefs.errors import AccessDenied, InvalidArgument

    (tmp_path / "objects/a dir").mkdir(parents=True)
    (tmp_path / "objects/a dir/f\nnewline").write_bytes(b"x" * 10)
    ctl = _core(tmp_path).control
    rel = ctl.relative
    assert [rel("."), rel("a/./b//c"), rel("a/../b"), rel("/mnt/data"), rel("/mnt/data/x/")] == [
        "", "a/b/c", "b", "", "x"]
    for bad in ("..", "../x", "a/../../x", "/mnt/database", "/mnt/data/../etc", "/etc", "", "a\0"):
        with pytest.raises(InvalidArgument):
            rel(bad)
    with pytest.raises(AccessDenied):
        ctl.open(ctl.owner_uid + 12345, os.O_WRONLY)
    ctl.open(ctl.owner_uid + 12345, os.O_RDONLY)  # anyone may read

    async def main() -> None:
        fh = ctl.open(ctl.owner_uid, os.O_RDWR)
        # a newline inside quotes is part of the name; the command ends at the next one
        assert await ctl.write(fh, b"stats 'a dir/f\n") == 15
        await ctl.write(fh, b"newline'\n")
        assert json.loads(ctl.read(fh, 0, 4096))["size"] == 10
        with pytest.raises(InvalidArgument):
            await ctl.write(fh, b"stats 'a dir' extra\n")
        assert json.loads(ctl.read(fh, 0, 4096))["code"] == "EINVAL"
        ctl.release(fh)

    trio.run(main)


def test_prefetch_queue_without_a_mount(tmp_path: Path) -> None:
    """Queue, run and cancel through the real reader and disk cache, without FUSE."""
    import trio

    (tmp_path / "objects/d/e").mkdir(parents=True)
    files = {"d/a": blob(3 * BLOCK, 1), "d/e/b": blob(BLOCK + 5, 2), "d/z": b""}
    for k, v in files.items():
        (tmp_path / "objects" / k).write_bytes(v)
    m = _core(tmp_path, workers="4")
    ctl = m.control

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            m.reader.start(nursery)
            first = await ctl.execute(["prefetch", "d/e", "d"])
            assert (first["files"], first["files_queued"], first["bytes_queued"]) == (
                3, 2, 4 * BLOCK + 5)
            # no await since the command returned: the workers have not taken a block yet
            dropped = ctl.prefetcher.cancel("d/a")
            assert dropped == {"files_cancelled": 1, "blocks_cancelled": 3,
                               "bytes_cancelled": 3 * BLOCK}
            await wait_idle()
            partial = await ctl.execute(["stats", "d"])
            assert (partial["files"], partial["cached_blocks"], partial["blocks"]) == (3, 2, 5)
            again = await ctl.execute(["prefetch", "/mnt/data/d"])
            assert (again["files_queued"], again["files_cached"]) == (1, 2)
            await wait_idle()
            nursery.cancel_scope.cancel()
        reqs = ctl.prefetcher.requests()
        assert [(r["files_done"], r["files_cancelled"], r["bytes_done"]) for r in reqs] == [
            (1, 1, BLOCK + 5), (1, 0, 3 * BLOCK)]
        assert (await ctl.execute(["stats", "d"]))["fraction_cached"] == 1.0

    async def wait_idle() -> None:
        while any(r["state"] == "running" for r in ctl.prefetcher.requests()):
            await trio.sleep(0.01)

    trio.run(main)
    m.blocks.close()


def test_quoted_newlines_are_scanned_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted name with 20,000 newlines, written 16 bytes at a time, is one command, and
    parsing it examines each byte a bounded number of times (issue 8 item 16: the buffer was
    re-split with shlex at every newline, quadratic in the payload)."""
    import shlex

    import trio

    from fusefs import control as control_mod
    from fusefs.errors import NotFound

    (tmp_path / "objects").mkdir()
    (tmp_path / "objects/a\nb").write_bytes(b"abc")
    ctl = _core(tmp_path).control
    payload = b"stats 'x" + b"\n" * 20_000 + b"y'\nstats \"a\n\\\"b\" extra\nstats 'a\nb'\n"
    budget = 2 * len(payload)
    parsed = {"chars": 0, "lines": 0}
    real_split = shlex.split

    def counting_split(s: str, *a: Any, **kw: Any) -> list[str]:
        parsed["chars"] += len(s)
        parsed["lines"] += 1
        if parsed["chars"] > budget:
            raise AssertionError(f"parsed {parsed['chars']} characters for {len(payload)}")
        return real_split(s, *a, **kw)

    monkeypatch.setattr(control_mod.shlex, "split", counting_split)

    async def main() -> None:
        fh = ctl.open(ctl.owner_uid, os.O_RDWR)
        first = payload.index(b"y'\n") + 3
        for i in range(0, first, 16):
            chunk = payload[i : min(i + 16, first)]
            if i + 16 < first:
                assert await ctl.write(fh, chunk) == len(chunk)
            else:  # the closing quote and newline: the command runs (and fails: no such name)
                with pytest.raises(NotFound):
                    await ctl.write(fh, chunk)
        err = json.loads(ctl.read(fh, 0, 1 << 20))
        newlines = max(err["error"].count("\n"), err["error"].count("\\n"))  # as is, or repr
        assert err["code"] == "ENOENT" and newlines == 20_000
        assert parsed["lines"] == 1
        # an escaped quote inside double quotes does not close them: one line, 3 words
        with pytest.raises(InvalidArgument):
            await ctl.write(fh, payload[first:].split(b"stats 'a")[0])
        assert parsed["lines"] == 2 and "one path" in json.loads(ctl.read(fh, 0, 4096))["error"]
        await ctl.write(fh, b"stats 'a\nb'\n")
        assert json.loads(ctl.read(fh, 0, 4096))["size"] == 3
        assert ctl._handles[fh].lines.scan_work <= len(payload)
        ctl.release(fh)

    from fusefs.errors import InvalidArgument

    trio.run(main)
    assert parsed["chars"] <= budget


def test_prefetch_contains_cache_errors(tmp_path: Path) -> None:
    """A block cache that fails (SQLite "database is locked") while the prefetcher checks a
    block fails that file, logged and counted; the prefetcher and the serving nursery go on
    (issue 8 item 8: the error escaped the background task and ended the mount)."""
    import sqlite3

    import trio

    (tmp_path / "objects/d").mkdir(parents=True)
    files = {"d/a": blob(2 * BLOCK, 1), "d/b": blob(BLOCK, 2), "d/c": blob(BLOCK, 3)}
    for k, v in files.items():
        (tmp_path / "objects" / k).write_bytes(v)
    m = _core(tmp_path, workers="3")  # one prefetch task: blocks are taken in order
    ctl = m.control
    real_contains = m.blocks.contains

    def broken_contains(bkey: Any) -> bool:
        if bkey.key == "d/a":
            raise sqlite3.OperationalError("database is locked")
        return real_contains(bkey)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            m.reader.start(nursery)
            first = await ctl.execute(["prefetch", "d"])
            assert first["files_queued"] == 3
            m.blocks.contains = broken_contains  # type: ignore[method-assign]
            while ctl.prefetcher.requests()[0]["state"] == "running":
                await trio.sleep(0.01)
            m.blocks.contains = real_contains  # type: ignore[method-assign]
            again = await ctl.execute(["prefetch", "d/a"])  # still serving: a new prefetch runs
            assert again["files_queued"] == 1
            while ctl.prefetcher.requests()[-1]["state"] == "running":
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        first_req, second_req = ctl.prefetcher.requests()
        assert (first_req["files_failed"], first_req["files_done"]) == (1, 2)
        assert "database is locked" in first_req["errors"][0]
        assert second_req["files_done"] == 1
        s = ctl.stats_dict()
        assert (s["prefetch_failed"], s["prefetch_done"], s["prefetch_internal_errors"]) == (
            1, 3, 0)

    trio.run(main)
    m.blocks.close()


def test_command_errors_keep_their_errno_or_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A walk's failure keeps its errno (not an ExceptionGroup's "internal error"), and an
    unexpected error in a command is EIO with its traceback logged once."""
    import logging
    import sqlite3

    import trio

    from fusefs.errors import AccessDenied, FusefsError

    (tmp_path / "objects/d/e").mkdir(parents=True)
    (tmp_path / "objects/d/e/f").write_bytes(b"f")
    m = _core(tmp_path)
    ctl = m.control
    real_entries = m.fs.entries

    async def entries(path: str, **kw: Any) -> Any:
        if path == "d/e":
            raise AccessDenied("d/e: listing refused")
        return await real_entries(path, **kw)

    m.fs.entries = entries  # type: ignore[method-assign]

    def volume() -> int:
        raise sqlite3.OperationalError("disk I/O error")

    async def main() -> None:
        fh = ctl.open(ctl.owner_uid, os.O_RDWR)
        with pytest.raises(AccessDenied):
            await ctl.write(fh, b"stats d\n")
        assert json.loads(ctl.read(fh, 0, 4096))["code"] == "EACCES"
        m.blocks.volume = volume  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="fusefs.control"):
            with pytest.raises(FusefsError) as ei:
                await ctl.write(fh, b"clear\n")
        assert ei.value.errno == errno.EIO
        res = json.loads(ctl.read(fh, 0, 4096))
        assert res["code"] == "EIO" and "disk I/O error" in res["error"]
        assert any(r.exc_info and "disk I/O error" in str(r.exc_info[1]) for r in caplog.records)

    trio.run(main)
    m.blocks.close()
