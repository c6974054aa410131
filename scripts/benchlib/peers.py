"""The filesystems measured: fusefs through its CLI (on any store), s3fs-fuse and
``rclone mount`` (S3 only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .stores import S3, Store
from .util import is_mounted

# --------------------------------------------------------------------------------- systems


@dataclass
class Mounted:
    """A live mount of one system; ``rss`` is filled in just before it is unmounted."""

    system: str
    path: Path
    cache_dir: Path
    pid: int | None
    rss: dict[str, float] = field(default_factory=dict)
    tunables: dict[str, int] = field(default_factory=dict)


class System:
    """A FUSE filesystem that can mount a bucket of the benchmark's S3 server."""

    name = ""

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        """Mount ``bucket`` on ``mp``; return once the mount answers."""
        raise NotImplementedError


def _run_checked(cmd: list[str], env: dict[str, str], what: str, logfile: Path) -> None:
    """Run a mount command that daemonizes. Its output goes to a file, not a pipe: a daemon
    that keeps the pipe open would make us wait for it forever."""
    with open(logfile.with_suffix(".out"), "w+") as out:
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, timeout=90)  # fmt: skip
        if r.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"{what} failed ({r.returncode}): {out.read()[-800:]}")


def _wait_mounted(mp: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mp):
            with contextlib.suppress(OSError):
                os.listdir(mp)
                return
        time.sleep(0.05)
    raise RuntimeError(f"{mp} did not become a mount within {timeout:.0f}s")


def fusefs_env(src: str | None = None) -> dict[str, str]:
    """The environment of a fusefs command: test credentials, no config file, no FUSEFS_*;
    with ``src``, the fusefs package is imported from that source tree instead."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FUSEFS_", "AWS_", "AZURE_", "STORAGE_EMULATOR_HOST"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        FUSEFS_CONFIG_PATH=os.devnull,
        PYTHONSAFEPATH="1",  # `python -m fusefs` must not import ./fusefs from the cwd
    )
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


class Fusefs(System):
    """fusefs through its real CLI (``python -m fusefs mount``, which daemonizes)."""

    name = "fusefs"

    def __init__(self, extra: Sequence[str] = (), src: str | None = None,
                 store: Store | None = None, cpus: str | None = None) -> None:
        self.extra = list(extra)
        self.src = src
        self.store = store or S3()
        self.cpus = cpus  # pinned to these CPUs (``taskset -c``), workers included

    def env(self) -> dict[str, str]:
        return fusefs_env(self.src)

    def with_args(self, args: Sequence[str]) -> Fusefs:
        """The same fusefs, mounted with ``args`` added (e.g. ``--metadata-ttl 5``)."""
        return Fusefs([*self.extra, *args], self.src, self.store, self.cpus)

    def pinned(self, cpus: str) -> Fusefs:
        """The same fusefs, its daemon (and any process it starts) pinned to ``cpus``."""
        return Fusefs(self.extra, self.src, self.store, cpus)

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        source, args, env = self.store.mount_spec(bucket, url)
        cmd = [sys.executable, "-m", "fusefs", "mount", source, str(mp), *args,
               "--cache-dir", str(cache), "--log-file", str(logfile), *self.extra]  # fmt: skip
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        _run_checked(cmd, {**self.env(), **env}, "fusefs mount", logfile)


class S3fs(System):
    """s3fs-fuse with its disk cache (``use_cache``), path-style requests, read-only."""

    name = "s3fs"

    def __init__(self, passwd_file: Path) -> None:
        self.passwd_file = passwd_file

    def unavailable(self) -> str | None:
        return None if shutil.which("s3fs") else "not available: s3fs is not installed"

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        opts = (f"url={url},use_path_request_style,passwd_file={self.passwd_file},"
                f"use_cache={cache},ro,endpoint=us-east-1")  # fmt: skip
        _run_checked(["s3fs", bucket, str(mp), "-o", opts], dict(os.environ), "s3fs", logfile)
        _wait_mounted(mp)


class RcloneMount(System):
    """``rclone mount --vfs-cache-mode full`` (with ``--use-server-modtime``: no HEAD per file),
    read-only unless told otherwise, with ``extra`` arguments."""

    name = "rclone"

    def __init__(self, read_only: bool = True, extra: Sequence[str] = ()) -> None:
        self.read_only = read_only
        self.extra = list(extra)

    def unavailable(self) -> str | None:
        from fusefs.testing.servers import rclone_available

        if rclone_available() is None or shutil.which("fusermount3") is None:
            return "not available: rclone or fusermount3 is not installed"
        return None

    def start(self, bucket: str, url: str, mp: Path, cache: Path, logfile: Path) -> None:
        from fusefs.testing.servers import rclone_available

        env = dict(os.environ)
        env.update(
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=url,
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="testing",
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="testing",
            RCLONE_CONFIG_BENCH_REGION="us-east-1",
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        )
        cmd = [str(rclone_available()), "mount", f"bench:{bucket}", str(mp),
               "--config", os.devnull, *(["--read-only"] if self.read_only else []),
               "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--use-server-modtime",
               "--daemon", "--log-file", str(logfile), *self.extra]  # fmt: skip
        _run_checked(cmd, env, "rclone mount", logfile)
        _wait_mounted(mp)
