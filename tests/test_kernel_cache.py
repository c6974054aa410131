"""The kernel serves cached epochs (issue 19): what a cached file costs the daemon, counted.

Real mounts; the evidence is the daemon's own request counter (``fuse_requests`` in the
statistics), never a clock.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from conftest import Bucket, MountProc, blob

KiB = 1024
FILES = 50


def requests(m: MountProc) -> Counter[str]:
    return Counter(m.stats()["fuse_requests"])


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
