"""Small helpers: timing, reading files, page cache, processes, mounts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .model import READERS, GiB, KiB, MiB, T

# --------------------------------------------------------------------------------- helpers

STARTED = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run ``fn`` and return its result and the wall-clock seconds it took."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def human(n: int) -> str:
    """Bytes -> ``1 GiB`` / ``100 KiB``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


_buffers = threading.local()


def _buffer() -> memoryview:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(MiB))
    return buf  # type: ignore[no-any-return]


def read_file(path: str | Path) -> int:
    """Read a whole file with 1 MiB reads into a reused buffer; returns the bytes read."""
    buf = _buffer()
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        while n := os.readv(fd, [buf]):
            total += n
        return total
    finally:
        os.close(fd)


def run_threads(fn: Callable[[T], int], items: Sequence[T], threads: int = READERS) -> int:
    """Apply ``fn`` to every item with ``threads`` threads, each taking an interleaved slice."""
    slices = [items[i::threads] for i in range(threads)]
    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(lambda chunk: sum(fn(x) for x in chunk), slices))


def fadvise_dontneed(path: Path) -> None:
    """Drop one file's (or a tree's) pages from the page cache."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        with contextlib.suppress(OSError):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def drop_caches(*paths: Path) -> str:
    """Empty the page cache: ``drop_caches`` as root, plus ``POSIX_FADV_DONTNEED`` on ``paths``."""
    os.sync()
    for p in paths:
        fadvise_dontneed(p)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        return "fadvise"


def proc_status(pid: int, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status in bytes (None if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid: int) -> bool:
    """Is ``pid`` a running (not zombie) process?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def fuse_mounts_under(root: Path) -> list[str]:
    """Mount points in /proc/mounts at or under ``root``."""
    prefix = os.path.realpath(root)
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line has an argument containing ``text``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(text.encode() in a for a in argv) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Wait for a daemon we started to exit after its unmount; TERM, then KILL it if not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def unmount(path: Path) -> None:
    """``fusermount3 -u``, then ``-uz`` (then ``umount -l``) until ``path`` is not mounted."""
    for cmd in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
        if not is_mounted(path):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*cmd, str(path)], capture_output=True, timeout=60)
        for _ in range(20):
            if not is_mounted(path):
                return
            time.sleep(0.05)
    if is_mounted(path):
        log(f"WARNING: could not unmount {path}")


def kernel_tunables(mountpoint: Path) -> dict[str, int]:
    """The FUSE connection's ``read_ahead_kb`` and ``max_background`` as the kernel has them."""
    minor = os.minor(os.stat(mountpoint).st_dev)
    out: dict[str, int] = {}
    for name, path in (
        ("read_ahead_kb", f"/sys/class/bdi/0:{minor}/read_ahead_kb"),
        ("max_background", f"/sys/fs/fuse/connections/{minor}/max_background"),
        ("congestion_threshold", f"/sys/fs/fuse/connections/{minor}/congestion_threshold"),
    ):
        with contextlib.suppress(OSError, ValueError):
            out[name] = int(Path(path).read_text())
    return out
