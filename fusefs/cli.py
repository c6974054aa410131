"""The ``fusefs`` command. User errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .cli_control import (
    ProgressBar,
    add_control_parsers,
    cmd_cancel_prefetch,
    cmd_clear,
    cmd_prefetch,
    cmd_stats,
    cmd_sync,
    format_stats,
    read_control,
    send_command,
)
from .config import (
    METADATA_PROBES,
    SETTING_NAMES,
    Settings,
    default_config_path,
    load_settings,
    setting_field,
)
from .errors import FusefsError, UserError

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
    "fetch_workers": {"metavar": "N"},
    "upload_part_size": {"metavar": "BYTES"},
    "upload_parts": {"metavar": "N"},
    "upload_grace": {"metavar": "SECONDS"},
    "rename_limit": {"metavar": "N"},
    "link_probe_size": {"metavar": "BYTES"},
    "metadata_probe": {"metavar": "MODE", "choices": METADATA_PROBES},
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

    add_control_parsers(sub)
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


__all__ = ["ProgressBar", "format_stats", "read_control", "send_command", "main"]


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
        "sync": cmd_sync,
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
