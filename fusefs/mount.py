"""Runs a mount: FUSE session, serving loop, signals, readiness, daemon, unmount.

The parts: :mod:`fusefs.mount_build` builds a :class:`Mount` from the settings,
:mod:`fusefs.mount_checks` checks the mount point, FUSE and the store first,
:mod:`fusefs.mount_service` sets up the log, the status line and SIGHUP's reload. This module
re-exports what the CLI and tools use of them, so ``fusefs.mount`` stays the one entry point.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import sys
import threading
from typing import Any

import pyfuse3
import trio

from . import kernel, notify, threads
from .config import human_size
from .errors import UserError
from .mount_build import Mount, build
from .mount_checks import (
    check_fuse,
    check_mountpoint,
    check_store,
    lazy_unmount,
    mounted_fstype,
)
from .mount_service import (
    reload,
    reopen_logging,
    safe_status_text,
    setup_logging,
    status_interval,
    status_text,
)

__all__ = [
    "Mount",
    "build",
    "check_fuse",
    "check_mountpoint",
    "check_store",
    "daemonize_and_run",
    "lazy_unmount",
    "mounted_fstype",
    "reload",
    "reopen_logging",
    "run",
    "safe_status_text",
    "setup_logging",
    "status_text",
]

log = logging.getLogger(__name__)

#: Seconds the requests in flight at SIGTERM/SIGINT get to finish before they are cancelled.
SHUTDOWN_GRACE = 2.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fuse_options(m: Mount) -> set[str]:
    s = m.settings
    fsname = m.source.replace(",", "_").replace(" ", "_")
    opts = {f"fsname={fsname}", "subtype=fusefs", "default_permissions", "noatime"}
    if s.allow_other:
        opts.add("allow_other")
    if s.read_only:
        # The kernel side is ``ro`` too: it then never invalidates atime after a read, so a
        # cached file costs no GETATTR. It refuses writes to the control file as well: commands
        # come through the control socket (fusefs/ctlsocket.py).
        opts.add("ro")
    opts.update(o for o in m.extra_fuse_options if o != "ro")
    return opts


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def bound_malloc() -> None:
    """Keep the daemon's memory bounded without paying a page fault per 4 KiB.

    By default glibc gives each thread its own arena (up to 8 per core) and raises its mmap
    threshold as big buffers come and go, so block buffers (MiBs each) spread over many arenas
    that are never given back: peak RSS on a cold 768 MiB read was 260 MiB. Two arenas bound
    that. Keeping the mmap threshold fixed at glibc's maximum (32 MiB) lets block and reply
    buffers be reused from the heap instead of being fresh mappings (a 1 MiB threshold cost
    ~400k page faults per cold GiB and a quarter of the warm throughput). Measured: peak
    ~180 MiB, 125k faults, cold 1.0-1.3 GB/s on that read. glibc only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_arena_max, 2)


# --- running ---------------------------------------------------------------------------------


