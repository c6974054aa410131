#!/usr/bin/env python3
"""The fusefs benchmark (issue 4): every fusefs figure next to a baseline measured in the same run.

One command sets up an S3 server on 127.0.0.1 (``rclone serve s3`` by default), a latency proxy
in front of it for the workloads that model a cloud, creates the data, mounts fusefs through its
real CLI (a fresh mount and cache directory wherever "cold" is required), runs each workload,
and prints a table and writes a JSON file::

    python scripts/bench.py [--latency-ms 20] [--quick] [--peers] [--only cold,small_cold]
                            [--json out.json] [--server rclone|moto] [--stores s3,gcs,azure]

``--stores`` runs the same workloads on fake-gcs-server and Azurite too, one after the other,
each against its own SDK's baseline (google-cloud-storage, azure-storage-blob) in the same run.
``--peers`` adds columns for s3fs-fuse and ``rclone mount`` (S3) when they are installed. Mounts,
servers and the proxy are always stopped, also on Ctrl-C. Nothing here asserts on timings:
the numbers are reported, with PASS/MISS against the issue's target ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib.dataset import make_dataset
from benchlib.harness import Bench, make_data
from benchlib.model import SIZES, SPECS, Measure, wanted_specs
from benchlib.peers import Fusefs, RcloneMount, S3fs, System
from benchlib.report import (
    fusefs_info,
    header,
    machine_info,
    render_notes,
    render_table,
    store_header,
    version_of,
)
from benchlib.run import build_rows, run_groups
from benchlib.stores import make_store
from benchlib.stores import unavailable as store_unavailable
from benchlib.training import model_checks, render_checks
from benchlib.util import STARTED, fuse_mounts_under, log, timed, unmount

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
    p.add_argument("--server", choices=["rclone", "moto"], default="rclone",
                   help="the S3 server (default rclone serve s3)")
    p.add_argument("--stores", default="s3", metavar="LIST",
                   help="comma-separated stores to run the workloads on, each against its own "
                   "SDK: s3 (rclone/moto, boto3), gcs (fake-gcs-server, google-cloud-storage), "
                   "azure (Azurite, azure-storage-blob); default s3")  # fmt: skip
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
    p.add_argument("--profile-gil", action="store_true",
                   help="with --profile: sample only the thread holding the GIL (where the "
                   "daemon's Python CPU goes, without threads that wait)")  # fmt: skip
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
    stores = args.stores.split(",")
    if not stores or any(s not in ("s3", "gcs", "azure") for s in stores) or (
            len(set(stores)) != len(stores)):
        p.error(f"--stores {args.stores!r}: a comma-separated list of s3, gcs, azure")
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    stores = [make_store(name, args.server) for name in args.stores.split(",")]
    specs = wanted_specs(args.only)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "scripts/bench.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "fusefs": fusefs_info(Fusefs(args.fusefs_opt, args.fusefs_src)),
        "latency_ms": args.latency_ms,
        "sizes": asdict(sizes),
        "peers": {"s3fs": version_of(["s3fs", "--version"]) if args.peers else None,
                  "rclone": version_of(["rclone", "version"]) if args.peers else None},
        "workloads": [],
        "stores": {},
    }  # fmt: skip
    data_bench = Bench(args, sizes, work, stores[0])
    data_bench.monitor.close()
    log(f"creating data under {data_bench.data}")
    if all(sp.group == "write" for sp in specs):  # the write rows make their own files
        _, secs = timed(lambda: data_bench.data.mkdir(parents=True))
    else:
        _, secs = timed(lambda: (make_data(data_bench.data, sizes),
                                 make_dataset(data_bench.data, data_bench)))  # fmt: skip
    log(f"data ready in {secs:.1f}s")
    reports = []
    for store in stores:
        b = Bench(args, sizes, work, store)
        systems: list[System] = [b.fusefs]
        if args.peers and store.name == "s3":
            passwd = work / "s3fs.passwd"
            passwd.write_text("testing:testing\n")
            passwd.chmod(0o600)
            systems += [S3fs(passwd), RcloneMount()]
        rows = build_rows(b, specs)
        st: dict[str, Any] = {"server": args.server if store.name == "s3" else store.name,
                              "sdk": store.sdk}  # fmt: skip
        started = time.monotonic()
        reason = store_unavailable(store.name)
        try:
            if reason:
                log(f"{store.name}: skipped ({reason})")
                st["server_version"] = f"not available: {reason}"
                for row in rows.values():
                    row.results["fusefs"] = Measure(None, error=f"not available: {reason}")
            else:
                log(f"{store.name}: starting the server")
                with store.server(b) as version:
                    st["server_version"] = version
                    try:
                        b.start_proxies()
                        run_groups(b, systems, rows)
                    finally:
                        b.close_proxies()
        finally:
            b.cleanup.close()  # the write rows' server and proxy
            b.monitor.close()
        st["model_checks"] = model_checks(rows)  # also marks loader_hinted vs no hints
        st.update(observed=b.observed, rss_per_mount=b.rss,
                  elapsed_s=round(time.monotonic() - started, 1))  # fmt: skip
        info["stores"][store.name] = st
        info["workloads"] += [{"store": store.name, **r.to_json()} for r in rows.values()]
        reports.append((b, st, rows, [s.name for s in systems]))
    first = info["stores"][stores[0].name]  # the keys of a one-store run, as before
    info.update(server=first["server"], server_version=first["server_version"],
                observed=first["observed"], rss_per_mount=first["rss_per_mount"])  # fmt: skip
    info["elapsed_s"] = round(time.monotonic() - STARTED, 1)
    print(header(info))
    for b, st, rows, names in reports:
        print()
        print(store_header(b, st))
        print()
        print(render_table(rows, names))
        print()
        print(render_notes(rows, names))
        print()
        print(render_checks(st["model_checks"]))
    print(f"\nelapsed: {info['elapsed_s']:.0f}s")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fusefs_src:  # the benchmark's own use of fusefs (proxy, loader hints) too
        sys.path.insert(0, os.path.abspath(args.fusefs_src))
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
