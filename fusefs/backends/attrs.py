"""File attributes (``mtime``, ``mode``) in object metadata: the one place that names and
parses them, for every store.

Written as rclone does: ``mtime`` as float epoch seconds (``1700000000.123456789``), ``mode``
as octal with a leading 0 and the file type (``0100644``). Read back from any of the forms
peers write: rclone's; s3fs's decimal ``mode`` (``33188``) and integer ``mtime``; gcsfuse's
``gcsfuse_mtime`` (RFC 3339); gsutil's ``goog-reserved-file-mtime`` (integer seconds) and
``goog-reserved-posix-mode`` (octal, no leading 0). A value that does not parse, or is out of
range, is ignored (None): metadata is other people's input, never an error.

On S3 these are user metadata (``x-amz-meta-mtime``); boto3 and the GCS and Azure SDKs give
them without the prefix, so the names here are the bare ones.
"""

from __future__ import annotations

import math
import stat
from collections.abc import Mapping
from datetime import datetime

from .base import Attrs

MTIME = "mtime"
MODE = "mode"
#: s3fs's owner and group (decimal ids)
UID = "uid"
GID = "gid"
#: s3fs's device number of a device node (decimal)
RDEV = "rdev"
#: fusefs's own: a token unique to one upload (tells a landed upload from another writer's)
TOKEN = "fusefs_upload"  # a C# identifier: Azure allows no "-"
GCSFUSE_MTIME = "gcsfuse_mtime"
GSUTIL_MTIME = "goog-reserved-file-mtime"
GSUTIL_MODE = "goog-reserved-posix-mode"

#: File types other than a regular file's that an object's ``mode`` may name (as s3fs does):
#: a symbolic link (its target is the object's content), a FIFO, a socket, a device node.
SPECIAL_TYPES = frozenset({stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                           stat.S_IFBLK})

#: Names this module reads (lower case); a store replacing attributes drops all of them, so an
#: old peer's value cannot outlive a new one.
ATTR_KEYS = frozenset({MTIME, MODE, GCSFUSE_MTIME, GSUTIL_MTIME, GSUTIL_MODE, UID, GID,
                       RDEV})

# Times outside year 1..9999 are garbage (and datetime cannot hold them).
_MIN_TIME, _MAX_TIME = -62135596800.0, 253402300799.0


def encode(attrs: Attrs | None) -> dict[str, str]:
    """The metadata entries for ``attrs`` (only the fields that are set)."""
    out: dict[str, str] = {}
    if attrs is None:
        return out
    if attrs.mtime is not None:
        out[MTIME] = f"{attrs.mtime:.9f}".rstrip("0").rstrip(".")
    if attrs.mode is not None:  # never setuid/gid; a link, FIFO... keeps its type
        out[MODE] = "0%o" % ((stat.S_IFMT(attrs.mode) or stat.S_IFREG) | (attrs.mode & _bits(
            attrs.mode)))
    if attrs.token is not None:
        out[TOKEN] = attrs.token
    if attrs.uid is not None:
        out[UID] = str(attrs.uid)
    if attrs.gid is not None:
        out[GID] = str(attrs.gid)
    if attrs.rdev is not None:
        out[RDEV] = str(attrs.rdev)
    return out


def _bits(mode: int) -> int:
    """Permission bits kept in ``mode``: never setuid or setgid (issue 14); the sticky bit
    of a folder only (``01777``: it restricts who may remove entries, it grants nothing)."""
    return 0o1777 if stat.S_ISDIR(mode) else 0o777


def rdev(meta: Mapping[str, str] | None) -> int | None:
    """A device node's number from its metadata (s3fs's decimal ``rdev``), if any."""
    for k, v in (meta or {}).items():
        if str(k).lower() == RDEV and v is not None and str(v).strip().isdigit():
            n = int(str(v).strip())
            return n if n < 1 << 64 else None
    return None


