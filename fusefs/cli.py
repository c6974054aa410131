"""The ``fusefs`` command. User errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from .config import (
    SETTING_NAMES,
    Settings,
    default_config_path,
    human_size,
    load_settings,
    setting_field,
)
from .errors import FusefsError, UserError
from .fs import CONTROL_NAME

# Flags that map 1:1 onto settings (name -> argparse kwargs); declared once, used by mount.
_SETTING_FLAGS: dict[str, dict[str, Any]] = {
    "endpoint_url": {"metavar": "URL"},
    "region": {},
    "profile": {},
    "project": {"metavar": "GCP_PROJECT"},
    "cache_dir": {"metavar": "DIR"},
    "cache_size": {"metavar": "BYTES"},
    "block_size": {"metavar": "BYTES"},
    "workers": {"metavar": "N"},
    "stall_timeout": {"metavar": "SECONDS"},
    "metadata_ttl": {"metavar": "SECONDS"},
    "negative_ttl": {"metavar": "SECONDS"},
    "readahead_max": {"metavar": "BYTES"},
    "read_ahead_kb": {"metavar": "KB"},
    "max_background": {"metavar": "N"},
    "log_level": {"metavar": "LEVEL"},
    "log_file": {"metavar": "FILE"},
    "uid": {},
    "gid": {},
    "file_mode": {"metavar": "OCTAL"},
    "dir_mode": {"metavar": "OCTAL"},
    "metrics": {"metavar": "HOST:PORT"},
    "uploads": {"metavar": "N"},
    "upload_part_size": {"metavar": "BYTES"},
    "upload_parts": {"metavar": "N"},
    "upload_grace": {"metavar": "SECONDS"},
    "rename_limit": {"metavar": "N"},
}
_BOOL_FLAGS = ("allow_other", "read_only", "sync_uploads")


def _help(name: str) -> str:
    f = setting_field(name)
    env = f.metadata.get("env")
    return f"{f.metadata['help']}" + (f" [env {env}]" if env else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusefs",
        description="Mount object-store buckets as "
        "local directories, with a persistent block cache.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE (s3://, gs://, az://, file://) on MOUNTPOINT")
    m.add_argument(
        "source",
        nargs="?",
        help="s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX], az://CONTAINER[/PREFIX] or file:///DIR "
        "(default: source in the config file)",
    )
    m.add_argument("mountpoint", nargs="?", help="(default: mountpoint in the config file)")
    for name, kw in _SETTING_FLAGS.items():
        m.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, help=_help(name), **kw
        )
    for name in _BOOL_FLAGS:
        m.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            action="store_const",
            const=True,
            default=None,
            help=_help(name),
        )
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: fusefs settings as key=value (cache_size=20G), "
        "allow_other, ro; mount(8)-only ones (_netdev, nofail, x-*...) are ignored; "
        "others are passed to FUSE",
    )
    m.add_argument(
        "--config",
        metavar="FILE",
        help="config file; may also name source and mountpoint "
        "(default $FUSEFS_CONFIG_PATH or ~/.config/fusefs/config.toml)",
    )

    u = sub.add_parser("unmount", aliases=["umount"], help="unmount MOUNTPOINT")
    u.add_argument("mountpoint", nargs="?", help="(default: mountpoint in the config file)")
    u.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")
    u.add_argument("--config", metavar="FILE", help="take the mount point from this config file")

    _add_control_parsers(sub)
    from .check import add_parser as add_check_parser

    add_check_parser(sub)
    return p


#: Options only mount(8), fstab or systemd understand (``x-*`` too); fusefs ignores them.
#: The atime family is dropped as well: a read-only view never updates access times.
MOUNT_ONLY_OPTIONS = frozenset(
    {
        "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
        "_netdev", "nofail", "comment", "relatime", "norelatime", "strictatime",
        "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime",
    }
)  # fmt: skip


def _user_or_group_id(key: str, value: str) -> str:
    """``uid=alice`` / ``gid=data`` (fstab style) -> the number; numbers pass unchanged."""
    if not value or value.isdigit():
        return value
    import grp
    import pwd

    try:
        if key == "uid":
            return str(pwd.getpwnam(value).pw_uid)
        return str(grp.getgrnam(value).gr_gid)
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise UserError(f"-o {key}={value}: no such {what}") from None


def split_options(options: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``-o`` values -> (settings given as options, FUSE options to pass through).

    Kernel mount flags that FUSE applies (noexec, nosuid, nodev, sync, dirsync, noatime...)
    pass through; ``ro`` sets read_only (which also mounts read-only).
    """
    settings: dict[str, Any] = {}
    passthrough: list[str] = []
    for group in options:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            key, _, value = opt.partition("=")
            key_ = key.replace("-", "_")
            if key_ in ("uid", "gid"):
                settings[key_] = _user_or_group_id(key_, value)
            elif key_ in SETTING_NAMES and key_ not in _BOOL_FLAGS:
                settings[key_] = value
            elif key_ in _BOOL_FLAGS:
                settings[key_] = value or "true"
            elif key == "ro":
                settings["read_only"] = "true"
            elif key in MOUNT_ONLY_OPTIONS or key.startswith("x-"):
                continue
            else:
                passthrough.append(opt)
    return settings, passthrough


