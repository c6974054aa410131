"""What a local file is as an object (its info, version, metadata attributes), which links
may be shown (:func:`inside`), and copying byte ranges between descriptors: the pure helpers
of :mod:`.local`."""

from __future__ import annotations

import errno
import math
import os
import stat

from ..errors import BackendError
from .base import Attrs, ObjectInfo

# types other than files and folders that a listing shows (never opened: see _open_file)
SHOWN = (stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def version_of(st: os.stat_result) -> str:
    """Changes whenever the file's bytes may have: a rewrite in place that keeps size and mtime
    (``rsync --inplace -t``) still moves the ctime."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}-{st.st_ctime_ns:x}"


def info_of(key: str, st: os.stat_result) -> ObjectInfo:
    """A file's info; its metadata attributes are its own mtime (int / int: rounded once) and
    permission bits, with the type of a link, FIFO or socket (a link's size is its target's
    length; a folder, for a ``dir/`` marker, and a FIFO have size 0)."""
    kind = stat.S_IFMT(st.st_mode)
    size = st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else 0
    mode = (stat.S_IFLNK | 0o777 if kind == stat.S_IFLNK else
            stat.S_IFDIR | stat.S_IMODE(st.st_mode) & 0o1777 if kind == stat.S_IFDIR else
            stat.S_IMODE(st.st_mode) & 0o777 | (kind if kind in SHOWN else 0))
    # an owner other than the mounting user's is the file's own (theirs: the mount's default)
    uid = st.st_uid if st.st_uid != os.geteuid() else None
    gid = st.st_gid if st.st_gid != os.getegid() else None
    return ObjectInfo(key, size, st.st_mtime, version_of(st), st.st_mtime_ns / 10**9, mode,
                      None, uid, gid,
                      st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None)


def folder_attrs(fd: int, attrs: Attrs | None) -> None:
    """A directory's owner, mode (sticky kept, never setuid/setgid) and mtime, as ``attrs``
    name them (``fd``: the directory)."""
    chown_fd(fd, attrs)
    if attrs is None:
        return
    if attrs.mode is not None:
        os.fchmod(fd, attrs.mode & 0o1777)
    if attrs.mtime is not None:
        os.utime(fd, ns=(os.fstat(fd).st_atime_ns, ns(attrs.mtime)))


def chown_fd(fd: int, attrs: Attrs | None) -> None:
    """The owner and group ``attrs`` name, if any (the kernel refuses unless root)."""
    if attrs is not None and (attrs.uid is not None or attrs.gid is not None):
        os.fchown(fd, -1 if attrs.uid is None else attrs.uid,
                  -1 if attrs.gid is None else attrs.gid)


def inside(key: str, target: str) -> bool:
    """May a link at ``key`` with ``target`` be shown (or made)? Only a relative target whose
    ``..`` all come first and climb no higher than the source's root: then every link it
    passes through on its way is inside too, so it cannot lead out of the mount."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    parts = [p for p in target.split("/") if p and p != "."]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ".." not in parts[ups:] and ups <= key.count("/")


def ns(seconds: float) -> int:
    """Epoch seconds as nanoseconds, without the float product's rounding (1e18 > 2**53)."""
    whole = math.floor(seconds)
    return whole * 1_000_000_000 + round((seconds - whole) * 1e9)


def copy_range(src: int, dst: int, start: int, end: int, what: str) -> None:
    """Bytes ``[start, end)`` of ``src`` to the same offsets of ``dst``, in the kernel where
    it can (``copy_file_range``), else through a 1 MiB buffer."""
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, min(end - pos, 1 << 30), pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = -1
        if n < 0:
            data = os.pread(src, min(end - pos, 1 << 20), pos)
            n = len(data) and os.pwrite(dst, data, pos)
        if n == 0:
            raise BackendError(f"{what}: source shorter than expected")
        pos += n
