"""The run's machinery: latency proxy process, RSS monitor, the data, the Bench state, and
:func:`observe`, which measures a workload with its evidence."""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .model import (
    BIG_BUCKET,
    BIG_KEY,
    LIST_BUCKET,
    MEDIUM_KEY,
    SMALL_BUCKET,
    SMALL_DIR,
    KiB,
    Measure,
    MiB,
    Sizes,
    T,
    wanted_specs,
)
from .peers import Fusefs, Mounted, System
from .scaling import request_delta
from .stores import Client, Store
from .util import (
    kernel_tunables,
    proc_status,
    processes_mentioning,
    read_file,
    run_threads,
    stop_pid,
    timed,
    unmount,
)

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
    the GIL with the benchmark's readers or with the SDK baselines."""

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



# --------------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------------- bench


class Bench:
    """State of one store's run: server, proxy, clients, data, monitor; and the mount helper."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, work: Path, store: Store) -> None:
        self.args, self.sizes, self.work, self.store = args, sizes, work, store
        self.data = work / "data"
        self.direct_url = ""
        self._proxies: dict[str, ProxyProcess] = {}
        self.monitor = RssMonitor()
        self.fusefs = Fusefs(args.fusefs_opt, args.fusefs_src, store)
        self.observed: dict[str, Any] = {}
        self.rss: dict[str, dict[str, dict[str, float]]] = {}  # system -> group -> rss
        self._serial = itertools.count(1)
        self._baselines: dict[str, Measure] = {}
        self.wanted = {s.id for s in wanted_specs(args.only)}
        #: state a group keeps for the whole run (the write rows' server), and what stops it
        self.context: dict[str, Any] = {}
        self.cleanup = contextlib.ExitStack()

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
        """Does the store's server still answer HTTP at all?"""
        try:
            with urllib.request.urlopen(self.direct_url + "/", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def client(self, proxy: ProxyProcess | None = None) -> Client:
        """An SDK client (boto3, google-cloud-storage, azure-storage-blob) straight to the
        server, or through ``proxy``."""
        return self.store.client(proxy.url if proxy else self.direct_url)

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


def fusefs_stats(m: Mounted) -> dict[str, Any]:
    """A fusefs mount's statistics (empty for peers, or if unreadable)."""
    if m.system != "fusefs":
        return {}
    try:
        data: dict[str, Any] = json.loads((m.path / ".fusefs").read_bytes())
    except (OSError, ValueError):
        return {}
    return data


def fusefs_counters(m: Mounted, data: dict[str, Any] | None = None) -> dict[str, int]:
    """The counters of a fusefs mount's control file (empty for peers, or if unreadable)."""
    data = fusefs_stats(m) if data is None else data
    return {k: int(data[k]) for k in _COUNTERS if isinstance(data.get(k), int)}


def children_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of each live child process of ``pid`` (a mount's worker
    processes, where it has any)."""
    out: dict[int, float] = {}
    if pid is None:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


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
    if getattr(b.args, "profile_gil", False):
        cmd.append("--gil")
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
    stats0 = fusefs_stats(m)
    before, cpu0, kids0 = fusefs_counters(m, stats0), cpu_and_faults(m.pid), children_cpu(m.pid)
    if proxy is not None:
        proxy.reset()
    with profiled(b, m, label):
        out, secs = timed(fn)
    cpu1, kids1 = cpu_and_faults(m.pid), children_cpu(m.pid)
    stats1 = fusefs_stats(m)
    notes: dict[str, Any] = {"wall_s": round(secs, 3)}
    if cpu0 is not None and cpu1 is not None:
        notes["daemon_cpu_s"] = round(cpu1[0] - cpu0[0], 3)
        notes["daemon_minor_faults"] = cpu1[1] - cpu0[1]
        notes["workers_cpu_s"] = round(sum(v - kids0.get(k, 0.0) for k, v in kids1.items()), 3)
    if stats0 and stats1:
        notes["fuse_requests"] = request_delta(stats0, stats1)
        if stats0.get("cpu_s") is not None and stats1.get("cpu_s") is not None:  # getrusage
            notes["fuse_cpu_s"] = round(stats1["cpu_s"] - stats0["cpu_s"], 4)
        if stats0.get("cpu_loop_s") is not None and stats1.get("cpu_loop_s") is not None:
            notes["cpu_loop_s"] = round(stats1["cpu_loop_s"] - stats0["cpu_loop_s"], 3)
    if proxy is not None:
        notes["requests"] = proxy.counts()
    after = fusefs_counters(m, stats1)
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
    client.list(bucket)
    for key in heads:
        client.head(bucket, key)


def check_size(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what}: read {got} bytes, expected {want}")
