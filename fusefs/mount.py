"""Wires a mount together in one place, and runs it: checks, daemon, readiness, signals."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import logging.handlers
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from . import kernel, notify, threads
from . import stats as S
from .backends import ObjectStore, open_store
from .cache.blocks import BlockStore, DiskBlockStore, NullBlockStore
from .config import SETTING_NAMES, Settings, human_size
from .control import Control
from .ctlsocket import ControlSocket, socket_path
from .errors import FusefsError, UserError
from .fs import CONTROL_NAME, FileSystem
from .fuse_ops import FuseOperations
from .reader import Reader
from .safety import SafeFormatter, check_cache_dir
from .stats import Stats
from .workers.pool import FetchPool
from .write.staging import Staging
from .write.writes import Writes

log = logging.getLogger(__name__)

#: Just-fetched blocks kept in memory (32 MiB with the default 8 MiB blocks).
RECENT_BLOCKS = 4

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
    #: The Prometheus endpoint (``--metrics``), serving; None when off.
    metrics: Any = None
    #: Loads the settings again from the same layers (SIGHUP); None: nothing to re-read.
    reload_settings: Callable[[], Settings] | None = None
    #: The write side; None on a read-only mount.
    writes: Writes | None = None
    #: The control socket (read-only mounts: the kernel refuses writes to the control file).
    control_socket: ControlSocket | None = None
    #: The FUSE session was closed (unmounted) already.
    closed: bool = False


def build(
    source: str, mountpoint: str, settings: Settings, store: ObjectStore | None = None
) -> Mount:
    """Construct the store, caches, reader, filesystem and FUSE adapter for one mount.

    With ``--metrics``, the store is wrapped to time its requests, the adapter reports each
    request's duration, and ``/metrics`` is served from here on (UserError if it cannot be).
    """
    if settings.cache_enabled or not settings.read_only:
        check_cache_dir(settings.cache_dir)  # never trust what another user prepared there
    explicit_store = store is not None
    store = store or open_store(source, settings)
    metrics = None
    if settings.metrics:
        from .metrics import InstrumentedStore, Metrics

        metrics = Metrics(source)
        store = InstrumentedStore(store, metrics)
    blocks: BlockStore
    stats = Stats()
    if settings.cache_enabled:
        blocks = DiskBlockStore(settings.cache_dir, settings.cache_size,
                                on_corrupt=lambda: stats.add(S.CORRUPT_BLOCKS))
        # just-fetched blocks stay in memory a little: a sequential reader consumes each in
        # several requests, served without reading the block back from its cache file
        recent = RECENT_BLOCKS * settings.block_size
    else:
        blocks = NullBlockStore()
        recent = settings.readahead_max + 2 * settings.block_size
    pool = None
    if settings.fetch_workers > 0 and not explicit_store:
        # the workers build their own store from the source and settings: not for a store
        # handed in (tests, tools), which they could not rebuild
        pool = FetchPool(source, settings, settings.fetch_workers,
                         on_corrupt=lambda n: stats.add(S.CORRUPT_BLOCKS, n))
    reader = Reader(
        store,
        blocks,
        stats,
        block_size=settings.block_size,
        workers=settings.workers,
        readahead_max=settings.readahead_max,
        recent_bytes=recent,
        pool=pool,
    )
    fs = FileSystem(store, reader, settings)
    writes = None
    if not settings.read_only:
        try:
            staging = Staging(settings.cache_dir, store.source_id)
        except OSError as exc:
            raise UserError(f"cannot use {settings.cache_dir} for staging writes: "
                            f"{exc.strerror} (mount with --read-only to only read)") from None
        writes = Writes(fs, store, settings, staging, CONTROL_NAME)
    control = Control(fs, reader, blocks, stats, settings, source, mountpoint=mountpoint)
    ctl_socket = None
    if settings.read_only:
        ctl_socket = ControlSocket(control, socket_path(settings.cache_dir, mountpoint))
        ctl_socket.bind()
        control.socket_path = ctl_socket.path
    ops = FuseOperations(fs, control)
    if metrics is not None and settings.metrics:
        metrics.add_stats(control.stats_dict)
        ops.observe = metrics.observe_fuse
        metrics.serve(settings.metrics)
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
        ops,
        metrics=metrics,
        writes=writes,
        control_socket=ctl_socket,
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


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda mo: chr(int(mo.group(1), 8)), field)


def mounted_fstype(path: str) -> str | None:
    """The type of the filesystem mounted exactly at ``path`` (the top one), or None."""
    real = os.path.realpath(path)
    fstype = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == real and right:
                    fstype = right.split()[0]
    except OSError:
        return None
    return fstype


#: Seconds a FUSE mount already at the mount point gets to answer ``statfs``.
PROBE_TIMEOUT = 5.0


def _probe(mountpoint: str) -> int | None:
    """``statfs`` the FUSE mount at ``mountpoint`` (always a request to its daemon, never
    answered from the kernel's attribute cache): 0 if it answers, its errno (ENOTCONN: the
    daemon is gone), or None if it hangs."""
    result: dict[str, int] = {}

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            result["errno"] = 0
        except OSError as exc:
            result["errno"] = exc.errno or errno.EIO

    t = threading.Thread(target=probe, name="fusefs-probe", daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT)
    return result.get("errno")


def check_mountpoint(mountpoint: str, _depth: int = 0) -> None:
    """One clear error if the mount point cannot be used; detaches a dead FUSE mount.

    A dead FUSE mount (its daemon was killed: "Transport endpoint is not connected") is
    detached lazily. A live FUSE mount there is refused (no accidental double mount). Other
    mounts are fine if empty: in a container the mount point is often a volume (a bind
    mount). An autofs mount point (``x-systemd.automount`` in fstab) is accepted as it is:
    systemd asks for the real mount to go on top of it, and listing it would trigger it again.
    """
    st: os.stat_result | None
    try:
        st = os.stat(mountpoint)  # stat(2) never triggers an automount
    except FileNotFoundError:
        raise UserError(f"mount point {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UserError(f"mount point {mountpoint}: {exc.strerror}") from None
        st = None
    fstype = mounted_fstype(mountpoint)
    is_fuse = fstype is not None and (fstype == "fuse" or fstype.startswith("fuse."))
    if st is None or is_fuse:
        # a dead mount may still stat fine from the kernel's cache: ask its daemon
        state = errno.ENOTCONN if st is None else _probe(mountpoint)
        if state == errno.ENOTCONN and _depth < 4:
            log.warning("%s is a dead FUSE mount (daemon gone); detaching it", mountpoint)
            lazy_unmount(mountpoint)
            return check_mountpoint(mountpoint, _depth + 1)
        if state == 0:
            raise UserError(f"mount point {mountpoint} is already mounted ({fstype})")
        if state is None:
            raise UserError(
                f"mount point {mountpoint} is a FUSE mount that does not answer "
                f"(detach it: fusermount3 -uz {mountpoint})"
            )
        raise UserError(f"mount point {mountpoint}: {os.strerror(state)}")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"mount point {mountpoint} is not a directory")
    if fstype == "autofs":
        log.info("%s is an automount point; mounting over it", mountpoint)
        return
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
    if s.read_only:
        # The kernel side is ``ro`` too: it then never invalidates atime after a read, so a
        # cached file costs no GETATTR. It refuses writes to the control file as well: commands
        # come through the control socket (fusefs/ctlsocket.py).
        opts.add("ro")
    opts.update(o for o in m.extra_fuse_options if o != "ro")
    return opts


# --- logging ---------------------------------------------------------------------------------

#: syslog priorities, for journald's ``<N>`` line prefix
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(SafeFormatter):
    """``<6>INFO fusefs.mount: ...``: journald reads the priority and adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (``$JOURNAL_STREAM`` is dev:inode)."""
    js = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


#: How the log was last set up, so that SIGHUP reopens it the same way.
_log_daemon = False


def _log_handler(settings: Settings, daemon: bool) -> logging.Handler:
    handler: logging.Handler
    if settings.log_file:
        try:
            handler = logging.handlers.WatchedFileHandler(settings.log_file)
        except OSError as exc:
            raise UserError(f"cannot open log file {settings.log_file}: {exc.strerror}") from None
        handler.setFormatter(SafeFormatter(LOG_FORMAT))
    elif daemon and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(
            SafeFormatter("fusefs[%(process)d]: %(levelname)s %(name)s: %(message)s")
        )
    elif not daemon and _stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter(LOG_FORMAT))
    return handler


def setup_logging(settings: Settings, *, daemon: bool) -> None:
    """One line per event with level and time: to ``--log-file``, the journal (a systemd
    service's stderr), syslog (daemonized), or stderr. Raises UserError if the file can't open.
    """
    global _log_daemon
    handler = _log_handler(settings, daemon)  # first, so a failure keeps the old handlers
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for noisy in ("botocore", "boto3", "urllib3", "google", "s3transfer", "pyfuse3", "azure"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    _log_daemon = daemon


def reopen_logging(settings: Settings) -> None:
    """Reopen the log (SIGHUP, after logrotate) the way it was set up, with ``settings``."""
    setup_logging(settings, daemon=_log_daemon)


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

#: Seconds the requests in flight at SIGTERM/SIGINT get to finish before they are cancelled.
SHUTDOWN_GRACE = 2.0
#: Seconds between ``STATUS=`` lines to systemd; ``$FUSEFS_STATUS_INTERVAL`` overrides (tests).
STATUS_INTERVAL = 30.0
#: What SIGHUP applies to a running mount; every other setting needs a remount.
RELOADABLE = ("log_level", "log_file", "metadata_ttl", "negative_ttl")
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _status_interval() -> float:
    try:
        return max(0.05, float(os.environ.get("FUSEFS_STATUS_INTERVAL", STATUS_INTERVAL)))
    except ValueError:
        return STATUS_INTERVAL


def status_text(m: Mount) -> str:
    """One line of cache figures for systemd's ``STATUS=`` (blocking: asks diskcache)."""
    c = m.stats.snapshot()
    lookups = c[S.HITS] + c[S.MISSES]
    if m.settings.cache_enabled:
        cache = (
            f"cache {human_size(m.blocks.volume())} of {human_size(m.settings.cache_size)} "
            f"({m.blocks.count()} blocks)"
        )
    else:
        cache = "cache off"
    ratio = f"{c[S.HITS] / lookups:.0%}" if lookups else "-"
    return (
        f"{m.source} on {m.mountpoint}: {cache}, hit ratio {ratio}, "
        f"{human_size(c[S.BYTES_SERVED])} served, {c[S.FETCHES]} fetches, {c[S.ERRORS]} errors"
    )


def safe_status_text(m: Mount) -> str:
    """:func:`status_text`, or a short line if the cache cannot be asked (never raises: the
    status loop runs beside the serving loop, and an error there would end the mount)."""
    try:
        return status_text(m)
    except Exception as exc:  # noqa: BLE001 - e.g. a locked or damaged cache index
        log.warning("status: cannot read cache figures: %s", exc)
        return f"{m.source} on {m.mountpoint}: serving (cache figures unavailable)"


def reload(m: Mount) -> None:
    """SIGHUP: reopen the log file and apply what changed in the config file, if it can be.

    Applied at once: ``RELOADABLE``. Anything else that changed is logged and kept as it was
    until the next mount. A config file that no longer loads leaves everything as it was.
    Credentials are not re-read here: see docs/service.md.
    """
    old = m.settings
    new = old
    if m.reload_settings is not None:
        try:
            new = m.reload_settings()
        except UserError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running settings: %s", exc)
    applied, ignored = [], []
    for name in SETTING_NAMES:
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name in RELOADABLE:
            applied.append(f"{name}={after}")
        else:
            ignored.append(name)
    log_file = old.log_file
    for name in RELOADABLE:  # old is the Settings object every part of the mount holds
        setattr(old, name, getattr(new, name))
    try:
        reopen_logging(old)
    except UserError as exc:
        old.log_file = log_file
        reopen_logging(old)
        log.error("SIGHUP: %s; still logging to %s", exc, log_file or "the previous log")
    m.fs.set_ttls(old.metadata_ttl, old.negative_ttl)
    log.info(
        "SIGHUP: log reopened; %s",
        "applied " + " ".join(applied) if applied else "no run-time setting changed",
    )
    if ignored:
        log.warning(
            "SIGHUP: changed in the config file, takes effect at the next mount: %s",
            ", ".join(ignored),
        )


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
            interval = _status_interval()
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