def config_mount_keys(config_path: str | None) -> dict[str, Any]:
    """``source``, ``mountpoint`` and ``options`` from the config file (if it names them)."""
    path = config_path or os.environ.get("FUSEFS_CONFIG_PATH") or default_config_path()
    if not os.path.isfile(path):
        return {}  # a missing file is reported by load_settings
    import tomllib

    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path}: {exc}") from None
    values = values.get("fusefs", values)
    keys = {k: values[k] for k in ("source", "mountpoint", "options") if k in values}
    for k in ("source", "mountpoint"):
        if k in keys and not isinstance(keys[k], str):
            raise UserError(f"config file {path}: {k} must be a string")
    opts = keys.get("options", [])
    opts = [opts] if isinstance(opts, str) else opts
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise UserError(f"config file {path}: options must be a string or a list of strings")
    named, keys["options"] = split_options(opts)
    if named:
        raise UserError(
            f"config file {path}: options: write {sorted(named)[0]} as a key of its own"
        )
    keys["path"] = path
    return keys


def cmd_mount(args: argparse.Namespace) -> int:
    from . import mount as mnt

    opt_settings, passthrough = split_options(args.options)
    cli = {
        **opt_settings,
        **{
            k: getattr(args, k)
            for k in (*_SETTING_FLAGS, *_BOOL_FLAGS)
            if getattr(args, k) is not None
        },
    }
    file_keys = config_mount_keys(args.config)
    source = args.source or file_keys.get("source")
    mountpoint = args.mountpoint or file_keys.get("mountpoint")
    if not source or not mountpoint:
        raise UserError(
            "give SOURCE and MOUNTPOINT, or a config file (--config FILE) with "
            "source = ... and mountpoint = ..."
        )
    passthrough = [*file_keys.get("options", []), *passthrough]
    settings = load_settings(cli, config_path=args.config)
    # the daemon works from /: relative paths must not change meaning
    mountpoint = os.path.abspath(mountpoint)
    settings.cache_dir = os.path.abspath(settings.cache_dir)
    if settings.log_file:
        settings.log_file = os.path.abspath(settings.log_file)
    mnt.setup_logging(settings, daemon=False)
    mnt.check_fuse()
    mnt.check_mountpoint(mountpoint)
    from .backends import open_store

    try:
        mnt.check_store(open_store(source, settings))
    except FusefsError as exc:
        raise UserError(str(exc)) from None

    def reload_settings() -> Settings:
        new = load_settings(cli, config_path=args.config)
        if new.log_file:
            new.log_file = os.path.abspath(new.log_file)
        return new

    def factory(daemon: bool) -> mnt.Mount:
        if daemon:
            mnt.setup_logging(settings, daemon=True)
        m = mnt.build(source, mountpoint, settings)
        m.extra_fuse_options = passthrough
        m.reload_settings = reload_settings
        return m

    return mnt.daemonize_and_run(factory, args.foreground)


def cmd_unmount(args: argparse.Namespace) -> int:
    where = args.mountpoint or config_mount_keys(args.config).get("mountpoint")
    if not where:
        raise UserError("give MOUNTPOINT, or a config file (--config FILE) with mountpoint = ...")
    mp = os.path.abspath(where)
    if not os.path.ismount(mp):
        try:
            os.stat(mp)
        except OSError as exc:
            if exc.errno != 107:  # ENOTCONN: a dead mount is still unmountable
                raise UserError(f"{mp}: {exc.strerror}") from None
        else:
            raise UserError(f"{mp} is not a mount point")
    tool = "fusermount3" if shutil.which("fusermount3") else "umount"
    cmd = (
        [tool, "-uz" if args.lazy else "-u", mp]
        if tool == "fusermount3"
        else ["umount", *(["-l"] if args.lazy else []), mp]
    )
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise UserError(
            f"cannot unmount {mp}: {msg[-1] if msg else 'failed'}"
            + (" (files open? try --lazy)" if "busy" in " ".join(msg) else "")
        )
    return 0


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


def _add_control_parsers(sub: Any) -> None:
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
    """Write one command line to the control file and return the JSON it answers."""
    path = os.path.join(mountpoint, CONTROL_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise UserError(f"{mountpoint} is not a fusefs mount (no {CONTROL_NAME})") from None
    except PermissionError:
        raise UserError(
            f"{mountpoint}: only the user who mounted it (or root) may send commands"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    failed: OSError | None = None
    try:
        try:
            os.write(fd, (shlex.join(words) + "\n").encode())
        except OSError as exc:
            failed = exc
        chunks, off = [], 0
        while chunk := os.pread(fd, 1 << 20, off):
            chunks.append(chunk)
            off += len(chunk)
    finally:
        os.close(fd)
    try:
        data: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError:
        data = {}
    if failed is not None:
        raise UserError(str(data.get("error") or failed.strerror))
    return data


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


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
            ("errors", str(d["errors"])),
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


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import cmd_check

    return cmd_check(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and "://" in argv[0]:
        # `fusefs SOURCE MOUNTPOINT -o ...`: how mount.fuse3 runs a `fuse.fusefs` type
        argv.insert(0, "mount")
    args = build_parser().parse_args(argv)
    handlers = {
        "mount": cmd_mount,
        "unmount": cmd_unmount,
        "umount": cmd_unmount,
        "stats": cmd_stats,
        "clear": cmd_clear,
        "prefetch": cmd_prefetch,
        "cancel-prefetch": cmd_cancel_prefetch,
        "check": _cmd_check,
    }
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"fusefs: {exc}", file=sys.stderr)
        return 1
    except FusefsError as exc:
        print(f"fusefs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
