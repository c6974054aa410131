"""Per-mount kernel tuning through sysfs (needs root; otherwise the defaults stay).

- ``/sys/class/bdi/0:MINOR/read_ahead_kb``: the kernel sends reads of at most this size;
  128 KiB by default. 1 MiB requests halve the per-byte cost of the Python request path.
- ``/sys/fs/fuse/connections/MINOR/max_background`` (and ``congestion_threshold``): how many
  asynchronous (readahead) requests may be in flight; 12 by default. The fusectl filesystem
  that holds them is mounted if it is not already.
"""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)

FUSECTL = "/sys/fs/fuse/connections"


def _write(path: str, value: int) -> bool:
    try:
        with open(path, "w") as f:
            f.write(str(value))
        return True
    except OSError as exc:
        log.debug("cannot set %s=%s: %s", path, value, exc)
        return False


def _ensure_fusectl() -> None:
    if os.path.isdir(FUSECTL) and not os.listdir(FUSECTL) and os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True)
        if r.returncode == 0:
            log.info("mounted fusectl on %s", FUSECTL)


def tune(dev: int, read_ahead_kb: int, max_background: int) -> dict[str, int]:
    """Apply the settings to the FUSE connection of device ``dev``; returns what was applied."""
    minor = os.minor(dev)
    applied: dict[str, int] = {}
    if read_ahead_kb > 0 and _write(f"/sys/class/bdi/0:{minor}/read_ahead_kb", read_ahead_kb):
        applied["read_ahead_kb"] = read_ahead_kb
    if max_background > 0:
        _ensure_fusectl()
        conn = f"{FUSECTL}/{minor}"
        if _write(f"{conn}/max_background", max_background):
            applied["max_background"] = max_background
            _write(f"{conn}/congestion_threshold", max(1, max_background * 3 // 4))
    if applied:
        log.info("kernel tuning: %s", " ".join(f"{k}={v}" for k, v in applied.items()))
    else:
        log.info("kernel tuning not applied (needs root); reads arrive in 128 KiB requests")
    return applied
