"""``fusefs stats|clear|prefetch|cancel-prefetch|sync``: commands that talk to a running mount
through its control file ``MOUNTPOINT/.fusefs`` (statistics are read from it on every mount;
commands go through it, or, on a read-only mount, through the control socket it names)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import human_size
from .ctlclient import ControlConnection, ControlError
from .errors import UserError
from .fs import CONTROL_NAME


def read_control(mountpoint: str) -> dict[str, Any]:
    path = os.path.join(mountpoint, CONTROL_NAME)
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = json.loads(f.read())
            return data
    except FileNotFoundError:
        raise UserError(f"{mountpoint} is not a fusefs mount (no {CONTROL_NAME})") from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None


# --- the control file: stats, clear, prefetch, cancel-prefetch --------------------------------


def add_control_parsers(sub: Any) -> None:
    """Subcommands that talk to a running mount through ``MOUNTPOINT/.fusefs``."""
    s = sub.add_parser("stats", help="show cache statistics of a mount, or of a file or folder")
    s.add_argument("mountpoint")
    s.add_argument("path", nargs="?", help="a file or folder (relative to the mount root)")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    c = sub.add_parser("clear", help="drop cached blocks: all, or of one file or folder")
    c.add_argument("mountpoint")
    c.add_argument("path", nargs="?", help="a file or folder (default: the whole cache)")
    c.add_argument("--json", action="store_true", help="print the raw JSON")
    p = sub.add_parser("prefetch", help="download files or folders into the cache in background")
    p.add_argument("mountpoint")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    p.add_argument("--wait", action="store_true", help="show progress and return when done")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    y = sub.add_parser("sync", help="wait until every pending upload (under PATH) is in the "
                       "bucket; non-zero exit if any failed")
    y.add_argument("mountpoint")
    y.add_argument("path", nargs="?", help="a file or folder (default: the whole mount)")
    y.add_argument("--json", action="store_true", help="print the raw JSON")
    x = sub.add_parser("cancel-prefetch", help="drop queued prefetches (all, or under PATH)")
    x.add_argument("mountpoint")
    x.add_argument("path", nargs="?")
    x.add_argument("--json", action="store_true", help="print the raw JSON")


def _mount_relative(mountpoint: str, path: str) -> str:
    """A PATH argument -> path relative to the mount root (absolute ones must be inside)."""
    if not os.path.isabs(path):
        return path
    p = os.path.normpath(path)
    for mp in (mountpoint, os.path.realpath(mountpoint)):
        if p == mp:
            return "."
        if p.startswith(mp.rstrip("/") + "/"):
            return p[len(mp) :].lstrip("/")
    raise UserError(f"{path} is not inside the mount {mountpoint}")


def send_command(mountpoint: str, words: Sequence[str]) -> dict[str, Any]:
    """Run one command on the mount (its control file, or on a read-only mount its control
    socket) and return the JSON it answers."""
    path = os.path.join(mountpoint, CONTROL_NAME)
    try:
        conn = ControlConnection(mountpoint)
    except FileNotFoundError:
        raise UserError(f"{mountpoint} is not a fusefs mount (no {CONTROL_NAME})") from None
    except PermissionError:
        raise UserError(
            f"{mountpoint}: only the user who mounted it (or root) may send commands"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    try:
        return conn.run([shlex.join(words)])
    except ControlError as exc:
        raise UserError(str(exc.strerror)) from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    finally:
        conn.close()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _requests(d: dict[str, Any]) -> str:
    by_kind = d.get("fuse_requests") or {}
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    return f"{d.get('fuse_requests_total', 0)}" + (f" ({kinds})" if kinds else "")


def _cpu(d: dict[str, Any]) -> str:
    loop = d.get("cpu_loop_s")
    return f"{d.get('cpu_s', 0):.2f}s" + (f" ({loop:.2f}s answering FUSE)" if loop is not None
                                          else "")


def _workers(d: dict[str, Any]) -> str:
    n = d.get("fetch_workers", 0)
    if not n:
        return "none (fetches run in the daemon)"
    return (f"{n} ({d.get('workers_ready', 0)} ready), {d.get('worker_fetches', 0)} fetched, "
            f"{d.get('worker_hits', 0)} found cached, {d.get('worker_uploads', 0)} uploaded, "
            f"{d.get('worker_lists', 0)} listings, "
            f"{d.get('worker_restarts', 0)} restarts, "
            f"{d.get('worker_cpu_s', 0):.2f}s cpu")


def format_stats(d: dict[str, Any]) -> str:
    """The mount's statistics as a human table."""
    if "path" in d:  # stats of a file or folder
        rows = [
            ("path", f"{d['path']} ({d['type']})"),
            ("files", str(d["files"])),
            ("size", human_size(d["size"])),
            (
                "cached",
                f"{human_size(d['cached_bytes'])} ({_pct(d['fraction_cached'])}), "
                f"{d['cached_blocks']} of {d['blocks']} blocks",
            ),
        ]
        if d.get("upload", "none") != "none":
            rows.append(("upload", str(d["upload"]) + (f": {d['upload_error']}"
                                                       if d.get("upload_error") else "")))
    else:
        hits, misses = d["hits"], d["misses"]
        cache = (
            f"{d['current_size_str']} of {d['cache_size_str']} ({_pct(d['load_factor'])}), "
            f"{d['current_count']} blocks of {human_size(d['block_size'])}"
            if d["cache_size"]
            else "disabled (reads go to the store)"
        )
        rows = [
            ("source", str(d["source"])),
            ("cache dir", str(d["cache_dir"] or "-")),
            ("cache", cache),
            ("hits / misses", f"{hits} / {misses} (hit ratio {_pct(d['hit_ratio'])})"),
            ("served", human_size(d["bytes_served"])),
            (
                "fetched",
                f"{human_size(d['bytes_fetched'])} in {d['fetches']} requests, "
                f"{d['fetches_in_flight']} in flight",
            ),
            ("readahead", f"{d['readahead_blocks']} blocks"),
            (
                "prefetch",
                f"{d['prefetch_queued']} files queued, {d['prefetch_done']} done, "
                f"{d['prefetch_failed']} failed, {d['prefetch_cancelled']} cancelled, "
                f"{d['prefetch_pending']} pending ({human_size(d['prefetch_bytes_pending'])})",
            ),
            ("evictions", str(d["evictions"])),
            ("corrupt blocks", str(d.get("corrupt_blocks", 0))),
            (
                "uploads",
                f"{d.get('uploads_pending', 0)} pending "
                f"({human_size(d.get('staged_bytes', 0))} staged), "
                f"{d.get('uploads_done', 0)} done ({human_size(d.get('upload_bytes', 0))}), "
                f"{d.get('uploads_failed', 0)} failed, {d.get('conflicts', 0)} conflicts",
            ),
            ("errors", str(d["errors"])),
            ("fuse requests", _requests(d)),
            ("cpu", _cpu(d)),
            ("fetch workers", _workers(d)),
            ("open files", str(d["open_files"])),
            ("uptime", f"{d['uptime_s']}s"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _control_args(args: argparse.Namespace) -> tuple[str, str | None]:
    mp = os.path.abspath(args.mountpoint)
    path = getattr(args, "path", None)
    return mp, None if path is None else _mount_relative(mp, path)


def cmd_stats(args: argparse.Namespace) -> int:
    mp, path = _control_args(args)
    data = read_control(mp) if path is None else send_command(mp, ["stats", path])
    print(json.dumps(data, indent=2) if args.json else format_stats(data))
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    mp, path = _control_args(args)
    data = send_command(mp, ["clear", *([path] if path is not None else [])])
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        where = f"under {data['path']}" if data["path"] else "from the whole cache"
        print(
            f"cleared {data['blocks_removed']} blocks ({data['bytes_freed_str']}) {where}; "
            f"the cache holds {human_size(data['current_size'])}"
        )
    return 0


def cmd_cancel_prefetch(args: argparse.Namespace) -> int:
    mp, path = _control_args(args)
    data = send_command(mp, ["cancel-prefetch", *([path] if path is not None else [])])
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(
            f"cancelled {data['files_cancelled']} queued files "
            f"({human_size(data['bytes_cancelled'])})"
        )
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    data = send_command(mp, ["prefetch", *(_mount_relative(mp, p) for p in args.paths)])
    if args.json and not args.wait:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"prefetch #{data['id']}: {data['files_queued']} files ({data['bytes_queued_str']}) "
        f"queued, {data['files_cached']} already cached",
        file=sys.stderr,
    )
    if "warning" in data:
        print(f"fusefs: warning: {data['warning']}", file=sys.stderr)
    if not args.wait:
        return 0
    try:
        final = _wait_prefetch(mp, int(data["id"]), sys.stderr)
    except KeyboardInterrupt:
        print(
            f"\nfusefs: stopped waiting; prefetch #{data['id']} continues "
            f"(fusefs cancel-prefetch {mp} to stop it)",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(final, indent=2))
    for err in final["errors"]:
        print(f"fusefs: {err}", file=sys.stderr)
    if final["files_failed"] or final["files_cancelled"]:
        print(
            f"fusefs: prefetch #{final['id']}: {final['files_failed']} files failed, "
            f"{final['files_cancelled']} cancelled",
            file=sys.stderr,
        )
        return 1
    return 0


class ProgressBar:
    """Progress of one prefetch from the mount's statistics, drawn by tqdm: a bar, percent,
    bytes done of queued, rate, elapsed and ETA, and files done of queued.

    On a terminal a tqdm bar is redrawn in place; otherwise tqdm's line is printed once a
    second (and at the end), so logs get one readable line per second, not carriage returns.
    """

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._bar: Any = None
        self._samples: list[tuple[float, int]] = []
        self._last_print = 0.0

    _UNITS: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}

    @staticmethod
    def _files(r: dict[str, Any]) -> str:
        files = r["files_done"] + r["files_failed"] + r["files_cancelled"]
        failed = f", {r['files_failed']} failed" if r["files_failed"] else ""
        return f"{files}/{r['files_queued']} files{failed}"

    @staticmethod
    def _done(r: dict[str, Any]) -> int:
        return int(r["bytes_done"] + r["bytes_failed"] + r["bytes_cancelled"])

    def line(self, r: dict[str, Any], now: float) -> str:
        """tqdm's one-line meter; the rate is measured over the last five seconds."""
        self._samples.append((now, r["bytes_done"]))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.pop(0)
        t0, b0 = self._samples[0]
        finished = r["state"] == "finished"
        rate = None if finished or now <= t0 else (r["bytes_done"] - b0) / (now - t0)
        from tqdm import tqdm

        return str(tqdm.format_meter(
            self._done(r), r["bytes_queued"] or None, float(r["elapsed_s"]), ncols=100,
            rate=rate, postfix=self._files(r), **self._UNITS))

    def draw(self, r: dict[str, Any], now: float, final: bool = False) -> None:
        if not self.tty:
            if final or now - self._last_print >= 1.0:
                self.out.write(self.line(r, now) + "\n")  # not a terminal: a line a second
                self._last_print = now
                self.out.flush()
            return
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=r["bytes_queued"] or None, file=self.out, leave=True,
                             dynamic_ncols=True, mininterval=0.25, **self._UNITS)
        bar = self._bar
        bar.total = r["bytes_queued"] or None
        bar.set_postfix_str(self._files(r), refresh=False)
        bar.update(self._done(r) - bar.n)
        if final:
            bar.close()


