"""A local directory served as a bucket: files are objects, sub-directories are prefixes.

Symbolic links are never followed, wherever they point (like rclone's default): a listing
leaves them out (one warning per store, then debug lines), and a key whose path crosses a link
is not found. Every path is opened one component at a time, relative to an open descriptor of
the parent, with ``O_NOFOLLOW`` (``O_DIRECTORY`` for folders), so a link swapped in between a
check and an open is refused by the kernel: there is no check-then-open window. The root
directory itself is resolved once, at start (it is what the user named).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence

from ..errors import AccessDenied, BackendError, FusefsError, NotFound, StaleVersion
from .base import ListPage, ObjectInfo

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a file)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# a link met while walking (ELOOP), or a file where a folder was expected: no such key
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def _version(st: os.stat_result) -> str:
    """Changes whenever the file's bytes may have: a rewrite in place that keeps size and mtime
    (``rsync --inplace -t``) still moves the ctime."""
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}-{st.st_ctime_ns:x}"


def _map_os_error(exc: OSError, what: str) -> FusefsError:
    if exc.errno in _ABSENT:
        return NotFound(f"{what}: not found", cause=exc)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: permission denied", cause=exc)
    return BackendError(f"{what}: {exc.strerror or exc}", cause=exc)


class LocalStore:
    """Objects in ``root``; a key ``a/b.txt`` is the file ``root/a/b.txt`` (never via a link)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.source_id = f"file://{self.root}"
        self._warned = False
        self._lock = threading.Lock()

    @staticmethod
    def _parts(key: str) -> list[str]:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise NotFound(f"{key}: invalid key")
        return parts

    def _open_dir(self, parts: Sequence[str], *, create: bool = False) -> int:
        """A descriptor of the folder ``root/parts...``, reached without following any link
        (``create``: making missing folders on the way)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, key: str) -> int:
        """A descriptor of the regular file at ``key``; NotFound for links, folders, devices."""
        parts = self._parts(key)
        if not parts or key.endswith("/"):
            raise NotFound(f"{key}: not a file")
        try:
            parent = self._open_dir(parts[:-1])
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotFound(f"{key}: not a file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _skipped_links(self, prefix: str, names: list[str]) -> None:
        with self._lock:
            first, self._warned = not self._warned, True
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "skipped %d symbolic link(s) under %s/%s, e.g. %r (links are never "
                "followed; further skips are logged at debug level)",
                len(names), self.root, prefix, names[0])

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise AccessDenied(f"directory {self.root} is not readable")

    def head(self, key: str) -> ObjectInfo:
        fd = self._open_file(key)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        """One page in key order (a file ``a`` is key ``a``, a directory ``a`` is ``a/``);
        symbolic links are skipped (see :meth:`_skipped_links`)."""
        items: list[tuple[str, os.DirEntry[str]]] = []
        links: list[str] = []
        try:
            fd = self._open_dir(self._parts(prefix))
        except OSError as exc:
            if exc.errno in _ABSENT:
                return  # an absent prefix lists as empty, as on S3
            raise _map_os_error(exc, prefix or "/") from exc
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        if entry.is_symlink():
                            links.append(entry.name)
                            continue
                        key = prefix + entry.name + (
                            "/" if entry.is_dir(follow_symlinks=False) else "")
                    except OSError:
                        continue  # vanished or unreadable entry: skip it
                    if key > start_after:
                        items.append((key, entry))
            items.sort(key=lambda kv: kv[0])
            page = ListPage()
            for i, (key, entry) in enumerate(items):
                if max_keys and len(page.objects) + len(page.prefixes) >= max_keys:
                    page.more = i < len(items)
                    break
                try:
                    if key.endswith("/"):
                        page.prefixes.append(key)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)  # fstatat on the open folder
                        page.objects.append(
                            ObjectInfo(key, st.st_size, st.st_mtime, _version(st)))
                except OSError:
                    continue  # vanished or unreadable entry: skip it
        except OSError as exc:
            raise _map_os_error(exc, prefix or "/") from exc
        finally:
            os.close(fd)
        if links:
            self._skipped_links(prefix, links)
        yield page

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        fd = self._open_file(key)
        try:
            if _version(os.fstat(fd)) != version:
                raise StaleVersion(f"{key}: changed since it was listed")
            return os.pread(fd, length, start) if length > 0 else b""
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        finally:
            os.close(fd)

    # --- writes (``fusefs check``'s probe) ------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Write the file atomically (a temporary name, then a rename), parent folders as
        needed, never through a symbolic link; never creates the root directory itself."""
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        parts = self._parts(key)
        if not parts or key.endswith("/"):
            raise NotFound(f"{key}: not a file name")
        name, tmp = parts[-1], f".{parts[-1]}.fusefs-tmp-{os.getpid()}"
        try:
            dfd = self._open_dir(parts[:-1], create=True)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666, dir_fd=dfd)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise _map_os_error(exc, key) from exc
        finally:
            os.close(dfd)
        return ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def delete(self, key: str) -> None:
        parts = self._parts(key)
        if not parts:
            return
        try:
            dfd = self._open_dir(parts[:-1])
        except OSError as exc:
            if exc.errno in _ABSENT:
                return  # already absent
            raise _map_os_error(exc, key) from exc
        try:
            os.unlink(parts[-1], dir_fd=dfd)
        except FileNotFoundError:
            return  # already absent
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        finally:
            os.close(dfd)