def owner(meta: Mapping[str, str] | None) -> tuple[int | None, int | None]:
    """``(uid, gid)`` from an object's metadata (s3fs's decimal ``uid``/``gid``); None where
    absent or not an id (at most 2**32-2: -1 means "unchanged" to chown)."""
    out: list[int | None] = [None, None]
    for k, v in (meta or {}).items():
        name = str(k).lower()
        if name in (UID, GID) and v is not None and str(v).strip().isdigit():
            n = int(str(v).strip())
            if n < 0xFFFFFFFF:
                out[name == GID] = n
    return out[0], out[1]


def token(meta: Mapping[str, str] | None) -> str | None:
    """The upload token in an object's metadata (keys in any case), if any."""
    for k, v in (meta or {}).items():
        if str(k).lower() == TOKEN and v is not None:
            return str(v)
    return None


def merged(meta: Mapping[str, str] | None, attrs: Attrs) -> dict[str, str]:
    """``meta`` with the attribute entries replaced by ``attrs``'s (a field left None keeps
    the value already there, in whatever form; a set field drops the peers' forms of it)."""
    out = {k: v for k, v in (meta or {}).items() if str(k).lower() != TOKEN}
    if attrs.mtime is not None:
        for k in list(out):
            if k.lower() in (MTIME, GCSFUSE_MTIME, GSUTIL_MTIME):
                del out[k]
    if attrs.mode is not None:
        for k in list(out):
            if k.lower() in (MODE, GSUTIL_MODE):
                del out[k]
    for name, value in ((UID, attrs.uid), (GID, attrs.gid)):
        if value is not None:
            for k in list(out):
                if k.lower() == name:
                    del out[k]
    out.update(encode(attrs))
    return out


def _time(text: str) -> float | None:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:  # RFC 3339 (gcsfuse): 2024-05-01T12:00:00.123456789Z
            value = _rfc3339(text)
        except ValueError:
            return None
    if not math.isfinite(value) or not _MIN_TIME <= value <= _MAX_TIME:
        return None
    return value


def _rfc3339(text: str) -> float:
    date, sep, frac = text.partition(".")
    nanos = 0.0
    if sep:  # Python parses at most 6 fraction digits: take them apart
        digits = ""
        while frac and frac[0].isdigit():
            digits, frac = digits + frac[0], frac[1:]
        if not digits:
            raise ValueError(text)
        nanos = int(digits) / 10 ** len(digits)
        date += frac
    when = datetime.fromisoformat(date.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(text)
    return when.timestamp() + nanos


def _mode(text: str, *, octal: bool = False) -> int | None:
    text = text.strip()
    if not text.isdigit():
        return None
    try:
        value = int(text, 8) if octal or (text.startswith("0") and len(text) > 1) else int(text)
    except ValueError:  # an 8 or 9 in an octal form
        return None
    if value >= 1 << 32:
        return None
    kind = stat.S_IFMT(value)
    if kind == stat.S_IFDIR:  # a folder marker's: the sticky bit too (it only restricts)
        return stat.S_IFDIR | (value & 0o1777)
    # setuid, setgid and sticky bits are never taken from a bucket; a type other than a
    # regular file's (s3fs's links, FIFOs, sockets, device nodes) is kept with the bits
    return (value & 0o777) | (kind if kind in SPECIAL_TYPES else 0)


def decode(meta: Mapping[str, str] | None) -> tuple[float | None, int | None]:
    """``(mtime, mode)`` from an object's metadata (keys in any case); None where absent or
    unreadable. rclone/s3fs ``mtime`` wins over gcsfuse's, which wins over gsutil's."""
    if not meta:
        return None, None
    low = {str(k).lower(): str(v) for k, v in meta.items() if v is not None}
    mtime: float | None = None
    for key in (MTIME, GCSFUSE_MTIME, GSUTIL_MTIME):
        if key in low:
            mtime = _time(low[key])
            if mtime is not None:
                break
    mode = _mode(low[MODE]) if MODE in low else None
    if mode is None and GSUTIL_MODE in low:
        mode = _mode(low[GSUTIL_MODE], octal=True)
    return mtime, mode
