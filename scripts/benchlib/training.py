"""Issue 19's training rows beyond the plain process pool, and its model checks.

- ``cores``: the cold small-file read with the fusefs daemon pinned by ``taskset`` to 2 cores,
  against the same pinned to 1 core (the model says a daemon bound by one GIL gains little;
  the target is >= 1.7x).
- ``loader_torch``: the loader rows through torch's own ``DataLoader`` (16 worker processes,
  batches of 32, ``prefetch_factor`` 2) with :class:`fusefs.loader.HintingSampler`, against
  the same DataLoader whose ``__getitem__`` GETs through the store's SDK (epoch 1) or reads
  the local copy with the page cache warm (epoch 2). "not available" where torch is not
  installed.
- :func:`model_checks`: the issue's targets that are not a ratio to a baseline (hints never
  slower than none, FUSE-process CPU per cold and per cached file, requests per cached file).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from typing import Any

from . import scaling
from .dataset import _get_item, epoch_order, hint_state, prime_dataset, train_keys
from .harness import Bench, check_size, observe
from .model import (
    DATASET_BUCKET,
    LOADER_BATCH,
    LOADER_PREFETCH,
    LOADER_TTL,
    LOADER_WORKERS,
    SMALL_BUCKET,
    SMALL_DIR,
    TRAIN_DIR,
    Measure,
    Row,
)
from .peers import Fusefs, System
from .util import timed
from .workloads import per_file, prime_small, read_folder

# --------------------------------------------------------------------------------- cores


def _cores_unavailable(system: System) -> str | None:
    if not isinstance(system, Fusefs):
        return "not available: fusefs only"
    if shutil.which("taskset") is None:
        return "not available: taskset is not installed (util-linux)"
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        return "not available: needs CPUs 0 and 1"
    return None


def _pinned_small_cold(b: Bench, system: Fusefs, cpus: str, label: str) -> Measure:
    """Cold read of the small files (fresh mount, latency) with the daemon on ``cpus``."""
    limit = b.sizes.small_files
    prime_small(b)
    with b.mount(system.pinned(cpus), SMALL_BUCKET, b.latency.url, label) as m:
        (files, got), secs, notes = observe(
            b, m, lambda: read_folder(m.path / SMALL_DIR, limit), proxy=b.latency, label=label
        )
    check_size(got, files * b.sizes.small_size, f"small cold read on CPUs {cpus}")
    notes.update(files=files, cpus=cpus, requests_per_file=per_file(notes, files))
    notes["model"] = scaling.model(notes, files)
    return Measure(files / secs, notes)


def baselines_cores(b: Bench) -> dict[str, Measure]:
    reason = _cores_unavailable(b.fusefs)
    if reason:
        return {"small_cold_cores": Measure(None, error=reason)}
    return {"small_cold_cores": _pinned_small_cold(b, b.fusefs, "0", "cores1")}


def group_cores(b: Bench, system: System) -> dict[str, Measure]:
    reason = _cores_unavailable(system)
    if reason or not isinstance(system, Fusefs):
        return {"small_cold_cores": Measure(None, error=reason)}
    return {"small_cold_cores": _pinned_small_cold(b, system, "0,1", "cores2")}


# --------------------------------------------------------------------------------- torch


TORCH_ROWS = ("loader_torch_hinted", "loader_torch_epoch2")


def torch_unavailable() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "not available: torch is not installed (scripts/setup.sh installs its CPU build)"
    return None


class Items:
    """A map-style dataset for torch's DataLoader: item ``i`` is the size of file ``keys[i]``
    read whole (``kind`` "file", under ``where``) or GET through an SDK (``kind`` "s3"...)."""

    def __init__(self, kind: str, where: str, keys: list[str]) -> None:
        self.kind, self.where, self.keys = kind, where, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> int:
        return _get_item((self.kind, self.where, self.keys[i]))


def _collate(batch: list[int]) -> int:
    return sum(batch)


def torch_epoch(items: Items, sampler: Any) -> int:
    """One epoch through a real ``torch.utils.data.DataLoader``: 16 worker processes (forked,
    its default on Linux; started at the epoch's start, for every system alike), batches of
    32, prefetch_factor 2; returns the bytes read."""
    import warnings

    from torch.utils.data import DataLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # more workers than cores: torch warns
        loader: Any = DataLoader(items, batch_size=LOADER_BATCH,  # type: ignore[arg-type]
                                 sampler=sampler, num_workers=LOADER_WORKERS,
                                 prefetch_factor=LOADER_PREFETCH, collate_fn=_collate)  # fmt: skip
        return sum(loader)


def baselines_loader_torch(b: Bench) -> dict[str, Measure]:
    reason = torch_unavailable()
    if reason:
        return {rid: Measure(None, error=reason) for rid in TORCH_ROWS}
    keys = train_keys(b)
    n, size = len(keys), b.sizes.small_size
    prime_dataset(b, TRAIN_DIR)
    b.latency.reset()
    got, secs = timed(lambda: torch_epoch(Items(b.store.name, b.latency.url, keys),
                                          epoch_order(n, 1)))  # fmt: skip
    check_size(got, n * size, f"{b.store.sdk} torch loader epoch")
    notes: dict[str, Any] = {"requests": b.latency.counts(), "files": n}
    notes["requests_per_file"] = per_file(notes, n)
    local = Items("file", str(b.data / DATASET_BUCKET), keys)
    torch_epoch(local, epoch_order(n, 1))  # page cache warm
    got2, secs2 = timed(lambda: torch_epoch(local, epoch_order(n, 2)))
    check_size(got2, n * size, "local torch loader epoch")
    return {"loader_torch_hinted": Measure(n / secs, notes),
            "loader_torch_epoch2": Measure(n / secs2, {"page_cache": "warm", "files": n})}


def group_loader_torch(b: Bench, system: System) -> dict[str, Measure]:
    """Epoch 1 with hints, then epoch 2 after the TTL, on one fresh ``--read-only`` mount."""
    reason = torch_unavailable() or (None if isinstance(system, Fusefs) else
                                     "not available: fusefs only")  # fmt: skip
    if reason or not isinstance(system, Fusefs):
        return {rid: Measure(None, error=reason) for rid in TORCH_ROWS}
    from fusefs.loader import HintingSampler

    keys = train_keys(b)
    n, size = len(keys), b.sizes.small_size
    lookahead = LOADER_PREFETCH * LOADER_WORKERS * LOADER_BATCH
    args = ["--read-only", "--metadata-ttl", f"{LOADER_TTL:g}"]
    prime_dataset(b, TRAIN_DIR)
    out: dict[str, Measure] = {}
    with b.mount(system.with_args(args), DATASET_BUCKET, b.latency.url, "torch") as m:
        items = Items("file", str(m.path), keys)
        sampler = HintingSampler([], keys, m.path, window_files=1024, lookahead=lookahead,
                                 stream="bench")  # fmt: skip
        try:
            for e, rid in ((1, "loader_torch_hinted"), (2, "loader_torch_epoch2")):
                if e == 2:
                    time.sleep(LOADER_TTL + 1)  # every file's metadata has expired
                sampler.sampler = epoch_order(n, e)
                got, secs, notes = observe(b, m, lambda: torch_epoch(items, sampler),
                                           proxy=b.latency, label=rid)  # fmt: skip
                check_size(got, n * size, f"torch loader {rid}")
                notes.update(files=n, requests_per_file=per_file(notes, n),
                             hints=hint_state(m.path))  # fmt: skip
                notes["model"] = scaling.model(notes, n)
                out[rid] = Measure(n / secs, notes)
        finally:
            sampler.close()  # its control connection: the mount can be unmounted
    return out


# --------------------------------------------------------------------------------- checks


def model_checks(rows: dict[str, Row]) -> list[dict[str, Any]]:
    """The issue's targets that are not a ratio to a baseline, from fusefs's figures of this
    run: hints never slower than none (also marked on the loader_hinted row), the FUSE
    process's CPU per cold file (<= 0.5 ms) and per cached file (<= 0.06 ms), and requests per
    cached file on a ``--read-only`` mount with ``forever`` TTL (<= 3)."""

    def fig(rid: str) -> Measure | None:
        row = rows.get(rid)
        m = row.results.get("fusefs") if row else None
        return m if m is not None and m.value is not None and not m.error else None

    def check(name: str, value: float | None, target: str, ok: bool | None,
              detail: str = "") -> dict[str, Any]:  # fmt: skip
        status = ("info" if target == "info" and value is not None else
                  "n/a" if value is None or ok is None else "PASS" if ok else "MISS")
        return {"check": name, "value": value, "target": target, "status": status,
                "detail": detail}  # fmt: skip

    out = []
    hinted, cold = fig("loader_hinted"), fig("loader_cold")
    if hinted is not None and cold is not None and hinted.value and cold.value:
        r = hinted.value / cold.value
        hinted.extra_ok = hinted.extra_ok and r >= 1.0
        hinted.notes["vs_no_hints"] = round(r, 3)
        out.append(check("loader epoch 1: hints / no hints", round(r, 3), ">= 1.0", r >= 1.0))
    else:
        out.append(check("loader epoch 1: hints / no hints", None, ">= 1.0", None))
    for name, rid, target in (("FUSE-process CPU per cold file (ms)", "loader_cold", 0.5),
                              ("FUSE-process CPU per cached file (ms)",
                               "loader_epoch2_forever", 0.06)):  # fmt: skip
        m = fig(rid)
        v = (m.notes.get("model") or {}).get("fuse_cpu_ms_per_file") if m else None
        out.append(check(name, v, f"<= {target:g}", None if v is None else v <= target,
                         f"from {rid}"))  # fmt: skip
    m = fig("loader_epoch2_forever")
    model = (m.notes.get("model") or {}) if m else {}
    per = model.get("requests_per_file") or {}
    v = model.get("requests_per_file_counted")
    which = ", ".join(f"{k.upper()} {x:g}" for k, x in per.items() if x)
    out.append(check("requests per cached file, --read-only, forever TTL", v, "<= 3",
                     None if v is None else v <= 3,
                     f"{which or 'none'} (+ IOCTL per open() on CPython <= 3.13, not counted)"))
    # stock pyfuse3's ceiling (a trivial filesystem, OPEN and RELEASE per cached file), and
    # how close fusefs's cached epoch comes to it: what no change inside fusefs can pass
    row = rows.get("loader_epoch2_forever")
    base = row.baseline if row else None
    floor = base.notes.get("pyfuse3_floor_files_per_s") if base and base.value else None
    if floor and base is not None and base.value:
        cpu = base.notes.get("pyfuse3_floor_cpu_ms_per_file")
        out.append(check("a trivial pyfuse3 filesystem's cached epoch / page cache",
                         round(floor / base.value, 3), "info", None,
                         f"{floor:,} files/s, {cpu} ms of its process's CPU per file: "
                         f"stock pyfuse3's ceiling"))
        v = round(m.value / floor, 3) if m is not None and m.value else None
        out.append(check("fusefs epoch 2, forever TTL / the trivial pyfuse3 filesystem", v,
                         "info", None, "how close fusefs comes to that ceiling"))
    return out


def render_checks(checks: list[dict[str, Any]]) -> str:
    lines = ["| model check | value | target | status |", "|---|---|---|---|"]
    for c in checks:
        v = "-" if c["value"] is None else f"{c['value']:g}"
        detail = f" ({c['detail']})" if c["detail"] else ""
        lines.append(f"| {c['check']}{detail} | {v} | {c['target']} | {c['status']} |")
    return "\n".join(lines)
