#!/usr/bin/env python3
"""The fusefs benchmark (issue 4): every fusefs figure next to a baseline measured in the same run.

One command sets up an S3 server on 127.0.0.1 (``rclone serve s3`` by default), a latency proxy
in front of it for the workloads that model a cloud, creates the data, mounts fusefs through its
real CLI (a fresh mount and cache directory wherever "cold" is required), runs each workload,
and prints a table and writes a JSON file::

    python scripts/bench.py [--latency-ms 20] [--quick] [--peers] [--only cold,small_cold]
                            [--json out.json] [--server rclone|moto]

``--peers`` adds columns for s3fs-fuse and ``rclone mount`` when they are installed. Mounts,
servers and the proxy are always stopped, also on Ctrl-C. Nothing here asserts on timings:
the numbers are reported, with PASS/MISS against the issue's target ratios.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import itertools
import json
import multiprocessing
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

KiB, MiB, GiB = 1024, 1024**2, 1024**3
READERS = 16  # parallel readers / boto3 threads
BLOCK = 4 * KiB  # size of one random read
REPO = Path(__file__).resolve().parent.parent
RSS_BUDGET_MIB = 256
RSS_FLAT_FACTOR = 1.2  # peak after the big file may exceed the peak after the medium one by 20%

BIG_BUCKET, SMALL_BUCKET, LIST_BUCKET = "bench-big", "bench-small", "bench-list"
BIG_KEY, MEDIUM_KEY, SMALL_DIR = "big.bin", "medium.bin", "files"

T = TypeVar("T")


# --------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Sizes:
    """How much data each workload uses."""

    big: int  # the large object of the sequential and random workloads
    medium: int  # the smaller object that RSS flatness is compared against
    small_files: int
    small_size: int
    list_folders: int
    list_per_folder: int
    random_reads: int
    peer_files: int  # small files read through a peer (s3fs is ~40 files/s at 20 ms)

    @property
    def list_objects(self) -> int:
        return self.list_folders * self.list_per_folder


SIZES = {
    "full": Sizes(GiB, 100 * MiB, 5000, 100 * KiB, 200, 100, 2000, 1000),
    "quick": Sizes(256 * MiB, 32 * MiB, 1000, 100 * KiB, 40, 100, 500, 500),
    "tiny": Sizes(8 * MiB, 2 * MiB, 48, 100 * KiB, 4, 25, 64, 48),
}


@dataclass(frozen=True)
class Spec:
    """One row of the issue's table."""

    id: str
    alias: str  # the name accepted by --only
    title: str
    unit: str
    baseline: str
    target: float  # ratio fusefs / baseline
    higher_is_better: bool
    group: str  # the measurement group that produces it


SPECS = [
    Spec("seq_hot", "hot", "hot re-read of {big} (page cache)", "MB/s",
         "local file in page cache", 0.9, True, "big"),
    Spec("seq_warm", "warm", "warm read of {big} from block cache, page cache dropped", "MB/s",
         "cold read of a local file", 0.8, True, "big"),
    Spec("seq_cold", "cold", "cold sequential read of {big}", "MB/s",
         "boto3 download_fileobj, 16 x 8 MiB ranged GETs", 0.8, True, "big"),
    Spec("small_cold", "small_cold", "cold read of {files} x {fsize} files, 16 readers, {lat} ms",
         "files/s", "boto3 list + 16-thread GETs", 0.7, True, "small"),
    Spec("small_warm", "small_warm", "warm re-read of those files, 16 readers", "files/s",
         "same tree on local disk, 16 readers", 0.3, True, "small"),
    Spec("prefetch", "prefetch", "prefetch of that folder (then 0 GETs on read), {lat} ms",
         "files/s", "boto3 list + 16-thread GETs", 0.7, True, "prefetch"),
    Spec("find", "find", "find over {objs} objects in {dirs} folders, cold, {lat} ms", "s",
         "boto3 paginated list_objects_v2", 1.5, False, "list"),
    Spec("ls_lR", "ls", "ls -lR over {objs} objects in {dirs} folders, cold, {lat} ms", "s",
         "boto3 paginated list_objects_v2", 1.5, False, "list"),
    Spec("random_4k", "random", "random 4 KiB reads of {big}, 16 threads, cold", "reads/s",
         "boto3 ranged GETs, 16 threads", 0.7, True, "random"),
    Spec("rss", "rss", "peak RSS of the daemon (flat: {medium} vs {big} file)", "MiB",
         f"budget {RSS_BUDGET_MIB} MiB", 1.0, False, "rss"),
]  # fmt: skip
GROUP_ORDER = ["medium", "big", "random", "small", "prefetch", "list"]
GROUPS_NEEDED = {"rss": ["medium", "big"]}


# --------------------------------------------------------------------------------- results


@dataclass
class Measure:
    """One figure of one system (or a baseline), with the evidence behind it."""

    value: float | None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # "not available: ..." or the failure
    extra_ok: bool = True  # a second condition of the target (0 GETs, flat RSS)


@dataclass
class Row:
    """A workload's baseline and per-system figures, judged against its target."""

    spec: Spec
    title: str
    baseline: Measure | None = None
    results: dict[str, Measure] = field(default_factory=dict)

    def ratio(self, m: Measure) -> float | None:
        b = self.baseline.value if self.baseline else None
        if m.value is None or not b:
            return None
        return m.value / b

    def status(self, m: Measure) -> str:
        if m.error:
            return "n/a" if m.error.startswith("not available") else "ERROR"
        r = self.ratio(m)
        if r is None:
            return "n/a"
        ok = r >= self.spec.target if self.spec.higher_is_better else r <= self.spec.target
        return "PASS" if ok and m.extra_ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": s.id,
            "title": self.title,
            "unit": s.unit,
            "baseline_name": s.baseline,
            "baseline": self.baseline.value if self.baseline else None,
            "baseline_notes": self.baseline.notes if self.baseline else {},
            "target_ratio": s.target,
            "target": f"{'>=' if s.higher_is_better else '<='} {s.target}",
            "results": {
                name: {
                    "value": m.value,
                    "ratio": _round(self.ratio(m)),
                    "status": self.status(m),
                    "error": m.error,
                    "notes": m.notes,
                }
                for name, m in self.results.items()
            },
        }


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


# --------------------------------------------------------------------------------- helpers

