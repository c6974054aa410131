"""The issue 4 workloads: big object, random reads, small files, prefetch, tree walks."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from .harness import Bench, check_size, observe, prime_local, prime_server
from .model import (
    BIG_BUCKET,
    BIG_KEY,
    BLOCK,
    LIST_BUCKET,
    MEDIUM_KEY,
    READERS,
    SMALL_BUCKET,
    SMALL_DIR,
    Measure,
)
from .peers import System
from .util import drop_caches, read_file, run_threads, timed

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
    """Local page cache, local cold read and the SDK's parallel download of the big object."""
    local = b.data / BIG_BUCKET / BIG_KEY
    size = b.sizes.big
    prime_big(b)
    hot = [size / timed(lambda: read_file(local))[1] / 1e6 for _ in range(3)]
    client = b.client()
    dest = b.work / "download.bin"
    _, secs = timed(lambda: client.download(BIG_BUCKET, BIG_KEY, size, dest))
    check_size(dest.stat().st_size, size, f"{b.store.sdk} download")
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
    """SDK ranged GETs of 4 KiB, 16 threads, through the counting proxy (as the mounts)."""
    prime_big(b)
    client = b.client(b.counting)
    offsets = random_offsets(b)

    def one(off: int) -> int:
        return client.get(BIG_BUCKET, BIG_KEY, (off, BLOCK))

    b.counting.reset()
    got, secs = timed(lambda: run_threads(one, offsets))
    check_size(got, len(offsets) * BLOCK, f"{b.store.sdk} random reads")
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
    """The SDK: list the folder, then GET every key with 16 threads, through the latency
    proxy."""
    client = b.client(b.latency)
    n = b.sizes.small_files

    def work() -> int:
        keys = client.list(SMALL_BUCKET, SMALL_DIR + "/")
        return run_threads(lambda k: client.get(SMALL_BUCKET, k), keys)

    b.latency.reset()
    got, secs = timed(work)
    check_size(got, n * b.sizes.small_size, f"{b.store.sdk} small GETs")
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
    """The SDK's paginated listing of the whole listing bucket, through the proxy."""
    prime_local(b.data / LIST_BUCKET)
    prime_server(b, LIST_BUCKET)
    client = b.client(b.latency)
    b.latency.reset()
    keys, secs = timed(lambda: client.list(LIST_BUCKET))
    check_size(len(keys), b.sizes.list_objects, f"{b.store.sdk} listing (keys)")
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
