"""The issue 9 workloads: opening files of a big flat folder by path, a DataLoader-like reader
(16 worker processes, shuffled batches) with and without ``fusefs.loader`` hints, and the cold
sequential read of the big object through the latency proxy.

The loader is a stand-in for torch's ``DataLoader`` built from multiprocessing only: the main
process takes indices from the sampler (a :class:`fusefs.loader.HintingSampler` when hinting),
groups them in batches of 32 and hands each batch to one of 16 worker processes, keeping at most
``prefetch_factor x workers`` batches outstanding, as a DataLoader does; a worker reads each file
of its batch whole (``__getitem__``). The SDK baseline (boto3, google-cloud-storage or
azure-storage-blob) is the same reader whose ``__getitem__`` GETs the object instead (the "no
filesystem" way to write a Dataset).
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import scaling
from .harness import Bench, check_size, cpu_and_faults, observe, prime_local, prime_server
from .model import (
    BIG_BUCKET,
    BIG_KEY,
    DATASET_BUCKET,
    LOADER_BATCH,
    LOADER_PREFETCH,
    LOADER_TTL,
    LOADER_WORKERS,
    OPEN_DIR,
    READERS,
    SPECS,
    TRAIN_DIR,
    Measure,
    MiB,
)
from .peers import Fusefs, System
from .util import log, read_file, run_threads, timed, unmount
from .workloads import per_file, prime_big

# --------------------------------------------------------------------------------- data


def open_keys(b: Bench) -> list[str]:
    return [f"{OPEN_DIR}/img{i:06d}.jpg" for i in range(b.sizes.open_files)]


def train_keys(b: Bench) -> list[str]:
    return [f"{TRAIN_DIR}/{i:012d}.jpg" for i in range(b.sizes.loader_files)]


def make_dataset(root: Path, b: Bench) -> None:
    """The flat folders of the dataset bucket, only if a workload here needs them."""
    groups = {"open": open_keys, "loader": train_keys}
    for group, keys in groups.items():
        if not any(sp.group == group and sp.id in b.wanted for sp in SPECS):
            continue
        for key in keys(b):
            path = root / DATASET_BUCKET / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(b.sizes.small_size))


def prime_dataset(b: Bench, folder: str) -> None:
    prime_local(b.data / DATASET_BUCKET / folder)
    prime_server(b, DATASET_BUCKET)


# --------------------------------------------------------------------------------- open by path


def open_sample(b: Bench) -> list[str]:
    """The same seeded random names for every system (no repeats)."""
    keys = open_keys(b)
    return random.Random(9).sample(keys, min(b.sizes.open_reads, len(keys)))


def baselines_open(b: Bench) -> dict[str, Measure]:
    """SDK GETs of the same keys from 16 threads, through the latency proxy (no listing)."""
    prime_dataset(b, OPEN_DIR)
    client = b.client(b.latency)
    keys = open_sample(b)
    b.latency.reset()
    got, secs = timed(lambda: run_threads(lambda k: client.get(DATASET_BUCKET, k), keys))
    check_size(got, len(keys) * b.sizes.small_size, f"{b.store.sdk} GETs by key")
    notes = {"requests": b.latency.counts(), "files": len(keys)}
    notes["requests_per_file"] = per_file(notes, len(keys))
    return {"open_by_path": Measure(len(keys) / secs, notes)}


def group_open(b: Bench, system: System) -> dict[str, Measure]:
    """16 threads open random names of the flat folder by path on a fresh mount: no ``ls``,
    so every name is a cold lookup in one big folder (the kernel runs those one at a time)."""
    keys = open_sample(b)
    if system.name != "fusefs":
        keys = keys[: b.sizes.peer_files]
    prime_dataset(b, OPEN_DIR)
    with b.mount(system, DATASET_BUCKET, b.latency.url, "open") as m:
        paths = [str(m.path / k) for k in keys]
        got, secs, notes = observe(
            b, m, lambda: run_threads(read_file, paths), proxy=b.latency, label="open_by_path"
        )
    check_size(got, len(keys) * b.sizes.small_size, "open by path")
    notes.update(files=len(keys), requests_per_file=per_file(notes, len(keys)))
    return {"open_by_path": Measure(len(keys) / secs, notes)}


# --------------------------------------------------------------------------------- the loader


_clients: dict[str, Any] = {}


def _get_item(task: tuple[str, str, str]) -> int:
    """Worker process: one sample, the way a Dataset's ``__getitem__`` reads it: a file read
    whole (``("file", root, key)``) or an object GET through the store's SDK (``("s3", url,
    key)``, ``"gcs"``, ``"azure"``)."""
    kind, where, key = task
    if kind == "file":
        return read_file(os.path.join(where, key))
    client = _clients.get(kind + where)
    if client is None:
        from .stores import make_store

        client = _clients[kind + where] = make_store(kind).client(where)
    return int(client.get(DATASET_BUCKET, key))


def _get_batch(tasks: list[tuple[str, str, str]]) -> int:
    return sum(_get_item(t) for t in tasks)


def _ready(_: int) -> int:
    return os.getpid()


@contextlib.contextmanager
def worker_pool() -> Iterator[Any]:
    """16 started worker processes (spawned, as a DataLoader on macOS/Windows does: nothing of
    the benchmark's threads is inherited); started before any timing."""
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(LOADER_WORKERS)
    try:
        pids: set[int] = set()
        while len(pids) < LOADER_WORKERS:  # every worker up and importing done
            pids.update(pool.map(_ready, range(4 * LOADER_WORKERS), chunksize=1))
        yield pool
    finally:
        pool.terminate()
        pool.join()


def epoch_order(n: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(1000 + epoch).shuffle(order)
    return order


def run_epoch(pool: Any, sampler: Iterable[int], task: Any) -> int:
    """Batches of 32 indices from ``sampler`` to the workers, at most prefetch_factor x
    workers batches outstanding, consumed in order (a DataLoader's loop); returns bytes."""
    outstanding: collections.deque[Any] = collections.deque()
    total = 0
    batch: list[Any] = []
    limit = LOADER_PREFETCH * LOADER_WORKERS
    for index in sampler:
        batch.append(task(index))
        if len(batch) == LOADER_BATCH:
            if len(outstanding) >= limit:
                total += outstanding.popleft().get()
            outstanding.append(pool.apply_async(_get_batch, (batch,)))
            batch = []
    if batch:
        outstanding.append(pool.apply_async(_get_batch, (batch,)))
    while outstanding:
        total += outstanding.popleft().get()
    return total


def baselines_loader(b: Bench) -> dict[str, Measure]:
    """The SDK in ``__getitem__`` (16 processes, through the latency proxy) for epoch 1, and the
    same reader on local disk with the page cache warm for epoch 2."""
    keys = train_keys(b)
    n, size = len(keys), b.sizes.small_size
    prime_dataset(b, TRAIN_DIR)
    out: dict[str, Measure] = {}
    with worker_pool() as pool:
        order = epoch_order(n, 1)
        url = b.latency.url
        b.latency.reset()
        kind = b.store.name
        got, secs = timed(lambda: run_epoch(pool, order, lambda i: (kind, url, keys[i])))
        check_size(got, n * size, f"{b.store.sdk} loader epoch")
        notes: dict[str, Any] = {"requests": b.latency.counts(), "files": n}
        notes["requests_per_file"] = per_file(notes, n)
        cold = Measure(n / secs, notes)
        for rid in ("loader_cold", "loader_hinted", "loader_small_cache"):
            out[rid] = cold
        local = str(b.data / DATASET_BUCKET)
        run_epoch(pool, order, lambda i: ("file", local, keys[i]))  # page cache warm
        got, secs = timed(
            lambda: run_epoch(pool, epoch_order(n, 2), lambda i: ("file", local, keys[i]))
        )
        check_size(got, n * size, "local loader epoch")
        local_epoch = Measure(n / secs, {"page_cache": "warm", "files": n})
        floor = _floor_epoch(b, pool, n)
        if floor:
            local_epoch.notes["pyfuse3_floor_files_per_s"] = round(floor[0])
            local_epoch.notes["pyfuse3_floor_ratio"] = round(floor[0] * secs / n, 3)
            local_epoch.notes["pyfuse3_floor_cpu_ms_per_file"] = floor[1]
        out["loader_epoch2"] = out["loader_epoch2_forever"] = local_epoch
    return out


@contextlib.contextmanager
def floor_mount(b: Bench) -> Iterator[tuple[Path, int]]:
    """The training folder served by ``floorfs.py`` (a trivial pyfuse3 filesystem), mounted at
    ``ROOT/TRAIN_DIR``; yields (ROOT, its pid); always unmounted."""
    root = b.work / "mnt" / "pyfuse3-floor"
    mp = root / TRAIN_DIR
    mp.mkdir(parents=True, exist_ok=True)
    src = b.data / DATASET_BUCKET / TRAIN_DIR
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floorfs.py")),
                             str(src), str(mp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mp):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode()[-300:] if proc.stderr else ""
                raise RuntimeError(f"floorfs did not mount: {err}")
            time.sleep(0.05)
        yield root, proc.pid
    finally:
        unmount(mp)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _floor_epoch(b: Bench, pool: Any, n: int) -> tuple[float, float | None] | None:
    """(files/s, CPU ms per file of its process) of the same reader on a trivial pyfuse3
    filesystem, its pages cached (epoch 1 fills them, epoch 2 is measured): the ceiling of a
    cached epoch on stock pyfuse3 here, which the cached rows are read against (None if it
    cannot mount)."""
    keys = train_keys(b)
    try:
        with floor_mount(b) as (root, pid):
            where = str(root)
            run_epoch(pool, epoch_order(n, 1), lambda i: ("file", where, keys[i]))
            cpu0 = cpu_and_faults(pid)
            got, secs = timed(
                lambda: run_epoch(pool, epoch_order(n, 2), lambda i: ("file", where, keys[i]))
            )
            cpu1 = cpu_and_faults(pid)
    except (OSError, RuntimeError) as exc:
        log(f"loader: no pyfuse3 floor ({exc})")
        return None
    check_size(got, n * b.sizes.small_size, "pyfuse3 floor epoch")
    cpu = None if cpu0 is None or cpu1 is None else round(1000 * (cpu1[0] - cpu0[0]) / n, 3)
    return n / secs, cpu


LOADER_ROWS = ("loader_cold", "loader_hinted", "loader_epoch2", "loader_epoch2_forever",
               "loader_small_cache")  # fmt: skip


def group_loader(b: Bench, system: System) -> dict[str, Measure]:
    """Each wanted figure on its own fresh ``--read-only`` mount (``--metadata-ttl 5``): epoch 1
    without hints; epoch 1 with hints, then epoch 2 after the TTL; epochs 1 and 2 with hints
    and ``--metadata-ttl forever``; and, with a cache of a third of the data, every epoch with
    hints. Each figure carries the scaling model (``notes["model"]``)."""
    if not isinstance(system, Fusefs):
        return {rid: Measure(None, error="not available: fusefs only") for rid in LOADER_ROWS}
    from fusefs.loader import HintingSampler

    keys = train_keys(b)
    n, size = len(keys), b.sizes.small_size
    ttl = ["--read-only", "--metadata-ttl", f"{LOADER_TTL:g}"]
    out: dict[str, Measure] = {}
    lookahead = LOADER_PREFETCH * LOADER_WORKERS * LOADER_BATCH

    def epoch(m: Any, e: int, hinted: bool, label: str) -> tuple[int, float, dict[str, Any]]:
        order = epoch_order(n, e)
        root = str(m.path)
        sampler: Iterable[int] = order
        if hinted:
            sampler = HintingSampler(order, keys, m.path, window_files=1024,
                                     lookahead=lookahead, stream="bench")  # fmt: skip
        got, secs, notes = observe(
            b, m, lambda: run_epoch(pool, sampler, lambda i: ("file", root, keys[i])),
            proxy=b.latency, label=label,
        )  # fmt: skip
        check_size(got, n * size, f"loader {label}")
        notes.update(files=n, requests_per_file=per_file(notes, n))
        notes["model"] = scaling.model(notes, n)
        if hinted:
            notes["hints"] = hint_state(m.path)
        return got, secs, notes

    prime_dataset(b, TRAIN_DIR)
    with worker_pool() as pool:
        if "loader_cold" in b.wanted:
            with b.mount(system.with_args(ttl), DATASET_BUCKET, b.latency.url, "loader") as m:
                _, secs, notes = epoch(m, 1, False, "loader_cold")
                out["loader_cold"] = Measure(n / secs, notes)
        if {"loader_hinted", "loader_epoch2"} & b.wanted:
            with b.mount(system.with_args(ttl), DATASET_BUCKET, b.latency.url, "hints") as m:
                _, secs, notes = epoch(m, 1, True, "loader_hinted")
                out["loader_hinted"] = Measure(n / secs, notes)
                time.sleep(LOADER_TTL + 1)  # every file's metadata has expired
                _, secs, notes = epoch(m, 2, True, "loader_epoch2")
                notes["waited_past_ttl_s"] = LOADER_TTL + 1
                out["loader_epoch2"] = Measure(n / secs, notes)
        if "loader_epoch2_forever" in b.wanted:
            forever = ["--read-only", "--metadata-ttl", "forever"]
            with b.mount(system.with_args(forever), DATASET_BUCKET, b.latency.url,
                         "forever") as m:  # fmt: skip
                epoch(m, 1, True, "loader_forever_1")
                _, secs, notes = epoch(m, 2, True, "loader_epoch2_forever")
                out["loader_epoch2_forever"] = Measure(n / secs, notes)
        if "loader_small_cache" in b.wanted:
            cache = max(4 * MiB, n * size // 3)
            args = [*ttl, "--cache-size", str(cache), "--block-size", "1M"]
            with b.mount(system.with_args(args), DATASET_BUCKET, b.latency.url, "third") as m:
                runs = [epoch(m, e, True, f"loader_small_cache_{e}")
                        for e in range(1, b.sizes.loader_epochs + 1)]  # fmt: skip
            rates = [n / secs for _, secs, _ in runs]
            worst = min(range(len(runs)), key=lambda i: rates[i])
            notes = {**runs[worst][2], "cache_size": cache,
                     "epochs_files_per_s": [round(r) for r in rates]}  # fmt: skip
            out["loader_small_cache"] = Measure(rates[worst], notes)
    return out


def hint_state(mountpoint: Path) -> dict[str, Any]:
    """The bench stream's figures from the mount's statistics (what the hints did)."""
    import json

    try:
        data = json.loads((mountpoint / ".fusefs").read_bytes())
    except (OSError, ValueError):
        return {}
    st = next((s for s in data.get("hint_streams", []) if s["id"] == "bench"), {})
    keep = ("files_hinted", "files_done", "files_cached", "files_skipped", "files_pending",
            "window_bytes", "limited_by_cache")  # fmt: skip
    return {k: st[k] for k in keep if k in st}


# --------------------------------------------------------------------------------- big, latency


def baselines_big_latency(b: Bench) -> dict[str, Measure]:
    """The SDK's parallel download of the big object (16 x 8 MiB ranged GETs) through the
    proxy."""
    prime_big(b)
    client = b.client(b.latency)
    dest = b.work / "download-latency.bin"
    b.latency.reset()
    _, secs = timed(lambda: client.download(BIG_BUCKET, BIG_KEY, b.sizes.big, dest))
    check_size(dest.stat().st_size, b.sizes.big, f"{b.store.sdk} download through the proxy")
    dest.unlink()
    notes = {"requests": b.latency.counts(), "concurrency": READERS, "chunk_mib": 8}
    return {"seq_cold_latency": Measure(b.sizes.big / secs / 1e6, notes)}


def group_big_latency(b: Bench, system: System) -> dict[str, Measure]:
    """The cold sequential read of the big object on a fresh mount, through the latency proxy."""
    prime_big(b)
    with b.mount(system, BIG_BUCKET, b.latency.url, "big-latency") as m:
        got, secs, notes = observe(
            b, m, lambda: read_file(m.path / BIG_KEY), proxy=b.latency, label="seq_cold_latency"
        )
    check_size(got, b.sizes.big, "cold read through the proxy")
    return {"seq_cold_latency": Measure(b.sizes.big / secs / 1e6, notes)}