async def _serve(m: Mount, ready: Any, pending: list[int], daemon: bool) -> None:
    """Serve until unmounted or signalled.

    SIGTERM/SIGINT: no new request is read from the kernel; requests in flight get
    ``SHUTDOWN_GRACE`` seconds, then are cancelled (their worker threads are abandoned, never
    waited for); :func:`run` then closes the FUSE connection and unmounts. A second signal
    cancels at once. SIGHUP: :func:`reload`. ``pending`` holds signals that arrived before
    this loop could take them.
    """
    stopping = False
    grace_scope = trio.CancelScope()

    async with trio.open_nursery() as nursery:

        async def grace() -> None:
            with grace_scope:
                await trio.sleep(SHUTDOWN_GRACE)  # cancelled if main() returns first
                log.info("requests still in flight after %.0f s: cancelling them",
                         SHUTDOWN_GRACE)
                nursery.cancel_scope.cancel()

        def on_signal(sig: int) -> None:
            nonlocal stopping
            name = signal.Signals(sig).name
            if sig == signal.SIGHUP:
                reload(m)
            elif stopping:
                log.info("%s again: cancelling requests in flight now", name)
                nursery.cancel_scope.cancel()
            else:
                stopping = True
                log.info("%s: stopping, then unmounting %s", name, m.mountpoint)
                notify.send("STOPPING=1", f"STATUS=Stopping: unmounting {m.mountpoint}")
                pyfuse3.terminate()  # read no more requests; main() returns once idle
                nursery.start_soon(grace)

        async def signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(*_SIGNALS) as it:
                task_status.started()
                while pending:
                    on_signal(pending.pop(0))
                async for sig in it:
                    on_signal(sig)

        async def readiness() -> None:
            try:  # the mount answers
                st = await threads.run_sync(os.stat, m.mountpoint)
            except OSError as exc:
                ready(f"the mount does not answer: {exc.strerror}")
                nursery.cancel_scope.cancel()
                return
            try:
                kernel.tune(st.st_dev, m.settings.read_ahead_kb, m.settings.max_background)
            except Exception as exc:  # noqa: BLE001 - tuning is optional, serving is not
                log.warning("kernel tuning failed: %s", exc)
            log.info("mounted %s on %s", m.source, m.mountpoint)
            status = await threads.run_sync(safe_status_text, m)
            ready(None)
            notify.send("READY=1", f"STATUS={status}", *([f"MAINPID={os.getpid()}"] * daemon))
            interval = status_interval()
            while notify.enabled():
                await trio.sleep(interval)
                notify.send(f"STATUS={await threads.run_sync(safe_status_text, m)}")

        async def watchdog(interval: float) -> None:
            while True:
                notify.send("WATCHDOG=1")
                await trio.sleep(interval)

        m.stats.loop_thread = threading.get_ident()  # its CPU time is shown in the stats
        m.reader.start(nursery)
        if m.writes is not None:
            m.writes.start(nursery)
        if m.control_socket is not None:
            await nursery.start(m.control_socket.serve)
        await nursery.start(signals)
        nursery.start_soon(readiness)
        if (wd := notify.watchdog_interval()) is not None:
            nursery.start_soon(watchdog, wd)
        await pyfuse3.main(min_tasks=4, max_tasks=max(32, 4 * m.settings.workers))
        grace_scope.cancel()
        if not stopping:
            log.info("%s was unmounted", m.mountpoint)
            notify.send("STOPPING=1")
        if m.writes is not None and m.writes.uploads.pending:
            # detach first: programs must not hang on a mount that answers nothing
            pyfuse3.close(unmount=True)
            m.closed = True
            log.info("waiting up to %.0f s for %d pending upload(s)", m.settings.upload_grace,
                     m.writes.uploads.pending)
            await m.writes.uploads.drain(m.settings.upload_grace)
        if m.writes is not None and m.writes.deletes.entries:
            with trio.move_on_after(m.settings.upload_grace):
                await m.writes.deletes.wait_idle()  # what is left stays journaled
        nursery.cancel_scope.cancel()


def run(m: Mount, ready: Any, *, daemon: bool = False) -> None:
    """Mount, serve until unmounted or signalled, clean up. ``ready(err)`` reports readiness.

    However serving ends, the FUSE connection is closed (a request still waiting fails with
    ECONNABORTED instead of hanging), the mount is detached, and the block cache's bookkeeping
    is written and the cache closed.
    """
    raise_fd_limit()
    bound_malloc()
    pending: list[int] = []
    # until trio takes them (and after it lets go): remember, never die with the mount up
    previous = {sig: signal.signal(sig, lambda s, _f: pending.append(s)) for sig in _SIGNALS}
    try:
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
            trio.run(_serve, m, ready, pending, daemon)
            unmounted_cleanly = True
        finally:
            if not m.closed:
                pyfuse3.close(unmount=True)
            if m.reader.pool is not None:
                m.reader.pool.close()  # no worker process outlives the mount
            if m.metrics is not None:
                m.metrics.close()
            if m.writes is not None:
                m.fs.folders.attrs.save()
                m.writes.staging.close()
            m.blocks.close()
            log.info(
                "unmounted %s (%s cached)",
                m.mountpoint,
                human_size(m.blocks.volume()) if unmounted_cleanly else "?",
            )
    finally:
        if m.control_socket is not None:
            m.control_socket.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def daemonize_and_run(m_factory: Any, foreground: bool) -> int:
    """Fork into the background (unless foreground); return once the mount answers."""
    if foreground:
        failed: list[str] = []

        def ready_fg(err: str | None) -> None:
            if err is not None:
                failed.append(err)

        run(m_factory(daemon=False), ready_fg)
        if failed:
            print(f"fusefs: {failed[0]}", file=sys.stderr)
            return 1
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

    try:
        m = m_factory(daemon=True)
        os.chdir("/")  # never keep the caller's directory busy
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        run(m, ready, daemon=True)
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
    logging.shutdown()
    os._exit(code)