_T0 = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` and return its result and the wall-clock seconds it took."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def human(n: int) -> str:
    """Bytes -> ``1 GiB`` / ``100 KiB``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


_buffers = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(MiB))
    return buf  # type: ignore[no-any-return]


def read_file(path: str | Path) -> int:
    """Read a whole file with 1 MiB reads into a reused buffer; returns the bytes read."""
    buf = _buffer()
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while n := os.readv(fd, [buf]):
            total += n
        return total
    finally:
        os.close(fd)


def run_threads(fn: Callable[[T], int], items: Sequence[T], threads: int = READERS) -> int:
    """Apply ``fn`` to every item with ``threads`` threads, each taking an interleaved slice."""
    slices = [items[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(lambda chunk: sum(fn(x) for x in chunk), slices))


def fadvise_dontneed(path: Path) -> None:
    """Drop one file's (or a tree's) pages from the page cache."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def drop_caches(*paths: Path) -> str:
    """Empty the page cache: ``drop_caches`` as root, plus ``POSIX_FADV_DONTNEED`` on ``paths``."""
    os.sync()
    for p in paths:
        fadvise_dontneed(p)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        return "fadvise"


def proc_status(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status in bytes (None if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid: int) -> bool:
    """Is ``pid`` a running (not zombie) process?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def fuse_mounts_under(root: Path) -> list[str]:
    """Mount points in /proc/mounts at or under ``root``."""
    prefix = os.path.realpath(root)
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line has an argument containing ``text``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(text.encode() in a for a in argv) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Wait for a daemon we started to exit after its unmount; TERM, then KILL it if not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def unmount(path: Path) -> None:
    """``fusermount3 -u``, then ``-uz`` (then ``umount -l``) until ``path`` is not mounted."""
    for cmd in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*cmd, str(path)], capture_output=True, timeout=60)
        for _ in range(20):
            if not is_mounted(path):
                return
            time.sleep(0.05)
    if is_mounted(path):
        log(f"WARNING: could not unmount {path}")


def kernel_tunables(mountpoint: Path) -> dict[str, int]:
    """The FUSE connection's ``read_ahead_kb`` and ``max_background`` as the kernel has them."""
    minor = os.minor(os.stat(mountpoint).st_dev)
    out: dict[str, int] = {}
    for name, path in (
        ("read_ahead_kb", f"/sys/class/bdi/0:{minor}/read_ahead_kb"),
        ("max_background", f"/sys/fs/fuse/connections/{minor}/max_background"),
        ("congestion_threshold", f"/sys/fs/fuse/connections/{minor}/congestion_threshold"),
    ):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int(Path(path).read_text())
    return out


# --------------------------------------------------------------------------------- proxy


def _proxy_main(conn: Any, upstream: str, latency_ms: float) -> None:
    """Child process: run a CountingProxy and answer ``counts`` / ``reset`` / ``stop``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    from fusefs.testing.proxy import CountingProxy, is_head, is_list, is_object_get

    kinds = {"get": is_object_get, "head": is_head, "list": is_list}
    with CountingProxy(upstream, latency_ms=latency_ms) as proxy:
        conn.send(proxy.url)
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                return
            if cmd == "stop":
                conn.send(None)
                return
            if cmd == "reset":
                proxy.reset()
                conn.send(None)
            elif cmd == "counts":
                reqs = proxy.requests()
                counts = {k: sum(1 for r in reqs if p(r)) for k, p in kinds.items()}
                counts["all"] = len(reqs)
                counts["bytes_out"] = sum(r.bytes_out for r in reqs)
                counts["connections"] = proxy.connections
                conn.send(counts)


class ProxyProcess:
    """A latency/counting proxy in its own process, so its relay threads never compete for
    the GIL with the benchmark's readers or with the boto3 baselines."""

    def __init__(self, upstream: str, latency_ms: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_proxy_main, args=(child, upstream, latency_ms), daemon=True
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self.close()
            raise RuntimeError("the latency proxy did not start")
        self.url: str = self._conn.recv()
        self.latency_ms = latency_ms

    def _call(self, cmd: str) -> Any:
        self._conn.send(cmd)
        return self._conn.recv()

    def reset(self) -> None:
        self._call("reset")

    def counts(self) -> dict[str, int]:
        """Requests since the last reset: get / head / list / all, bytes_out, connections."""
        counts: dict[str, int] = self._call("counts")
        return counts

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            if self._proc.is_alive():
                self._call("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# --------------------------------------------------------------------------------- RSS


class RssMonitor:
    """Samples VmRSS of the watched daemons in a thread; reads VmHWM when one is released."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pids = list(self._peaks)
            for pid in pids:
                rss = proc_status(pid, "VmRSS")
                if rss is not None:
                    with self._lock:
                        if pid in self._peaks:
                            self._peaks[pid] = max(self._peaks[pid], rss)

    def watch(self, pid: int) -> None:
        with self._lock:
            self._peaks.setdefault(pid, 0)

    def release(self, pid: int) -> dict[str, float]:
        """Stop watching ``pid``; its sampled peak VmRSS and its VmHWM, in MiB."""
        hwm = proc_status(pid, "VmHWM") or 0
        rss = proc_status(pid, "VmRSS") or 0
        with self._lock:
            peak = max(self._peaks.pop(pid, 0), rss)
        return {"vm_hwm_mib": round(hwm / MiB, 1), "sampled_peak_rss_mib": round(peak / MiB, 1)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# --------------------------------------------------------------------------------- systems


@dataclass
class Mounted:
    """A live mount of one system; ``rss`` is filled in just before it is unmounted."""

    system: str
    path: Path
    cache_dir: Path
    pid: int | None
    rss: dict[str, float] = field(default_factory=dict)
    tunables: dict[str, int] = field(default_factory=dict)


class System:
    """A FUSE filesystem that can mount a bucket of the benchmark's S3 server."""

    name = ""

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        """Mount ``bucket`` on ``mp``; return once the mount answers."""
        raise NotImplementedError


def _run_checked(cmd: list[str], env: dict[str, str], what: str, logfile: Path) -> None:
    """Run a mount command that daemonizes. Its output goes to a file, not a pipe: a daemon
    that keeps the pipe open would make us wait for it forever."""
    with open(logfile.with_suffix(".out"), "w+") as out:
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, timeout=90)  # fmt: skip
        if r.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"{what} failed ({r.returncode}): {out.read()[-800:]}")


def _wait_mounted(mp: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mp):
            with contextlib.suppress(OSError):
                os.listdir(mp)
                return
        time.sleep(0.05)
    raise RuntimeError(f"{mp} did not become a mount within {timeout:.0f}s")


def fusefs_env(src: str | None = None) -> dict[str, str]:
    """The environment of a fusefs command: test credentials, no config file, no FUSEFS_*;
    with ``src``, the fusefs package is imported from that source tree instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSEFS_", "AWS_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        FUSEFS_CONFIG_PATH=os.devnull,
        PYTHONSAFEPATH="1",  # `python -m fusefs` must not import ./fusefs from the cwd
    )
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


class Fusefs(System):
    """fusefs through its real CLI (``python -m fusefs mount``, which daemonizes)."""

    name = "fusefs"

    def __init__(self, extra: Sequence[str] = (), src: str | None = None) -> None:
        self.extra = list(extra)
        self.src = src

    def env(self) -> dict[str, str]:
        return fusefs_env(self.src)

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        cmd = [sys.executable, "-m", "fusefs", "mount", f"s3://{bucket}", str(mp),
               "--endpoint-url", url, "--cache-dir", str(cache), "--log-file", str(logfile),
               *self.extra]  # fmt: skip
        _run_checked(cmd, self.env(), "fusefs mount", logfile)


class S3fs(System):
    """s3fs-fuse with its disk cache (``use_cache``), path-style requests, read-only."""

    name = "s3fs"

    def __init__(self, passwd_file: Path) -> None:
        self.passwd_file = passwd_file

    def unavailable(self) -> str | None:
        return None if shutil.which("s3fs") else "not available: s3fs is not installed"

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        opts = (f"url={url},use_path_request_style,passwd_file={self.passwd_file},"
                f"use_cache={cache},ro,endpoint=us-east-1")  # fmt: skip
        _run_checked(["s3fs", bucket, str(mp), "-o", opts], dict(os.environ), "s3fs", logfile)
        _wait_mounted(mp)


class RcloneMount(System):
    """``rclone mount --vfs-cache-mode full`` (with ``--use-server-modtime``: no HEAD per file)."""

    name = "rclone"

    def unavailable(self) -> str | None:
        from fusefs.testing.servers import rclone_available

        if rclone_available() is None or shutil.which("fusermount3") is None:
            return "not available: rclone or fusermount3 is not installed"
        return None

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        from fusefs.testing.servers import rclone_available

        env = dict(os.environ)
        env.update(
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=url,
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="testing",
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="testing",
            RCLONE_CONFIG_BENCH_REGION="us-east-1",
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        )
        cmd = [str(rclone_available()), "mount", f"bench:{bucket}", str(mp),
               "--config", os.devnull, "--read-only", "--vfs-cache-mode", "full",
               "--cache-dir", str(cache), "--use-server-modtime", "--daemon",
               "--log-file", str(logfile)]  # fmt: skip
        _run_checked(cmd, env, "rclone mount", logfile)
        _wait_mounted(mp)


# --------------------------------------------------------------------------------- S3 side


def s3_client(url: str) -> Any:
    """A boto3 client for the local server with a connection pool big enough for 16 threads."""
    from fusefs.testing import servers

    return servers.s3_client(url, max_pool_connections=64)


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix``, page by page (1,000 keys a page)."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def get_object(client: Any, bucket: str, key: str, rng: str | None = None) -> int:
    """GET an object (or a range of it) and read the whole body; returns its length."""
    kw = {"Range": rng} if rng else {}
    body = client.get_object(Bucket=bucket, Key=key, **kw)["Body"]
    try:
        return len(body.read())
    finally:
        body.close()


def write_random_file(path: Path, size: int) -> None:
    """``size`` random bytes, written 1 MiB at a time."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(MiB, left)
            f.write(os.urandom(n))
            left -= n


def make_data(root: Path, sizes: Sizes) -> None:
    """The three buckets as folders of the server's root directory."""
    big = root / BIG_BUCKET
    big.mkdir(parents=True)
    write_random_file(big / BIG_KEY, sizes.big)
    write_random_file(big / MEDIUM_KEY, sizes.medium)
    small = root / SMALL_BUCKET / SMALL_DIR
    small.mkdir(parents=True)
    for i in range(sizes.small_files):
        (small / f"f{i:05d}.bin").write_bytes(os.urandom(sizes.small_size))
    listing = root / LIST_BUCKET
    for d in range(sizes.list_folders):
        folder = listing / f"d{d:03d}"
        folder.mkdir(parents=True)
        for i in range(sizes.list_per_folder):
            (folder / f"o{i:05d}.txt").write_bytes(b"%d\n" % i)


def upload_tree(client: Any, root: Path) -> None:
    """For servers that do not serve a directory (moto): PUT every file of ``root``."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for bucket in {p.relative_to(root).parts[0] for p in files}:
        client.create_bucket(Bucket=bucket)

    def put(p: Path) -> int:
        bucket, *rest = p.relative_to(root).parts
        client.upload_file(str(p), bucket, "/".join(rest))
        return 1

    run_threads(put, files)


# --------------------------------------------------------------------------------- bench


class Bench:
    """State of one run: server, proxy, clients, data, monitor; and the mount helper."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path) -> None:
        self.args, self.sizes, self.work = args, sizes, work
        self.data = work / "data"
        self.direct_url = ""
        self._proxies: dict[str, ProxyProcess] = {}
        self.monitor = RssMonitor()
        self.fusefs = Fusefs(args.fusefs_opt, args.fusefs_src)
        self.observed: dict[str, Any] = {}
        self.rss: dict[str, dict[str, dict[str, float]]] = {}  # system -> group -> rss
        self._serial = itertools.count(1)
        self._baselines: dict[str, Measure] = {}
        self.wanted = {s.id for s in wanted_specs(args.only)}

    def start_proxies(self) -> None:
        """A proxy with the latency of ``--latency-ms`` and one with none: both count requests."""
        self._proxies["latency"] = ProxyProcess(self.direct_url, self.args.latency_ms)
        self._proxies["counting"] = ProxyProcess(self.direct_url, 0)

    def close_proxies(self) -> None:
        for p in self._proxies.values():
            p.close()
        self._proxies.clear()

    @property
    def latency(self) -> ProxyProcess:
        """The proxy that adds ``--latency-ms`` (small files, prefetch, listings)."""
        return self._proxies["latency"]

    @property
    def counting(self) -> ProxyProcess:
        """A proxy that adds no latency, to count the requests of random reads."""
        return self._proxies["counting"]

    def server_answers(self) -> bool:
        """Does the S3 server still answer HTTP at all?"""
        try:
            with urllib.request.urlopen(self.direct_url + "/", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def client(self, proxy: ProxyProcess | None = None) -> Any:
        """A boto3 client straight to the server, or through ``proxy``."""
        return s3_client(proxy.url if proxy else self.direct_url)

    def baseline(self, name: str, fn: Callable[[], Measure]) -> Measure:
        """A baseline measured once per run and shared by the rows that compare with it."""
        if name not in self._baselines:
            self._baselines[name] = fn()
        return self._baselines[name]

    @contextlib.contextmanager
    def mount(self, system: System, bucket: str, url: str, label: str) -> Iterator[Mounted]:
        """A fresh mount (fresh cache directory) of ``bucket``; always unmounted on exit."""
        n = next(self._serial)
        mp = self.work / "mnt" / f"{system.name}-{label}-{n}"
        cache = self.work / "cache" / f"{system.name}-{label}-{n}"
        logfile = self.work / "logs" / f"{system.name}-{label}-{n}.log"
        for d in (mp, cache, logfile.parent):
            d.mkdir(parents=True, exist_ok=True)
        m = Mounted(system.name, mp, cache, None)
        try:
            system.start(bucket, url, mp, cache, logfile)
            pids = processes_mentioning(str(mp))
            m.pid = pids[0] if pids else None
            if m.pid is not None:
                self.monitor.watch(m.pid)
            m.tunables = kernel_tunables(mp)
            yield m
        finally:
            if m.pid is not None:
                m.rss = self.monitor.release(m.pid)
                self.rss.setdefault(system.name, {})[label] = m.rss
            unmount(mp)
            for pid in [m.pid] if m.pid is not None else processes_mentioning(str(mp)):
                stop_pid(pid)
            shutil.rmtree(cache, ignore_errors=True)


_COUNTERS = ("hits", "misses", "fetches", "bytes_fetched", "bytes_served", "readahead_blocks",
             "errors")  # fmt: skip


def fusefs_counters(m: Mounted) -> dict[str, int]:
    """The counters of a fusefs mount's control file (empty for peers, or if unreadable)."""
    if m.system != "fusefs":
        return {}
    try:
        data = json.loads((m.path / ".fusefs").read_bytes())
    except (OSError, ValueError):
        return {}
    return {k: int(data[k]) for k in _COUNTERS if isinstance(data.get(k), int)}


def cpu_and_faults(pid: int | None) -> tuple[float, int] | None:
    """User + system CPU seconds and minor page faults of a process so far."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return cpu, int(fields[7])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def profiled(b: Bench, m: Mounted, label: str | None) -> Iterator[None]:
    """With ``--profile DIR``: sample the fusefs daemon with py-spy while the body runs, and
    write the raw stacks and a summary of the hottest functions to DIR/LABEL.*."""
    if not (b.args.profile and label and m.system == "fusefs" and m.pid):
        yield
        return
    out = Path(b.args.profile) / f"{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(m.pid), "--rate", "200", "--format", "raw",
           "--nonblocking", "--output", str(out)]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if out.exists():
        out.with_suffix(".top.txt").write_text(summarize_profile(out))


def summarize_profile(raw: Path, n: int = 30) -> str:
    """The functions with the most samples in a py-spy raw (collapsed stacks) file: where the
    daemon itself spends its time (self) and what it spends it under (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        total += int(count)
        if frames:
            own[frames[-1]] += int(count)
        for f in set(frames):
            under[f] += int(count)
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", under)):
        lines.append(f"\n-- {title}")
        lines += [f"{100 * c / max(total, 1):5.1f}%  {f}" for f, c in counter.most_common(n)]
    return "\n".join(lines) + "\n"


def observe(
    b: Bench,
    m: Mounted,
    fn: Callable[[], T],
    *,
    proxy: ProxyProcess | None = None,
    label: str | None = None,
) -> tuple[T, float, dict[str, Any]]:
    """Run ``fn`` against a mount: its result, wall seconds, and the evidence behind the figure:
    the daemon's CPU seconds, the fusefs counters it moved (with the mean size of a kernel read
    request and of a fetch), and the requests that reached the server through the proxy.
    ``label`` names the py-spy profile taken with ``--profile``."""
    before, cpu0 = fusefs_counters(m), cpu_and_faults(m.pid)
    if proxy is not None:
        proxy.reset()
    with profiled(b, m, label):
        out, secs = timed(fn)
    cpu1 = cpu_and_faults(m.pid)
    notes: dict[str, Any] = {"wall_s": round(secs, 3)}
    if cpu0 is not None and cpu1 is not None:
        notes["daemon_cpu_s"] = round(cpu1[0] - cpu0[0], 2)
        notes["daemon_minor_faults"] = cpu1[1] - cpu0[1]
    if proxy is not None:
        notes["requests"] = proxy.counts()
    after = fusefs_counters(m)
    if after:
        d: dict[str, float] = {k: after[k] - before.get(k, 0) for k in after}
        calls = d.get("hits", 0) + d.get("misses", 0)
        if calls:
            d["mean_read_kib"] = round(d.get("bytes_served", 0) / calls / KiB, 1)
        if d.get("fetches"):
            d["mean_fetch_kib"] = round(d.get("bytes_fetched", 0) / d["fetches"] / KiB, 1)
        notes["fusefs"] = d
    return out, secs, notes


def prime_local(path: Path) -> None:
    """Read a file or tree so it is in the page cache (the server reads it from there)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    run_threads(read_file, files, 4)


def prime_server(b: Bench, bucket: str, heads: Sequence[str] = ()) -> None:
    """List the bucket and HEAD the named keys directly, so the server's hashes (ETags) and
    directory cache are computed before any timed request."""
    client = b.client()
    list_keys(client, bucket)
    for key in heads:
        client.head_object(Bucket=bucket, Key=key)


def check_size(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: read {got} bytes, expected {want}")


# --------------------------------------------------------------------------------- groups


def prime_big(b: Bench) -> None:
    """The big and medium objects in the page cache, and their ETags computed by the server."""
    prime_local(b.data / BIG_BUCKET)
    prime_server(b, BIG_BUCKET, [BIG_KEY, MEDIUM_KEY])


def group_medium(b: Bench, system: System) -> dict[str, Measure]:
    """A fresh mount that reads the medium object once: its daemon's RSS is the flat reference."""
    prime_big(b)
    with b.mount(system, BIG_BUCKET, b.direct_url, "medium") as m:
        got, secs, notes = observe(b, m, lambda: read_file(m.path / MEDIUM_KEY))
        check_size(got, b.sizes.medium, "medium read")
    return {"_medium": Measure(got / secs / 1e6, notes)}  # not a row: its RSS feeds "rss"


def baselines_big(b: Bench) -> dict[str, Measure]:
    """Local page cache, local cold read and boto3 parallel download of the big object."""
    from boto3.s3.transfer import TransferConfig

    local = b.data / BIG_BUCKET / BIG_KEY
    size = b.sizes.big
    prime_big(b)
    hot = [size / timed(lambda: read_file(local))[1] / 1e6 for _ in range(3)]
    client = b.client()
    dest = b.work / "download.bin"
    cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                         max_concurrency=READERS)  # fmt: skip
    with open(dest, "wb") as f:
        _, secs = timed(lambda: client.download_fileobj(BIG_BUCKET, BIG_KEY, f, Config=cfg))
    check_size(dest.stat().st_size, size, "boto3 download")
    dest.unlink()
    how = drop_caches(local)
    got, cold_secs = timed(lambda: read_file(local))
    check_size(got, size, "local cold read")
    prime_big(b)
    return {
        "seq_hot": Measure(max(hot), {"runs_mb_s": [round(x) for x in hot]}),
        "seq_warm": Measure(size / cold_secs / 1e6, {"dropped_with": how}),
        "seq_cold": Measure(size / secs / 1e6, {"concurrency": READERS, "chunk_mib": 8}),
    }


def group_big(b: Bench, system: System) -> dict[str, Measure]:
    """Cold read on a fresh mount, hot re-reads (page cache), then a warm read (block cache)."""
    size = b.sizes.big
    prime_big(b)
    with b.mount(system, BIG_BUCKET, b.direct_url, "big") as m:
        path = m.path / BIG_KEY
        got, cold, cold_notes = observe(b, m, lambda: read_file(path), label="seq_cold")
        check_size(got, size, "cold read")
        hot_runs = [observe(b, m, lambda: read_file(path)) for _ in range(3)]
        _, hot, hot_notes = min(hot_runs, key=lambda run: run[1])
        how = drop_caches(path, m.cache_dir)
        got, warm, warm_notes = observe(b, m, lambda: read_file(path), label="seq_warm")
        check_size(got, size, "warm read")
        if system.name == "fusefs":
            b.observed["kernel_tunables"] = m.tunables
    prime_big(b)
    hot_notes["runs_mb_s"] = [round(size / run[1] / 1e6) for run in hot_runs]
    return {
        "seq_cold": Measure(size / cold / 1e6, {**cold_notes, "tunables": m.tunables}),
        "seq_hot": Measure(size / hot / 1e6, hot_notes),
        "seq_warm": Measure(size / warm / 1e6, {**warm_notes, "dropped_with": how}),
    }


def random_offsets(b: Bench) -> list[int]:
    """The same seeded, 4 KiB-aligned offsets for every system."""
    rng = random.Random(4)
    return [rng.randrange(b.sizes.big // BLOCK) * BLOCK for _ in range(b.sizes.random_reads)]


def baselines_random(b: Bench) -> dict[str, Measure]:
    """boto3 ranged GETs of 4 KiB, 16 threads, through the counting proxy (as the mounts)."""
    prime_big(b)
    client = b.client(b.counting)
    offsets = random_offsets(b)

    def one(off: int) -> int:
        return get_object(client, BIG_BUCKET, BIG_KEY, f"bytes={off}-{off + BLOCK - 1}")

    b.counting.reset()
    got, secs = timed(lambda: run_threads(one, offsets))
    check_size(got, len(offsets) * BLOCK, "boto3 random reads")
    notes = {"reads": len(offsets), "requests": b.counting.counts()}
    return {"random_4k": Measure(len(offsets) / secs, notes)}


def group_random(b: Bench, system: System) -> dict[str, Measure]:
    """``pread`` of 4 KiB at random offsets by 16 threads on one descriptor, on a fresh mount
    through the counting proxy (no latency), so the GETs and bytes fetched are known."""
    offsets = random_offsets(b)
    local = b.data / BIG_BUCKET / BIG_KEY
    prime_big(b)
    with b.mount(system, BIG_BUCKET, b.counting.url, "random") as m:
        fd = os.open(m.path / BIG_KEY, os.O_RDONLY)
        try:
            got, secs, notes = observe(
                b,
                m,
                lambda: run_threads(lambda o: len(os.pread(fd, BLOCK, o)), offsets),
                proxy=b.counting,
                label="random_4k",
            )
            with open(local, "rb") as f:  # spot-check the bytes
                for off in offsets[:16]:
                    f.seek(off)
                    if os.pread(fd, BLOCK, off) != f.read(BLOCK):
                        raise RuntimeError(f"random read at {off}: wrong bytes")
        finally:
            os.close(fd)
        check_size(got, len(offsets) * BLOCK, "random reads")
    return {"random_4k": Measure(len(offsets) / secs, {**notes, "reads": len(offsets)})}


def small_keys(b: Bench) -> list[str]:
    return [f"{SMALL_DIR}/f{i:05d}.bin" for i in range(b.sizes.small_files)]


def baseline_small_get(b: Bench) -> Measure:
    """boto3: list the folder, then GET every key with 16 threads, through the latency proxy."""
    client = b.client(b.latency)
    n = b.sizes.small_files

    def work() -> int:
        keys = list_keys(client, SMALL_BUCKET, SMALL_DIR + "/")
        return run_threads(lambda k: get_object(client, SMALL_BUCKET, k), keys)

    b.latency.reset()
    got, secs = timed(work)
    check_size(got, n * b.sizes.small_size, "boto3 small GETs")
    return Measure(n / secs, {"requests": b.latency.counts()})


def prime_small(b: Bench) -> None:
    prime_local(b.data / SMALL_BUCKET / SMALL_DIR)
    prime_server(b, SMALL_BUCKET)


def baselines_small(b: Bench) -> dict[str, Measure]:
    local = b.data / SMALL_BUCKET / SMALL_DIR
    paths = [str(local / k.split("/")[1]) for k in small_keys(b)]
    prime_small(b)
    run_threads(read_file, paths)
    _, secs = timed(lambda: run_threads(read_file, paths))
    return {
        "small_cold": b.baseline("small_get", lambda: baseline_small_get(b)),
        "small_warm": Measure(len(paths) / secs, {"page_cache": "warm"}),
    }


def read_folder(folder: Path, limit: int) -> tuple[int, int]:
    """List ``folder``, then read its first ``limit`` files with 16 readers: (files, bytes)."""
    names = sorted(os.listdir(folder))[:limit]
    return len(names), run_threads(read_file, [str(folder / n) for n in names])


def per_file(notes: dict[str, Any], files: int) -> dict[str, float]:
    reqs = notes.get("requests", {})
    return {k: round(reqs.get(k, 0) / files, 2) for k in ("get", "head", "list")}


def group_small(b: Bench, system: System) -> dict[str, Measure]:
    """Cold read of the small files by 16 readers (fresh mount, latency), then a warm re-read."""
    limit = min(b.sizes.small_files, b.sizes.peer_files if system.name != "fusefs" else 1 << 30)
    expect = limit * b.sizes.small_size
    prime_small(b)
    with b.mount(system, SMALL_BUCKET, b.latency.url, "small") as m:
        folder = m.path / SMALL_DIR
        (files, got), cold, cold_notes = observe(
            b, m, lambda: read_folder(folder, limit), proxy=b.latency, label="small_cold"
        )
        check_size(got, expect, "small cold read")
        (files, got), warm, warm_notes = observe(
            b, m, lambda: read_folder(folder, limit), proxy=b.latency, label="small_warm"
        )
        check_size(got, expect, "small warm read")
    cold_notes.update(files=files, requests_per_file=per_file(cold_notes, files))
    return {
        "small_cold": Measure(files / cold, cold_notes),
        "small_warm": Measure(files / warm, {**warm_notes, "files": files}),
    }


def prefetch_unavailable(b: Bench) -> str | None:
    """Why ``fusefs prefetch`` cannot be used (no such command yet), or None."""
    r = subprocess.run([sys.executable, "-m", "fusefs", "prefetch", "--help"],
                       capture_output=True, text=True, env=b.fusefs.env())  # fmt: skip
    if r.returncode != 0:
        return "not available: `fusefs prefetch` does not exist in this version"
    return None


def group_prefetch(b: Bench, system: System) -> dict[str, Measure]:
    """``fusefs prefetch MOUNT files --wait`` on a fresh mount, then a read of every file with
    the GETs that reach the server counted (the target is 0)."""
    reason = prefetch_unavailable(b) if system.name == "fusefs" else "not available: fusefs only"
    if reason:
        return {"prefetch": Measure(None, error=reason)}
    n = b.sizes.small_files
    prime_small(b)
    with b.mount(system, SMALL_BUCKET, b.latency.url, "prefetch") as m:
        cmd = [sys.executable, "-m", "fusefs", "prefetch", str(m.path), SMALL_DIR, "--wait"]
        r, secs, notes = observe(
            b,
            m,
            lambda: subprocess.run(cmd, capture_output=True, text=True, env=b.fusefs.env()),
            proxy=b.latency,
            label="prefetch",
        )
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            return {"prefetch": Measure(None, error=f"prefetch failed: {msg[-1:]}")}
        (files, got), read_secs, read_notes = observe(
            b, m, lambda: read_folder(m.path / SMALL_DIR, n), proxy=b.latency
        )
        check_size(got, n * b.sizes.small_size, "read after prefetch")
    gets = read_notes["requests"]["get"]
    notes.update(gets_during_read=gets, read_files_per_s=round(files / read_secs),
                 read=read_notes)  # fmt: skip
    return {"prefetch": Measure(n / secs, notes, extra_ok=gets == 0)}


def baselines_prefetch(b: Bench) -> dict[str, Measure]:
    prime_small(b)
    return {"prefetch": b.baseline("small_get", lambda: baseline_small_get(b))}


def baselines_list(b: Bench) -> dict[str, Measure]:
    """boto3 paginated list_objects_v2 of the whole listing bucket, through the proxy."""
    prime_local(b.data / LIST_BUCKET)
    prime_server(b, LIST_BUCKET)
    client = b.client(b.latency)
    b.latency.reset()
    keys, secs = timed(lambda: list_keys(client, LIST_BUCKET))
    check_size(len(keys), b.sizes.list_objects, "boto3 listing (keys)")
    m = Measure(secs, {"requests": b.latency.counts()})
    return {"find": m, "ls_lR": m}


def run_listing(b: Bench, system: System, cmd: list[str], label: str) -> Measure:
    """Run a tree walk (``find``/``ls -lR``) over a fresh mount; seconds and requests."""
    out = b.work / f"{label}.out"
    with b.mount(system, LIST_BUCKET, b.latency.url, label) as m, open(out, "wb") as f:
        r, secs, notes = observe(
            b,
            m,
            lambda: subprocess.run([*cmd, str(m.path)], stdout=f, stderr=subprocess.PIPE),
            proxy=b.latency,
            label=label,
        )
    text = out.read_text(errors="replace")
    out.unlink()
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr.decode(errors='replace')[-300:]}")
    if label == "find":
        entries = len(text.splitlines()) - 1 - b.sizes.list_folders
    else:
        entries = sum(1 for line in text.splitlines() if line.startswith("-"))
    check_size(entries, b.sizes.list_objects, f"{label} (files seen)")
    return Measure(secs, notes)


def group_list(b: Bench, system: System) -> dict[str, Measure]:
    """``find`` and ``ls -lR``, each on a fresh mount."""
    out = {}
    for rid, cmd, label in (("find", ["find"], "find"), ("ls_lR", ["ls", "-lR"], "ls")):
        if rid not in b.wanted:
            continue
        prime_local(b.data / LIST_BUCKET)
        prime_server(b, LIST_BUCKET)
        out[rid] = run_listing(b, system, cmd, label)
    return out


GROUPS: dict[str, tuple[Callable[[Bench, System], dict[str, Measure]],
                        Callable[[Bench], dict[str, Measure]] | None]] = {
    "medium": (group_medium, None),
    "big": (group_big, baselines_big),
    "random": (group_random, baselines_random),
    "small": (group_small, baselines_small),
    "prefetch": (group_prefetch, baselines_prefetch),
    "list": (group_list, baselines_list),
}  # fmt: skip


# --------------------------------------------------------------------------------- running


def rss_measure(b: Bench, system: str) -> Measure:
    """Peak VmHWM over all daemons of ``system``; flat if the big file's daemon peaked within
    20% of the medium file's."""
    per_mount = b.rss.get(system, {})
    if not per_mount:
        return Measure(None, error="no daemon was measured")
    peak = max(v["vm_hwm_mib"] for v in per_mount.values())
    medium = per_mount.get("medium", {}).get("vm_hwm_mib")
    big = per_mount.get("big", {}).get("vm_hwm_mib")
    flat = medium is not None and big is not None and big <= medium * RSS_FLAT_FACTOR
    notes = {"per_mount_vm_hwm_mib": {k: v["vm_hwm_mib"] for k, v in per_mount.items()},
             f"after_{human(b.sizes.medium).replace(' ', '')}": medium,
             f"after_{human(b.sizes.big).replace(' ', '')}": big, "flat": flat}  # fmt: skip
    return Measure(peak, notes, extra_ok=flat)


def build_rows(b: Bench, wanted: list[Spec]) -> dict[str, Row]:
    s, lat = b.sizes, b.args.latency_ms
    fmt = {"big": human(s.big), "medium": human(s.medium), "files": f"{s.small_files:,}",
           "fsize": human(s.small_size), "lat": f"{lat:g}", "objs": f"{s.list_objects:,}",
           "dirs": s.list_folders}  # fmt: skip
    return {sp.id: Row(sp, sp.title.format(**fmt)) for sp in wanted}


def run_groups(b: Bench, systems: list[System], rows: dict[str, Row]) -> None:
    """Run every needed group: its baselines once, then each system; errors are recorded."""
    groups = {sp.group for sp in (r.spec for r in rows.values())}
    for sp in (r.spec for r in rows.values()):
        groups.update(GROUPS_NEEDED.get(sp.id, []))
    for group in [g for g in GROUP_ORDER if g in groups]:
        measure, baselines = GROUPS[group]
        if baselines is not None:
            log(f"{group}: baselines")
            for rid, m in _guarded(b, functools.partial(baselines, b), group, rows).items():
                if rid in rows:
                    rows[rid].baseline = m
        for system in systems:
            reason = system.unavailable()
            log(f"{group}: {system.name}" + (f" ({reason})" if reason else ""))
            results = (
                {rid: Measure(None, error=reason) for rid in rows}
                if reason
                else _guarded(b, functools.partial(measure, b, system), group, rows)
            )
            for rid, m in results.items():
                if rid in rows and rows[rid].spec.group == group:
                    rows[rid].results[system.name] = m
    if "rss" in rows:
        rows["rss"].baseline = Measure(float(RSS_BUDGET_MIB))
        for system in systems:
            rows["rss"].results[system.name] = rss_measure(b, system.name)


def _guarded(
    b: Bench, fn: Callable[[], dict[str, Measure]], group: str, rows: dict[str, Row]
) -> dict[str, Measure]:
    """Run one group; a failure becomes an error figure in each of its rows, not a crash,
    unless the S3 server itself is gone (then every later figure would be an error too)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        if not b.server_answers():
            raise RuntimeError(f"the S3 server at {b.direct_url} stopped answering") from exc
        msg = f"{type(exc).__name__}: {exc}"[:300]
        return {rid: Measure(None, error=msg) for rid, r in rows.items() if r.spec.group == group}


# --------------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo_total()
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "memory_gib": round(mem / GiB, 1), "python": platform.python_version()}  # fmt: skip


def proc_meminfo_total() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KiB
    return 0


def _version(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else None


def fusefs_info(fusefs: Fusefs) -> dict[str, Any]:
    """Commit, dirty state and the effective default settings of the fusefs being measured."""
    tree = fusefs.src or str(REPO)

    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", tree, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    code = ("import os; from fusefs.config import load_settings; "
            "print(load_settings({}, env={}, config_path=os.devnull).describe())")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=fusefs.env())  # fmt: skip
    # the last commit that changed fusefs/ (HEAD may be a commit of other files)
    commit = git("log", "-1", "--format=%h", "--", "fusefs") or f"source tree {tree}"
    return {"commit": commit, "source": tree,
            "uncommitted_changes_in_fusefs": bool(git("status", "--porcelain", "--", "fusefs")),
            "settings": r.stdout.strip() or r.stderr.strip()[-200:],
            "extra_mount_args": fusefs.extra}  # fmt: skip


def fmt_value(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def render_table(rows: dict[str, Row], systems: list[str]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    head = ["workload", "unit", "baseline", "fusefs", "ratio", "target", "status"]
    for s in systems[1:]:
        head += [s, f"{s} ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        sp = row.spec
        cells = [row.title, sp.unit, fmt_value(row.baseline.value if row.baseline else None)]
        for i, s in enumerate(systems):
            m = row.results.get(s) or Measure(None, error="not available: not run")
            r = row.ratio(m)
            value = fmt_value(m.value) if not m.error else row.status(m)
            cells += [value, f"{r:.2f}" if r is not None else "-"]
            if i == 0:
                op = ">=" if sp.higher_is_better else "<="
                cells += [f"{op} {sp.target:g}", row.status(m)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evidence(n: dict[str, Any], group: str) -> list[str]:
    """Short phrases explaining one figure, from the notes ``observe`` collected."""
    bits = []
    if "gets_during_read" in n:
        bits.append(f"GETs during the read after prefetch: {n['gets_during_read']}")
    if "requests_per_file" in n:
        bits.append(f"requests per file {n['requests_per_file']}")
    if group in ("list", "random") and "requests" in n:
        r = n["requests"]
        bits.append(f"LIST {r['list']}, HEAD {r['head']}, GET {r['get']}, "
                    f"{r['bytes_out'] / 1e6:,.1f} MB from the server")  # fmt: skip
    f = n.get("fusefs") or {}
    if "mean_read_kib" in f:
        bits.append(f"{f['hits'] + f['misses']:,} kernel reads of ~{f['mean_read_kib']:,.0f} KiB")
    elif "bytes_served" in f:
        bits.append(f"daemon served {f['bytes_served']:,} bytes")
    if f.get("fetches"):
        bits.append(f"{f['fetches']:,} GETs of ~{f['mean_fetch_kib']:,.0f} KiB")
    if "daemon_cpu_s" in n:
        bits.append(f"daemon CPU {n['daemon_cpu_s']:.2f}s in {n['wall_s']:.2f}s, "
                    f"{n.get('daemon_minor_faults', 0):,} page faults")  # fmt: skip
    if "flat" in n:
        bits.append(f"VmHWM per mount {n['per_mount_vm_hwm_mib']}, flat: {n['flat']}")
    return bits


def render_notes(rows: dict[str, Row], systems: list[str]) -> str:
    """A line of evidence per row and system: requests, read sizes, daemon CPU, RSS."""
    out = []
    for row in rows.values():
        for system in ["baseline", *systems]:
            m = row.baseline if system == "baseline" else row.results.get(system)
            if m is None:
                continue
            text = m.error or "; ".join(evidence(m.notes, row.spec.group))
            if text:
                out.append(f"- {row.spec.id} [{system}]: {text}")
    return "\n".join(out)


def header(b: Bench, info: dict[str, Any]) -> str:
    m, f = info["machine"], info["fusefs"]
    lines = [
        f"machine : {m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"date    : {info['date']}",
        f"command : {info['command']}",
        f"server  : {info['server']} ({info['server_version']}), latency {b.args.latency_ms:g} ms "
        "added by a proxy for the small-file, prefetch and listing workloads",
        f"fusefs  : {f['commit']}{' + uncommitted changes' if f['uncommitted_changes_in_fusefs'] else ''}"  # noqa: E501
        f"; {f['settings']}",
    ]
    if f["extra_mount_args"]:
        lines.append(f"extra   : {' '.join(f['extra_mount_args'])}")
    if b.observed.get("kernel_tunables"):
        lines.append(f"kernel  : fusefs mount had {b.observed['kernel_tunables']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--latency-ms", type=float, default=20.0,
                   help="latency added per request for the small-file, prefetch and listing "
                   "workloads (default 20)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # for the test
    p.add_argument("--peers", action="store_true", help="also run s3fs and rclone mount")
    p.add_argument(
        "--only", default="", help="comma-separated workloads: " + ",".join(s.alias for s in SPECS)
    )
    p.add_argument("--json", dest="json_path", help="write the results here (default: /tmp/...)")
    p.add_argument("--server", choices=["rclone", "moto"], default="rclone")
    p.add_argument(
        "--fusefs-opt",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `fusefs mount` (repeatable), e.g. --block-size=1M",
    )
    p.add_argument("--profile", metavar="DIR",
                   help="sample the fusefs daemon with py-spy during each workload; write the "
                   "stacks and a summary to DIR (the figures are then perturbed)")  # fmt: skip
    p.add_argument("--fusefs-src", metavar="DIR",
                   help="measure the fusefs package in this source tree (e.g. a `git archive` "
                   "of another commit) instead of the installed one")  # fmt: skip
    p.add_argument("--workdir", help=argparse.SUPPRESS)  # parent of the run's directory
    p.add_argument("--keep", action="store_true", help="keep the data and logs")
    args = p.parse_args(argv)
    known = {s.alias: s for s in SPECS} | {s.id: s for s in SPECS}
    bad = [w for w in filter(None, args.only.split(",")) if w not in known]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {','.join(s.alias for s in SPECS)}")
    return args


def wanted_specs(only: str) -> list[Spec]:
    names = set(filter(None, only.split(",")))
    return [s for s in SPECS if not names or s.alias in names or s.id in names]


@contextlib.contextmanager
def s3_server(b: Bench) -> Iterator[str]:
    """Start the S3 server over ``b.data`` (uploading for moto); yields its version string."""
    from fusefs.testing import servers

    if b.args.server == "rclone":
        with servers.rclone_s3(b.data) as srv:
            b.direct_url = srv.endpoint_url
            yield _version([str(servers.rclone_available()), "version"]) or "rclone"
    else:
        with servers.moto_s3() as srv:
            b.direct_url = srv.endpoint_url
            upload_tree(s3_client(srv.endpoint_url), b.data)
            import moto

            yield f"moto {moto.__version__}"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    b = Bench(args, sizes, work)
    specs = wanted_specs(args.only)
    systems: list[System] = [b.fusefs]
    if args.peers:
        passwd = work / "s3fs.passwd"
        passwd.write_text("testing:testing\n")
        passwd.chmod(0o600)
        systems += [S3fs(passwd), RcloneMount()]
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "fusefs": fusefs_info(b.fusefs),
        "server": args.server,
        "latency_ms": args.latency_ms,
        "sizes": asdict(sizes),
        "peers": {"s3fs": _version(["s3fs", "--version"]) if args.peers else None,
                  "rclone": _version(["rclone", "version"]) if args.peers else None},
    }  # fmt: skip
    log(f"creating data under {b.data}")
    _, secs = timed(lambda: make_data(b.data, sizes))
    log(f"data ready in {secs:.1f}s")
    rows = build_rows(b, specs)
    try:
        with s3_server(b) as version:
            info["server_version"] = version
            try:
                b.start_proxies()
                run_groups(b, systems, rows)
            finally:
                b.close_proxies()
    finally:
        b.monitor.close()
    info["observed"] = b.observed
    info["rss_per_mount"] = b.rss
    info["workloads"] = [r.to_json() for r in rows.values()]
    info["elapsed_s"] = round(time.monotonic() - _T0, 1)
    names = [s.name for s in systems]
    print(header(b, info))
    print()
    print(render_table(rows, names))
    print()
    print(render_notes(rows, names))
    print(f"\nelapsed: {info['elapsed_s']:.0f}s")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Unwind on Ctrl-C and SIGTERM (unmount, stop servers), even if started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parent = args.workdir or tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="fusefs-bench-", dir=parent))
    json_path = args.json_path or os.path.join(
        tempfile.gettempdir(), f"fusefs-bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    try:
        info = run(args, work)
        with open(json_path, "w") as f:
            json.dump(info, f, indent=2)
        print(f"json    : {json_path}")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for mp in fuse_mounts_under(work):  # a mount left by an interrupted step
            unmount(Path(mp))
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
