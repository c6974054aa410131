"""Helpers for the service and lifecycle tests: world-readable scratch directories (so that other
uids can reach the mounts), running commands as another uid, finding and ending daemons.

Everything a test creates under a :class:`WorldDir` is undone when it closes, even after a
failure: processes that mention the directory are ended, mounts under it (bind mounts included)
are unmounted, the directory is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: uids/gids with no passwd entry: setpriv runs as any number, nothing is created
OWNER, GROUP_MEMBER, STRANGER, SHARED_GID = 4242, 4243, 4244, 4242


def fusefs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusefs", *args]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def mounts_under(path: str | Path) -> list[tuple[str, str, str]]:
    """(mount point, fstype, options) of every mount at or under ``path``, in mount order."""
    root = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mp = _unescape(fields[4])
            if mp == root or mp.startswith(root + "/"):
                fstype, _src, super_opts = (right.split() + ["", "", ""])[:3]
                out.append((mp, fstype, fields[5] + "," + super_opts))
    return out


def fuse_mount_at(path: str | Path) -> tuple[str, str] | None:
    """(fstype, options) of the top FUSE mount exactly at ``path``, or None."""
    found = [(t, o) for mp, t, o in mounts_under(path)
             if mp == os.path.realpath(path) and t.startswith("fuse")]
    return found[-1] if found else None


def pids_mentioning(text: str) -> list[int]:
    """Processes (not this one) whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def run_as(uid: int, gid: int, *cmd: str, groups: tuple[int, ...] = (),
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as another uid/gid (no passwd entry needed), capturing its output."""
    grp = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", *grp, *cmd],
                          capture_output=True, text=True, timeout=timeout)


def control(mp: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(mp) / ".fusefs").read_bytes())
    return data


def wait_answering(mp: str | Path, proc: subprocess.Popen[Any] | None = None,
                   timeout: float = 30) -> None:
    """Until ``mp`` is a live fusefs mount (its control file answers)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"fusefs exited {proc.returncode} before {mp} answered")
        try:
            control(mp)
            return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{mp} did not answer within {timeout}s: {last}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> int | None:
    """SIGTERM, then SIGKILL if it lingers; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class WorldDir:
    """A scratch directory under /tmp that any uid may traverse, undone completely on close."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="fusefs-svc-", dir="/tmp"))
        os.chmod(self.path, 0o755)
        self._procs: list[subprocess.Popen[Any]] = []

    def mkdir(self, name: str, mode: int = 0o755) -> Path:
        p = self.path / name
        p.mkdir(parents=True)
        os.chmod(p, mode)
        return p

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(cmd, **kw)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(Exception):
                stop_process(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        pids = pids_mentioning(str(self.path))  # daemons forked by mount(8) helpers too
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if wait_gone(pids, 10):
                break
        for mp, fstype, _ in reversed(mounts_under(self.path)):
            cmds = [["fusermount3", "-u", mp], ["fusermount3", "-uz", mp]] \
                if fstype.startswith("fuse") else []
            for cmd in [*cmds, ["umount", mp], ["umount", "-l", mp]]:
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
        shutil.rmtree(self.path, ignore_errors=True)
