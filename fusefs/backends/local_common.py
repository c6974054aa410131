"""What :mod:`.local` (reads) and :mod:`.local_write` (writes) share: how paths are opened
(never through a link: ``O_NOFOLLOW`` at every step) and how an ``OSError`` becomes a fusefs
error. Imports go one way: store -> write -> common.
"""

from __future__ import annotations

import errno
import os

from ..errors import AccessDenied, BackendError, FusefsError, NoSpace, NotFound

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a file)
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# a link met while walking (ELOOP), or a file where a folder was expected: no such key
ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
# a file system without hard links
NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)
#: Files being written are named so, in their destination folder; listings skip them.
TMP_PREFIX = ".fusefs-tmp-"


def exists_at(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def map_os_error(exc: OSError, what: str) -> FusefsError:
    if exc.errno in ABSENT:
        return NotFound(f"{what}: not found", cause=exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {exc.strerror}", cause=exc)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: permission denied", cause=exc)
    return BackendError(f"{what}: {exc.strerror or exc}", cause=exc)
