"""Checks before mounting, each failing with one clear line (:class:`UserError`): the mount
point (a dead FUSE mount there is detached), FUSE itself, and the store.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
import threading

from .backends import ObjectStore
from .errors import FusefsError, UserError

log = logging.getLogger(__name__)


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