def _wait_prefetch(mountpoint: str, req_id: int, out: Any) -> dict[str, Any]:
    """Poll the mount's statistics until prefetch ``req_id`` finishes; draw a progress bar."""
    bar = ProgressBar(out)
    while True:
        stats = read_control(mountpoint)
        r = next((r for r in stats.get("prefetch_requests", []) if r["id"] == req_id), None)
        if r is None:
            raise UserError(f"prefetch #{req_id} is no longer known to {mountpoint} (remounted?)")
        now = time.monotonic()
        if r["state"] == "finished":
            bar.draw(r, now, final=True)
            return r
        bar.draw(r, now)
        time.sleep(0.25)




def cmd_sync(args: argparse.Namespace) -> int:
    """Send ``sync [PATH]`` (it answers once every upload under PATH is done or failed) and
    show the uploads' progress meanwhile, from the mount's statistics."""
    import threading

    mp, path = _control_args(args)
    words = ["sync", *([path] if path is not None else [])]
    result: dict[str, Any] = {}
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.update(send_command(mp, words))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            error.append(exc)

    start = read_control(mp)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    meter = _SyncMeter(sys.stderr, start)
    try:
        while t.is_alive():
            t.join(0.25)
            if t.is_alive():
                meter.draw(read_control(mp))
    except KeyboardInterrupt:
        print("\nfusefs: stopped waiting; the uploads continue", file=sys.stderr)
        return 130
    if error:
        raise error[0]
    meter.draw(read_control(mp), final=True)
    if args.json:
        print(json.dumps(result, indent=2))
    for f in result.get("failed", []):
        print(f"fusefs: {f['path']}: upload failed (kept, retried): {f['error']}",
              file=sys.stderr)
    return 1 if result.get("failed") else 0


class _SyncMeter:
    """Uploads done of those pending at the start, bytes uploaded and their rate (tqdm's
    meter); a line a second when stderr is not a terminal."""

    def __init__(self, out: Any, start: dict[str, Any]) -> None:
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.t0 = time.monotonic()
        self.done0 = int(start.get("uploads_done", 0))
        self.bytes0 = int(start.get("upload_bytes", 0))
        self.total = int(start.get("uploads_pending", 0))
        self._last = 0.0

    def draw(self, stats: dict[str, Any], final: bool = False) -> None:
        from tqdm import tqdm

        now = time.monotonic()
        if not final and now - self._last < (0.25 if self.tty else 1.0):
            return
        self._last = now
        done = int(stats.get("uploads_done", 0)) - self.done0
        total = max(self.total, done + int(stats.get("uploads_pending", 0)))
        sent = int(stats.get("upload_bytes", 0)) - self.bytes0
        failed = int(stats.get("uploads_failed", 0))
        line = tqdm.format_meter(done, total or None, now - self.t0, ncols=100, unit="file",
                                 postfix=f"{human_size(sent)} uploaded"
                                 + (f", {failed} failed" if failed else ""))
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()
