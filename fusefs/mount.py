"""Wires a mount together in one place, and runs it: checks, daemon, readiness, signals."""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from . import notify
from .backends import ObjectStore, open_store
from .cache.blocks import BlockStore, DiskBlockStore, NullBlockStore
from .config import Settings, human_size
from .control import Control
from .errors import FusefsError, UserError
from .fs import FileSystem
from .fuse_ops import FuseOperations
from .reader import Reader
from .stats import Stats

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Mount:
    """Everything one mount is made of."""

    source: str
    mountpoint: str
    settings: Settings
    store: ObjectStore
    blocks: BlockStore
    stats: Stats
    reader: Reader
    fs: FileSystem
    control: Control
    ops: FuseOperations
    extra_fuse_options: list[str] = field(default_factory=list)


def build(
    source: str, mountpoint: str, settings: Settings, store: ObjectStore | None = None
) -> Mount:
    """Construct the store, caches, reader, filesystem and FUSE adapter for one mount."""
    store = store or open_store(source, settings)
    blocks: BlockStore
    if settings.cache_enabled:
        blocks = DiskBlockStore(settings.cache_dir, settings.cache_size)
        recent = 0
    else:
        blocks = NullBlockStore()
        recent = settings.readahead_max + 2 * settings.block_size
    stats = Stats()
    reader = Reader(
        store,
        blocks,
        stats,
        block_size=settings.block_size,
        workers=settings.workers,
        readahead_max=settings.readahead_max,
        recent_bytes=recent,
    )
    fs = FileSystem(store, reader, settings)
    control = Control(fs, reader, blocks, stats, settings, source, mountpoint=mountpoint)
    return Mount(
        source,
        mountpoint,
        settings,
        store,
        blocks,
        stats,
        reader,
        fs,
        control,
        FuseOperations(fs, control),
    )


# --- checks before mounting ------------------------------------------------------------------


def lazy_unmount(mountpoint: str) -> None:
    """Detach a mount even if busy or dead (``fusermount3 -uz``, or ``umount -l`` as root)."""
    for cmd in (["fusermount3", "-uz", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(cmd[0]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                return
    raise UserError(f"mount point {mountpoint}: cannot detach the dead mount")


def check_mountpoint(mountpoint: str) -> None:
    """One clear error if the mount point cannot be used; detaches a dead fusefs mount."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise UserError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a daemon died: "Transport endpoint is not connected"
            log.warning("%s is a dead FUSE mount (daemon gone); detaching it", mountpoint)
            lazy_unmount(mountpoint)
            st = os.stat(mountpoint)
        else:
            raise UserError(f"mount point {mountpoint}: {exc.strerror}") from None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise UserError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UserError(f"mount point {mountpoint} is already a mount point")
    try:
        if os.listdir(mountpoint):
            raise UserError(f"mount point {mountpoint} is not empty")
    except PermissionError:
        raise UserError(f"mount point {mountpoint}: permission denied") from None


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UserError(
            "FUSE is unavailable: /dev/fuse is missing (load the fuse module, or give "
            "the container --device /dev/fuse)"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK) and not shutil.which("fusermount3"):
        raise UserError(
            "FUSE is unavailable: /dev/fuse is not accessible and fusermount3 is "
            "missing (install the fuse3 package)"
        )


def check_store(store: ObjectStore) -> None:
    """Fail early, with one line, if the bucket is missing or the credentials are refused."""
    try:
        store.check()
    except FusefsError as exc:
        raise UserError(str(exc)) from None


def fuse_options(m: Mount) -> set[str]:
    s = m.settings
    fsname = m.source.replace(",", "_").replace(" ", "_")
    opts = {f"fsname={fsname}", "subtype=fusefs", "default_permissions", "noatime"}
    if s.allow_other:
        opts.add("allow_other")
    opts.update(m.extra_fuse_options)
    return opts


# --- logging ---------------------------------------------------------------------------------


def setup_logging(settings: Settings, *, daemon: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if settings.log_file:
        handler = logging.handlers.WatchedFileHandler(settings.log_file)
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(
            logging.Formatter("fusefs[%(process)d]: %(levelname)s %(name)s: %(message)s")
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "google", "s3transfer", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


# --- running ---------------------------------------------------------------------------------


async def _serve(m: Mount, ready: Any) -> None:
    """Run the FUSE loop until unmounted or signalled."""

    async def readiness() -> None:
        await trio.to_thread.run_sync(os.stat, m.mountpoint)  # the mount answers
        log.info("mounted %s on %s", m.source, m.mountpoint)
        ready(None)

    async def signals(cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
            async for sig in it:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP: reopening the log file")
                    setup_logging(m.settings, daemon=True)
                    continue
                log.info("%s: unmounting", signal.Signals(sig).name)
                notify.send("STOPPING=1")
                cancel.cancel()
                return

    async with trio.open_nursery() as nursery:
        m.reader.start(nursery)
        nursery.start_soon(signals, nursery.cancel_scope)
        nursery.start_soon(readiness)
        await pyfuse3.main(min_tasks=4, max_tasks=max(32, 4 * m.settings.workers))
        nursery.cancel_scope.cancel()


def run(m: Mount, ready: Any) -> None:
    """Mount, serve until unmounted or signalled, clean up. ``ready(err)`` reports readiness."""
    raise_fd_limit()
    log.info("fusefs %s -> %s: %s", m.source, m.mountpoint, m.settings.describe())
    try:
        pyfuse3.init(m.ops, m.mountpoint, fuse_options(m))
    except RuntimeError as exc:
        raise UserError(
            f"cannot mount on {m.mountpoint}: {exc} (is FUSE available, and "
            "user_allow_other set in /etc/fuse.conf for --allow-other?)"
        ) from None
    unmounted_cleanly = False
    try:
        trio.run(_serve, m, ready)
        unmounted_cleanly = True
    finally:
        pyfuse3.close(unmount=True)
        m.blocks.close()
        log.info(
            "unmounted %s (%s cached)",
            m.mountpoint,
            human_size(m.blocks.volume()) if unmounted_cleanly else "?",
        )


def daemonize_and_run(m_factory: Any, foreground: bool) -> int:
    """Fork into the background (unless foreground); return once the mount answers."""
    if foreground:

        def ready_fg(err: str | None) -> None:
            if err is None:
                notify.send("READY=1")

        run(m_factory(daemon=False), ready_fg)
        return 0
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg == "ok":
            return 0
        print(
            f"fusefs: {msg or 'the mount daemon exited before the mount was ready'}",
            file=sys.stderr,
        )
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return 1
    # child: detach from the terminal, keep running
    os.close(rfd)
    os.setsid()
    code = 0
    reported = False

    def ready(err: str | None) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(wfd, b"ok" if err is None else err.encode())
            os.close(wfd)
            notify.send("READY=1")

    try:
        m = m_factory(daemon=True)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        run(m, ready)
    except UserError as exc:
        ready(str(exc))
        code = 1
    except BaseException as exc:  # noqa: BLE001 - the daemon must report, never hang the parent
        log.exception("mount daemon failed")
        ready(f"mount failed: {exc}")
        code = 1
    finally:
        if not reported:
            ready("the mount daemon stopped before the mount was ready")
    os._exit(code)
