"""A mount as a service: its log (file, journal, syslog or stderr; reopened on SIGHUP), the
one-line status systemd shows, and what SIGHUP reloads (:func:`reload`).

The signals themselves are taken in :mod:`fusefs.mount`'s serving loop, which calls these.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from . import stats as S
from .config import SETTING_NAMES, Settings, human_size
from .errors import UserError
from .mount_build import Mount
from .safety import SafeFormatter

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Seconds between ``STATUS=`` lines to systemd; ``$FUSEFS_STATUS_INTERVAL`` overrides (tests).
STATUS_INTERVAL = 30.0
#: What SIGHUP applies to a running mount; every other setting needs a remount.
RELOADABLE = ("log_level", "log_file", "metadata_ttl", "negative_ttl")

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


# --- status and reload -----------------------------------------------------------------------


def status_interval() -> float:
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
