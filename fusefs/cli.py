"""The ``fusefs`` command. User errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .config import SETTING_NAMES, Settings, load_settings
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
    "metadata_ttl": {"metavar": "SECONDS"},
    "negative_ttl": {"metavar": "SECONDS"},
    "readahead_max": {"metavar": "BYTES"},
    "log_level": {"metavar": "LEVEL"},
    "log_file": {"metavar": "FILE"},
    "uid": {},
    "gid": {},
    "file_mode": {"metavar": "OCTAL"},
    "dir_mode": {"metavar": "OCTAL"},
}
_BOOL_FLAGS = ("allow_other", "read_only")


def _help(name: str) -> str:
    from dataclasses import fields

    f = next(f for f in fields(Settings) if f.name == name)
    env = f.metadata.get("env")
    return f"{f.metadata['help']}" + (f" [env {env}]" if env else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusefs",
        description="Mount object-store buckets as "
        "local directories, with a persistent block cache.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount SOURCE (s3://, gs://, file://) on MOUNTPOINT")
    m.add_argument("source", help="s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or file:///DIR")
    m.add_argument("mountpoint")
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
        "allow_other, ro; others are passed to FUSE",
    )
    m.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default $FUSEFS_CONFIG_PATH or ~/.config/fusefs/config.toml)",
    )

    u = sub.add_parser("unmount", aliases=["umount"], help="unmount MOUNTPOINT")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")

    s = sub.add_parser("stats", help="show cache statistics of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    return p


def split_options(options: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """``-o`` values -> (settings given as options, FUSE options to pass through)."""
    settings: dict[str, Any] = {}
    passthrough: list[str] = []
    for group in options:
        for opt in filter(None, (o.strip() for o in group.split(","))):
            key, _, value = opt.partition("=")
            key_ = key.replace("-", "_")
            if key_ in SETTING_NAMES and key_ not in _BOOL_FLAGS:
                settings[key_] = value
            elif key_ in _BOOL_FLAGS:
                settings[key_] = value or "true"
            elif key == "ro":
                settings["read_only"] = "true"
            elif key in (
                "rw",
                "defaults",
                "auto",
                "noauto",
                "user",
                "nouser",
                "_netdev",
                "nofail",
                "exec",
                "noexec",
                "suid",
                "nosuid",
                "dev",
                "nodev",
            ) or key.startswith("x-"):
                continue  # only mount(8) / systemd understand these
            else:
                passthrough.append(opt)
    return settings, passthrough


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
    settings = load_settings(cli, config_path=args.config)
    mountpoint = os.path.abspath(args.mountpoint)
    mnt.setup_logging(settings, daemon=False)
    mnt.check_fuse()
    mnt.check_mountpoint(mountpoint)
    from .backends import open_store

    try:
        mnt.check_store(open_store(args.source, settings))
    except FusefsError as exc:
        raise UserError(str(exc)) from None

    def factory(daemon: bool) -> mnt.Mount:
        if daemon:
            mnt.setup_logging(settings, daemon=True)
        m = mnt.build(args.source, mountpoint, settings)
        m.extra_fuse_options = passthrough
        return m

    return mnt.daemonize_and_run(factory, args.foreground)


def cmd_unmount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
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


def cmd_stats(args: argparse.Namespace) -> int:
    data = read_control(os.path.abspath(args.mountpoint))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for k, v in data.items():
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "mount": cmd_mount,
        "unmount": cmd_unmount,
        "umount": cmd_unmount,
        "stats": cmd_stats,
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
