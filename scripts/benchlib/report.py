"""The table, the evidence lines and the header of a run."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import scaling, writes
from .harness import Bench
from .model import REPO, GiB, KiB, Measure, Row
from .peers import Fusefs

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


def version_of(cmd: list[str]) -> str | None:
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
    if group == "write":
        return writes.evidence(n)
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
    if n.get("hints"):
        bits.append(f"hints {n['hints']}")
    if "epochs_files_per_s" in n:
        bits.append(f"epochs {n['epochs_files_per_s']} files/s, cache {n['cache_size']:,} B")
    if n.get("model"):
        bits.append(scaling.summary(n["model"]))
    return bits


def render_notes(rows: dict[str, Row], systems: list[str]) -> str:
    """A line of evidence per row and system: requests, read sizes, daemon CPU, RSS."""
    out = []
    for row in rows.values():
        for system in ["baseline", *systems]:
            m = row.baseline if system == "baseline" else row.results.get(system)
            if m is None:
                continue
            bits = evidence(m.notes, row.spec.group)
            pr, target = row.peer_ratio(m), row.spec.peer_target
            if pr is not None and target is not None:
                bits.append(f"{pr:.2f}x {target[0]} (target >= {target[1]:g}x: "
                            f"{'PASS' if pr >= target[1] else 'MISS'})")  # fmt: skip
            text = m.error or "; ".join(bits)
            if text:
                out.append(f"- {row.spec.id} [{system}]: {text}")
    return "\n".join(out)


def header(info: dict[str, Any]) -> str:
    """What was measured, where and when (once per run)."""
    m, f = info["machine"], info["fusefs"]
    lines = [
        f"machine : {m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"date    : {info['date']}",
        f"command : {info['command']}",
        f"fusefs  : {f['commit']}{' + uncommitted changes' if f['uncommitted_changes_in_fusefs'] else ''}"  # noqa: E501
        f"; {f['settings']}",
    ]
    if f["extra_mount_args"]:
        lines.append(f"extra   : {' '.join(f['extra_mount_args'])}")
    return "\n".join(lines)


def store_header(b: Bench, st: dict[str, Any]) -> str:
    """The store, server and baseline SDK of one table."""
    lines = [
        f"store   : {b.store.name}: {st['server_version']}, baselines: {b.store.sdk}; latency "
        f"{b.args.latency_ms:g} ms added by a proxy for the small-file, prefetch, listing, "
        "open and loader workloads",
    ]
    if b.observed.get("write_server"):
        lines.append(f"writes  : {b.observed['write_server']} (it keeps folder markers), "
                     f"behind a proxy of its own adding {b.args.latency_ms:g} ms; baselines: "
                     "boto3 through it")  # fmt: skip
    if b.observed.get("kernel_tunables"):
        lines.append(f"kernel  : fusefs mount had {b.observed['kernel_tunables']}")
    return "\n".join(lines)
