"""The scaling model of issue 19: what one file costs the filesystem, and what that predicts.

For a training row: FUSE requests per file by kind (the kernel side, counted by the mount's
``fuse_requests``), CPU per file in the FUSE process and in its worker processes (if the mount
has any), and the predicted ceiling in files/s on N cores::

    min(1 / fuse_cpu_per_file, N / total_cpu_per_file)

The FUSE process answers every request on one thread under one GIL: its CPU per file bounds
the rate whatever the cores; work in other processes spreads over N cores. The model ignores
the reader's own CPU and the store's: it is the filesystem's ceiling, not the job's.
"""

from __future__ import annotations

from typing import Any

#: Request kinds reported per file (the kernel's names, lower case as fusefs counts them).
KINDS = ("lookup", "getattr", "open", "read", "flush", "release", "ioctl")
#: Cores the ceiling is predicted for.
CORES = (2, 16, 64)


def request_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """FUSE requests by kind between two statistics snapshots (``fuse_requests``)."""
    b, a = before.get("fuse_requests") or {}, after.get("fuse_requests") or {}
    return {k: int(a.get(k, 0)) - int(b.get(k, 0)) for k in sorted(set(a) | set(b))
            if int(a.get(k, 0)) != int(b.get(k, 0))}  # fmt: skip


def model(notes: dict[str, Any], files: int) -> dict[str, Any]:
    """The row's model from its evidence (``fuse_requests`` delta, the FUSE process's CPU
    seconds -- ``fuse_cpu_s`` from the mount's ``cpu_s``, else ``daemon_cpu_s`` from /proc --
    and its child processes' CPU seconds, ``workers_cpu_s``), per file. IOCTL is answered
    inside libfuse and never reaches fusefs: it is not counted (CPython <= 3.13 sends one per
    ``open()``)."""
    if files <= 0 or "fuse_requests" not in notes:
        return {}
    reqs: dict[str, int] = notes["fuse_requests"]
    per_file: dict[str, float | None] = {
        k: round(reqs.get(k, 0) / files, 3) for k in KINDS if k != "ioctl"
    }
    per_file["ioctl"] = None  # not counted: libfuse answers it
    out: dict[str, Any] = {
        "files": files,
        "requests_per_file": per_file,
        "requests_per_file_counted": round(sum(v for v in per_file.values() if v), 3),
    }
    # the daemon's own getrusage (µs) where the mount reports it, else /proc ticks (10 ms)
    fuse_cpu = notes.get("fuse_cpu_s", notes.get("daemon_cpu_s"))
    if fuse_cpu is None:
        return out
    workers_cpu = float(notes.get("workers_cpu_s") or 0.0)
    fuse_pf, total_pf = fuse_cpu / files, (fuse_cpu + workers_cpu) / files
    out.update(
        fuse_cpu_ms_per_file=round(1000 * fuse_pf, 3),
        workers_cpu_ms_per_file=round(1000 * workers_cpu / files, 3),
        total_cpu_ms_per_file=round(1000 * total_pf, 3),
        predicted_files_per_s={str(n): ceiling(fuse_pf, total_pf, n) for n in CORES},
    )
    if notes.get("cpu_loop_s") is not None:
        out["fuse_loop_cpu_ms_per_file"] = round(1000 * notes["cpu_loop_s"] / files, 3)
    return out


def ceiling(fuse_per_file: float, total_per_file: float, cores: int) -> float | None:
    """Files/s the filesystem can serve on ``cores`` cores (None: no CPU was measured)."""
    bounds = [1 / fuse_per_file] if fuse_per_file > 0 else []
    if total_per_file > 0:
        bounds.append(cores / total_per_file)
    return round(min(bounds)) if bounds else None


def summary(m: dict[str, Any]) -> str:
    """One line of evidence: requests per file by kind, CPU per file, the ceilings."""
    if not m:
        return ""
    per = m["requests_per_file"]
    reqs = " ".join(f"{k.upper()} {v:g}" for k, v in per.items() if v) or "none"
    bits = [f"requests/file: {reqs} (IOCTL not counted)"]
    if "fuse_cpu_ms_per_file" in m:
        bits.append(f"CPU/file: FUSE process {m['fuse_cpu_ms_per_file']:.3f} ms, workers "
                    f"{m['workers_cpu_ms_per_file']:.3f} ms")  # fmt: skip
        ceil = ", ".join(f"{n} cores {v:,}" if v is not None else f"{n} cores ?"
                         for n, v in m["predicted_files_per_s"].items())  # fmt: skip
        bits.append(f"predicted ceiling files/s: {ceil}")
    return "; ".join(bits)
