"""A local directory served as a bucket: files are objects, sub-directories are prefixes.

Symbolic links are never followed, wherever they point (like rclone's default). A link whose
target stays inside the source (:func:`inside`) is an object of its own: ``mode`` ``S_IFLNK``,
its target as content (the convention links have on every store); one that could leave it is
left out of listings (one warning per store, then debug lines) and cannot be made. FIFOs and
sockets are listed as such (size 0); device nodes are not. A key whose path crosses a link
is not found. Every path is opened one component at a time, relative to an open descriptor of
the parent, with ``O_NOFOLLOW`` (``O_DIRECTORY`` for folders), so a link swapped in between a
check and an open is refused by the kernel: there is no check-then-open window. The root
directory itself is resolved once, at start (it is what the user named). Writes are in
:mod:`.local_write`; what both halves share in :mod:`.local_common`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence

from ..errors import (
    AccessDenied,
    NotFound,
    StaleVersion,
)
from .base import ListPage, ObjectInfo
from .local_common import ABSENT, DIR_FLAGS, FILE_FLAGS, TMP_PREFIX, map_os_error
from .local_meta import (
    SHOWN,
    info_of,
    inside,
    version_of,
)
from .local_write import LocalWrites

log = logging.getLogger(__name__)

class LocalStore(LocalWrites):
    """Objects in ``root``; a key ``a/b.txt`` is the file ``root/a/b.txt`` (never via a link)."""

    enforces_conditions = True
    #: links must stay inside (:func:`inside`): the write path refuses others at ``symlink``
    links_inside = True
    #: folders are directories: a marker is never listed as an object
    folders_are_dirs = True

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
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
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
                # a device node is never opened (opening one may act: a tape rewinds), nor
                # a socket (ENXIO: its head, chmod or delete failed with EIO, and its delete
                # was retried for ever)
                kind = stat.S_IFMT(os.stat(parts[-1], dir_fd=parent,
                                           follow_symlinks=False).st_mode)
                if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
                    raise NotFound(f"{key}: not a file")
                fd = os.open(parts[-1], FILE_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError as exc:
            raise map_os_error(exc, key) from exc
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
        """A file's info; ``dir/``: the folder's, as a folder marker (size 0)."""
        if key.endswith("/") and self._parts(key):
            try:
                fd = self._open_dir(self._parts(key))
            except OSError as exc:
                raise map_os_error(exc, key) from exc
        else:
            try:
                fd = self._open_file(key)
            except NotFound:
                return info_of(key, self._special(key)[0])
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return info_of(key, st)

    def _special(self, key: str) -> tuple[os.stat_result, str]:
        """The link (inside the source), FIFO or socket at ``key``: its lstat and a link's
        target ("" for others); NotFound for anything else."""
        parts = self._parts(key)
        if not parts or key.endswith("/"):
            raise NotFound(f"{key}: not a file")
        try:
            dfd = self._open_dir(parts[:-1])
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                target = os.readlink(parts[-1], dir_fd=dfd) if stat.S_ISLNK(st.st_mode) else ""
            finally:
                os.close(dfd)
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        kind = stat.S_IFMT(st.st_mode)
        if kind not in SHOWN or (kind == stat.S_IFLNK and not inside(key, target)):
            raise NotFound(f"{key}: not a file")
        return st, target

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
            if exc.errno in ABSENT:
                return  # an absent prefix lists as empty, as on S3
            raise map_os_error(exc, prefix or "/") from exc
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        if entry.is_symlink() and not inside(
                                prefix + entry.name, os.readlink(entry.name, dir_fd=fd)):
                            links.append(entry.name)
                            continue
                        if entry.name.startswith(TMP_PREFIX):
                            continue  # a file being written (see put_file)
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
                    else:
                        st = entry.stat(follow_symlinks=False)  # fstatat on the open folder
                        if stat.S_ISREG(st.st_mode) or stat.S_IFMT(st.st_mode) in SHOWN:
                            page.objects.append(info_of(key, st))
                except OSError:
                    continue  # vanished or unreadable entry: skip it
        except OSError as exc:
            raise map_os_error(exc, prefix or "/") from exc
        finally:
            os.close(fd)
        if links:
            self._skipped_links(prefix, links)
        yield page

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        try:
            fd = self._open_file(key)
        except NotFound:
            st, target = self._special(key)  # a link's content is its target
            if version_of(st) != version:
                raise StaleVersion(f"{key}: changed since it was listed") from None
            return os.fsencode(target)[start:start + max(length, 0)]
        try:
            if version_of(os.fstat(fd)) != version:
                raise StaleVersion(f"{key}: changed since it was listed")
            return os.pread(fd, length, start) if length > 0 else b""
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        finally:
            os.close(fd)
