"""Sizes, workload specs and results of the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

KiB, MiB, GiB = 1024, 1024**2, 1024**3
READERS = 16  # parallel readers / SDK threads
BLOCK = 4 * KiB  # size of one random read
REPO = Path(__file__).resolve().parent.parent.parent  # scripts/benchlib/model.py
RSS_BUDGET_MIB = 256
RSS_FLAT_FACTOR = 1.2  # peak after the big file may exceed the peak after the medium one by 20%

BIG_BUCKET, SMALL_BUCKET, LIST_BUCKET = "bench-big", "bench-small", "bench-list"
BIG_KEY, MEDIUM_KEY, SMALL_DIR = "big.bin", "medium.bin", "files"
DATASET_BUCKET, OPEN_DIR, TRAIN_DIR = "bench-dataset", "open", "train2017"
LOADER_WORKERS, LOADER_BATCH, LOADER_PREFETCH = 16, 32, 2  # a DataLoader's defaults, 16 workers
LOADER_TTL = 5.0  # --metadata-ttl of the loader's mounts: epoch 2 starts after it has passed

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
    open_files: int = 20_000  # objects in the flat folder opened by path
    open_reads: int = 2_000  # random names opened from it
    loader_files: int = 4_000  # files of the loader's dataset folder (100 KiB each)
    loader_epochs: int = 3  # epochs with a cache of a third of the data

    @property
    def list_objects(self) -> int:
        return self.list_folders * self.list_per_folder


SIZES = {
    "full": Sizes(GiB, 100 * MiB, 5000, 100 * KiB, 200, 100, 2000, 1000, 20_000, 2_000, 4_000, 3),
    "quick": Sizes(256 * MiB, 32 * MiB, 1000, 100 * KiB, 40, 100, 500, 500, 4_000, 800, 1_000, 2),
    "tiny": Sizes(8 * MiB, 2 * MiB, 48, 100 * KiB, 4, 25, 64, 48, 120, 40, 96, 2),
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
    #: a second target: fusefs's figure against a peer's, (peer, ratio), checked with --peers
    peer_target: tuple[str, float] | None = None


SPECS = [
    Spec("seq_hot", "hot", "hot re-read of {big} (page cache)", "MB/s",
         "local file in page cache", 0.9, True, "big"),
    Spec("seq_warm", "warm", "warm read of {big} from block cache, page cache dropped", "MB/s",
         "cold read of a local file", 0.8, True, "big"),
    Spec("seq_cold", "cold", "cold sequential read of {big}", "MB/s",
         "{download}", 0.8, True, "big"),
    Spec("small_cold", "small_cold", "cold read of {files} x {fsize} files, 16 readers, {lat} ms",
         "files/s", "{sdk} list + 16-thread GETs", 0.7, True, "small"),
    Spec("small_warm", "small_warm", "warm re-read of those files, 16 readers", "files/s",
         "same tree on local disk, 16 readers", 0.3, True, "small"),
    Spec("prefetch", "prefetch", "prefetch of that folder (then 0 GETs on read), {lat} ms",
         "files/s", "{sdk} list + 16-thread GETs", 0.7, True, "prefetch"),
    Spec("find", "find", "find over {objs} objects in {dirs} folders, cold, {lat} ms", "s",
         "{listing}", 1.5, False, "list"),
    Spec("ls_lR", "ls", "ls -lR over {objs} objects in {dirs} folders, cold, {lat} ms", "s",
         "{listing}", 1.5, False, "list"),
    Spec("random_4k", "random", "random 4 KiB reads of {big}, 16 threads, cold", "reads/s",
         "{sdk} ranged GETs, 16 threads", 0.7, True, "random"),
    Spec("seq_cold_latency", "cold_latency", "cold sequential read of {big}, {lat} ms", "MB/s",
         "{download}, through the latency proxy", 0.8, True, "big_latency",
         ("rclone", 1.0)),
    Spec("open_by_path", "open", "open {open_reads} random names of a flat folder of "
         "{open_files} x {fsize} by path (no listing), 16 threads, cold, {lat} ms", "files/s",
         "{sdk} GETs of the same keys, 16 threads", 1.0, True, "open", ("rclone", 2.0)),
    Spec("small_cold_cores", "cores", "cold read of {files} x {fsize} files, 16 readers, "
         "{lat} ms, daemon pinned to 2 cores (taskset -c 0,1)", "files/s",
         "the same, daemon pinned to 1 core (taskset -c 0)", 1.7, True, "cores"),
    Spec("loader_cold", "loader_cold", "loader epoch 1, no hints: {loader_files} x {fsize} "
         "shuffled, 16 worker processes, batches of 32, {lat} ms", "files/s",
         "{sdk} GET in __getitem__, 16 processes", 1.0, True, "loader"),
    Spec("loader_hinted", "loader_hinted", "loader epoch 1 with fusefs.loader hints (and "
         ">= the no-hint figure)", "files/s", "{sdk} GET in __getitem__, 16 processes", 1.5,
         True, "loader"),
    Spec("loader_epoch2", "loader_epoch2", "loader epoch 2, all cached, after the "
         "metadata TTL ({ttl} s)", "files/s",
         "same reader on local disk, page cache warm", 0.4, True, "loader"),
    Spec("loader_epoch2_forever", "loader_forever", "loader epoch 2, all cached, "
         "--metadata-ttl forever", "files/s",
         "same reader on local disk, page cache warm", 0.6, True, "loader"),
    Spec("loader_small_cache", "loader_small_cache", "loader with hints, cache a third of the "
         "data: slowest of {epochs} epochs", "files/s",
         "{sdk} GET in __getitem__, 16 processes", 1.2, True, "loader"),
    Spec("loader_torch_hinted", "loader_torch", "torch DataLoader + HintingSampler, epoch 1: "
         "{loader_files} x {fsize}, 16 workers, batches of 32, {lat} ms", "files/s",
         "{sdk} GET in __getitem__, the same DataLoader", 1.5, True, "loader_torch"),
    Spec("loader_torch_epoch2", "loader_torch_epoch2", "torch DataLoader + HintingSampler, "
         "epoch 2 after the metadata TTL ({ttl} s)", "files/s",
         "the same DataLoader on local disk, page cache warm", 0.4, True, "loader_torch"),
    Spec("rss", "rss", "peak RSS of the daemon (flat: {medium} vs {big} file)", "MiB",
         f"budget {RSS_BUDGET_MIB} MiB", 1.0, False, "rss"),
    # the write rows (issue 11): SeaweedFS behind its own latency proxy, see writes.py
    Spec("write_1g", "write_1g", "write: cp of a {wbig} file, until `fusefs sync` returns, "
         "{lat} ms", "MB/s", "boto3 upload_file, same part size and parts in flight", 0.8,
         True, "write"),
    Spec("tar_x", "tar_x", "write: tar x of {wfiles} x {wfsize} files in {wfolders} folders, "
         "then sync, {lat} ms", "files/s", "boto3 16-thread PUTs", 0.5, True, "write",
         ("rclone", 1.5)),
    Spec("write_rss", "write_rss", "write: peak RSS of the daemon writing {wrss} (dd bs=1M, "
         "then sync)", "MiB", f"budget {RSS_BUDGET_MIB} MiB", 1.0, False, "write"),
]  # fmt: skip
GROUP_ORDER = ["medium", "big", "big_latency", "random", "small", "cores", "prefetch", "list",
               "open", "loader", "loader_torch", "write"]  # fmt: skip
#: The rows the scaling model (benchlib.scaling) is reported for.
MODEL_ROWS = ("small_cold_cores", "loader_cold", "loader_hinted", "loader_epoch2",
              "loader_epoch2_forever", "loader_small_cache", "loader_torch_hinted",
              "loader_torch_epoch2", "tar_x")  # fmt: skip
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
    baseline_name: str = ""  # the spec's baseline with the store's SDK filled in
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
        return "PASS" if ok and m.extra_ok and self.peer_ok(m) is not False else "MISS"

    def peer_ratio(self, m: Measure) -> float | None:
        """fusefs's figure over the peer's of ``peer_target`` (None: no such peer figure)."""
        if self.spec.peer_target is None or m is not self.results.get("fusefs"):
            return None
        peer = self.results.get(self.spec.peer_target[0])
        if peer is None or peer.error or not peer.value or m.value is None:
            return None
        r = m.value / peer.value
        return r if self.spec.higher_is_better else 1 / r

    def peer_ok(self, m: Measure) -> bool | None:
        r = self.peer_ratio(m)
        return None if r is None or self.spec.peer_target is None else (
            r >= self.spec.peer_target[1])

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": s.id,
            "title": self.title,
            "unit": s.unit,
            "baseline_name": self.baseline_name or s.baseline,
            "baseline": self.baseline.value if self.baseline else None,
            "baseline_notes": self.baseline.notes if self.baseline else {},
            "target_ratio": s.target,
            "target": f"{'>=' if s.higher_is_better else '<='} {s.target}",
            "peer_target": (
                f">= {s.peer_target[1]} x {s.peer_target[0]}" if s.peer_target else None
            ),
            "results": {
                name: {
                    "value": m.value,
                    "ratio": _round(self.ratio(m)),
                    "peer_ratio": _round(self.peer_ratio(m)),
                    "status": self.status(m),
                    "error": m.error,
                    "notes": m.notes,
                }
                for name, m in self.results.items()
            },
        }


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def wanted_specs(only: str) -> list[Spec]:
    names = set(filter(None, only.split(",")))
    return [s for s in SPECS if not names or s.alias in names or s.id in names]
