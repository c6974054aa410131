"""What kind of file an object is: a regular file, or (its ``mode`` metadata says so, as
s3fs-fuse writes it) a symbolic link, FIFO, socket or device node. No pyfuse3, no I/O here.

A link is an object whose ``mode`` metadata has ``S_IFLNK`` and whose content is the target
(s3fs's convention). S3 listings carry no metadata, so there a listed object that could be a
link (at most ``link_probe_size`` bytes: a target is shorter than PATH_MAX) and whose
metadata this mount does not know is HEADed once per version before it is shown
(:meth:`fusefs.folders.Folders.typed`); GCS, Azure and local listings tell without a request.
"""

from __future__ import annotations

import stat

from .backends.attrs import SPECIAL_TYPES
from .backends.base import ObjectInfo

#: Longest link target, in bytes (Linux's PATH_MAX less the final NUL).
LINK_MAX = 4095


def file_type(info: ObjectInfo | None) -> int:
    """``S_IFDIR`` for a folder (no info), the special type its ``mode`` names, else
    ``S_IFREG``."""
    if info is None:
        return stat.S_IFDIR
    kind = stat.S_IFMT(info.mode or 0)
    return kind if kind in SPECIAL_TYPES else stat.S_IFREG


def is_link(info: ObjectInfo | None) -> bool:
    return file_type(info) == stat.S_IFLNK


def may_be_special(info: ObjectInfo, probe_size: int) -> bool:
    """Could a listed object without metadata be a link or special file (small enough)?"""
    return info.mode is None and info.meta_mtime is None and info.size <= probe_size
