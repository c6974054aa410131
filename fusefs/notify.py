"""systemd's notify protocol: one datagram to ``$NOTIFY_SOCKET`` (no extra packages).

The daemon sends ``READY=1`` once the mount answers, ``STATUS=...`` lines with cache figures,
``WATCHDOG=1`` pings when the unit sets ``WatchdogSec=``, and ``STOPPING=1`` on shutdown.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

_warned = False


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def send(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...`` lines; False when not under systemd."""
    global _warned
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    # one line per field: a newline inside a value would start a new (bogus) field
    payload = "\n".join(line.replace("\n", " ") for line in lines)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(payload.encode())
        return True
    except OSError as exc:
        if not _warned:  # STATUS= is sent every 30 s: say it once
            _warned = True
            log.warning("could not notify systemd at %s: %s", addr.lstrip("\0"), exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        n = int(usec)
    except ValueError:
        return None
    return n / 2e6 if n > 0 else None
