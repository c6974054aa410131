"""systemd's notify protocol: one datagram to ``$NOTIFY_SOCKET`` (no extra packages)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def send(*lines: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``, ``STATUS=...`` lines; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", addr, exc)
        return False
