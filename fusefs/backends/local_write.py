"""Writes of :class:`.local.LocalStore` (a mixin): files put whole or from a staged file,
links and special files, folders, copies, metadata changes and deletes.

A new file is written under a hidden temporary name in its destination folder (listings skip
it: ``TMP_PREFIX``), fsynced, then renamed over the key under the store's lock, after checking
the condition there; "absent" is a hard link, which the kernel refuses if the name exists.

Invariants: a condition is checked and the rename done under one lock, so this mount's own
writers are ordered; another process writing the same file between the check and the rename
is not seen (a local folder has no conditional rename). Every path is reached one component at
a time without following a link (the store's ``_open_dir``); a link that could lead out of the
source is never made.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import BackendError, Conflict, NotFound, NotPermitted, StaleVersion
from .base import Attrs, Condition, ObjectInfo, Upload
from .local_common import ABSENT, FILE_FLAGS, NO_LINKS, TMP_PREFIX, exists_at, map_os_error
from .local_meta import (
    SHOWN,
    chown_fd,
    copy_range,
    folder_attrs,
    info_of,
    inside,
    ns,
    version_of,
)
from .upload_io import pieces


class LocalWrites:
    """The write half of :class:`.local.LocalStore` (a mixin: the attributes and the methods
    declared below are the store's)."""

    root: str
    _lock: threading.Lock

    if TYPE_CHECKING:
        @staticmethod
        def _parts(key: str) -> list[str]: ...

        def _open_dir(self, parts: Sequence[str], *, create: bool = False) -> int: ...

        def _open_file(self, key: str) -> int: ...

        def _special(self, key: str) -> tuple[os.stat_result, str]: ...

        def head(self, key: str) -> ObjectInfo: ...

    def _dest(self, key: str) -> tuple[Sequence[str], int]:
        """The key's parts and a descriptor of its folder (created as needed)."""
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        parts = self._parts(key)
        if not parts or key.endswith("/"):
            raise NotFound(f"{key}: not a file name")
        try:
            return parts, self._open_dir(parts[:-1], create=True)
        except OSError as exc:
            raise map_os_error(exc, key) from exc

    @staticmethod
    def _temp(dfd: int) -> tuple[str, int]:
        name = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666, dir_fd=dfd)
        return name, fd

    def _commit(self, key: str, dfd: int, tmp: str, name: str, condition: Condition) -> ObjectInfo:
        """Rename ``tmp`` to ``name`` in folder ``dfd`` if ``condition`` holds (else Conflict,
        the temporary file left to the caller); the new file's info."""
        with self._lock:
            if condition.absent:
                try:
                    os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    raise Conflict(f"{key}: exists") from None
                except OSError as exc:
                    if exc.errno not in NO_LINKS:
                        raise
                    # no hard links here (FAT, some network file systems): check, then rename
                    if exists_at(name, dfd):
                        raise Conflict(f"{key}: exists") from None
                    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    os.unlink(tmp, dir_fd=dfd)
            else:
                if condition.version is not None:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        raise Conflict(f"{key}: gone") from None
                    if stat.S_ISDIR(st.st_mode) or version_of(st) != condition.version:
                        raise Conflict(f"{key}: changed")
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        os.fsync(dfd)
        return info_of(key, st)

    def _write_new(
        self, key: str, fill: Callable[[int], None], condition: Condition,
        attrs: Attrs | None,
    ) -> ObjectInfo:
        """A temporary file filled by ``fill(fd)``, attributes set, fsynced, committed."""
        parts, dfd = self._dest(key)
        tmp = ""
        try:
            tmp, fd = self._temp(dfd)
            try:
                fill(fd)
                chown_fd(fd, attrs)
                if attrs is not None and attrs.mode is not None:
                    os.fchmod(fd, attrs.mode & 0o777)  # never setuid/setgid/sticky
                if attrs is not None and attrs.mtime is not None:
                    os.utime(fd, ns=(time.time_ns(), ns(attrs.mtime)))
                os.fsync(fd)
            finally:
                os.close(fd)
            info = self._commit(key, dfd, tmp, parts[-1], condition)
            tmp = ""
            return info
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            os.close(dfd)

    def _open_version(self, key: str, version: str) -> int:
        """The file at ``key``, which must have ``version`` (StaleVersion otherwise)."""
        fd = self._open_file(key)
        if version_of(os.fstat(fd)) != version:
            os.close(fd)
            raise StaleVersion(f"{key}: changed since it was read")
        return fd

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Write the file atomically (a temporary name, then a rename), parent folders as
        needed, never through a symbolic link; never creates the root directory itself.
        ``dir/`` (empty) is a folder marker: the folder is made."""
        if key.endswith("/") and not data and self._parts(key):
            return self._mkdir(key)

        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        return self._write_new(key, fill, Condition(), None)

    def _mkdir(self, key: str) -> ObjectInfo:
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        try:
            fd = self._open_dir(self._parts(key), create=True)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        return info_of(key, st)

    def put_file(
        self, key: str, upload: Upload, *, condition: Condition = Condition(),
        attrs: Attrs | None = None, progress: Callable[[int], None] | None = None,
    ) -> ObjectInfo:
        """The staged file's bytes and the base file's copy ranges, copied in the kernel
        (``copy_file_range``) into a temporary file, then committed (see above). A link,
        FIFO or socket (``attrs.mode``) is made as one (a link from the staged target)."""
        if key.endswith("/") and upload.size == 0 and self._parts(key):
            return self._put_folder(key, condition, attrs)
        kind = stat.S_IFMT(attrs.mode) if attrs is not None and attrs.mode else 0
        if kind in SHOWN:
            assert attrs is not None and attrs.mode is not None
            with open(upload.path, "rb") as f:
                target = os.fsdecode(f.read(upload.size)) if kind == stat.S_IFLNK else ""
            return self._put_special(key, kind, attrs.mode & 0o777, target, attrs.mtime,
                                     condition, attrs, attrs.rdev)
        base = self._open_version(upload.base_key, upload.base_version) if any(
            b > a for a, b in upload.copy) else None
        try:
            src = os.open(upload.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if base is not None:
                os.close(base)
            raise BackendError(f"{upload.path}: staged file: {exc.strerror}", cause=exc) from exc

        def fill(fd: int) -> None:
            os.ftruncate(fd, upload.size)  # holes read as zeros
            staged = os.fstat(src).st_size
            for a, b, from_base in pieces(upload, 0, upload.size):
                if from_base:
                    assert base is not None
                    copy_range(base, fd, a, b, key)
                elif a < staged:
                    copy_range(src, fd, a, min(b, staged), key)
                if progress is not None:
                    progress(b - a)

        try:
            return self._write_new(key, fill, condition, attrs)
        finally:
            os.close(src)
            if base is not None:
                os.close(base)

    def _put_special(self, key: str, kind: int, perm: int, target: str, mtime: float | None,
                     condition: Condition, attrs: Attrs | None = None,
                     rdev: int | None = None) -> ObjectInfo:
        """Make a link (to ``target``), FIFO or socket under a temporary name, commit it."""
        if kind == stat.S_IFLNK and not inside(key, target):
            raise NotPermitted(f"{key}: a link to {target!r} could lead out of the source")
        parts, dfd = self._dest(key)
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        made = False
        try:
            if kind == stat.S_IFLNK:
                os.symlink(target, tmp, dir_fd=dfd)
            else:
                os.mknod(tmp, kind | 0o600, rdev or 0, dir_fd=dfd)  # a device: root only
            made = True
            if kind != stat.S_IFLNK:
                os.chmod(tmp, perm, dir_fd=dfd)  # ours, just made: not a link
            if attrs is not None and (attrs.uid is not None or attrs.gid is not None):
                os.chown(tmp, -1 if attrs.uid is None else attrs.uid,
                         -1 if attrs.gid is None else attrs.gid, dir_fd=dfd,
                         follow_symlinks=False)
            if mtime is not None:
                os.utime(tmp, ns=(time.time_ns(), ns(mtime)), dir_fd=dfd,
                         follow_symlinks=False)
            info = self._commit(key, dfd, tmp, parts[-1], condition)
            made = False
            return info
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        finally:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            os.close(dfd)

    def copy(
        self, src: str, version: str, dst: str, *, condition: Condition = Condition(),
    ) -> ObjectInfo:
        try:
            fd = self._open_version(src, version)
        except NotFound:
            st, target = self._special(src)  # a link, FIFO or socket: made anew at dst
            if version_of(st) != version:
                raise StaleVersion(f"{src}: changed since it was read") from None
            # the owner is kept (root only may give a file away: others' copies are theirs)
            owner = ((st.st_uid, st.st_gid) != (os.geteuid(), os.getegid())
                     and os.geteuid() == 0)
            return self._put_special(dst, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                     target, st.st_mtime_ns / 10**9, condition,
                                     Attrs(uid=st.st_uid, gid=st.st_gid) if owner else None,
                                     rdev=st.st_rdev)
        try:
            st = os.fstat(fd)

            def fill(out: int) -> None:
                copy_range(fd, out, 0, st.st_size, dst)
                os.fchmod(out, st.st_mode & 0o777)  # the metadata is kept (never setuid/gid)
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(PermissionError):  # only root may give it
                        os.fchown(out, st.st_uid, st.st_gid)
                os.utime(out, ns=(time.time_ns(), st.st_mtime_ns))

            return self._write_new(dst, fill, condition, None)
        finally:
            os.close(fd)

    def _put_folder(self, key: str, condition: Condition, attrs: Attrs | None) -> ObjectInfo:
        """A folder marker with attributes: the directory, made if missing (Conflict if it
        exists and ``condition.absent``), with ``attrs``'s mode, owner and mtime."""
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        parts = self._parts(key)
        try:
            with self._lock:
                try:
                    fd = self._open_dir(parts)
                except FileNotFoundError:
                    fd = self._open_dir(parts, create=True)
                else:
                    if condition.absent:
                        os.close(fd)
                        raise Conflict(f"{key}: exists")
                try:
                    folder_attrs(fd, attrs)
                    return info_of(key, os.fstat(fd))
                finally:
                    os.close(fd)
        except OSError as exc:
            raise map_os_error(exc, key) from exc

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        if key.endswith("/") and self._parts(key):
            # a folder: changed in place, as chmod does (a directory's version moves with
            # every entry added, so there is no version of it to compare)
            try:
                fd = self._open_dir(self._parts(key))
            except OSError as exc:
                raise map_os_error(exc, key) from exc
            try:
                folder_attrs(fd, attrs)
                return info_of(key, os.fstat(fd))
            except OSError as exc:
                raise map_os_error(exc, key) from exc
            finally:
                os.close(fd)
        try:
            fd = self._open_file(key)
        except NotFound:
            return self._set_special_attrs(key, version, attrs)
        try:
            with self._lock:
                if version_of(os.fstat(fd)) != version:
                    raise Conflict(f"{key}: changed")
                chown_fd(fd, attrs)
                if attrs.mode is not None:
                    os.fchmod(fd, attrs.mode & 0o777)  # never setuid/setgid/sticky
                if attrs.mtime is not None:
                    os.utime(fd, ns=(time.time_ns(), ns(attrs.mtime)))
                return info_of(key, os.fstat(fd))
        except OSError as exc:
            raise map_os_error(exc, key) from exc
        finally:
            os.close(fd)

    def _set_special_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        """``set_attrs`` of a link (its mtime and owner, as ``touch -h``, ``chown -h``), FIFO,
        socket or device node."""
        parts = self._parts(key)
        with self._lock:
            st, _ = self._special(key)
            if version_of(st) != version:
                raise Conflict(f"{key}: changed")
            try:
                dfd = self._open_dir(parts[:-1])
                try:
                    if attrs.mode is not None and stat.S_ISFIFO(st.st_mode):
                        # by descriptor, never by name: a link swapped in is not followed
                        fd = os.open(parts[-1], FILE_FLAGS, dir_fd=dfd)
                        try:
                            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                                os.fchmod(fd, attrs.mode & 0o777)
                        finally:
                            os.close(fd)
                    elif attrs.mode is not None and not stat.S_ISLNK(st.st_mode):
                        # a socket or device node is never opened: fchmodat without
                        # following a link (a link swapped in keeps its mode)
                        os.chmod(parts[-1], attrs.mode & 0o777, dir_fd=dfd,
                                 follow_symlinks=False)
                    if attrs.uid is not None or attrs.gid is not None:
                        os.chown(parts[-1], -1 if attrs.uid is None else attrs.uid,
                                 -1 if attrs.gid is None else attrs.gid, dir_fd=dfd,
                                 follow_symlinks=False)
                    if attrs.mtime is not None:
                        os.utime(parts[-1], ns=(time.time_ns(), ns(attrs.mtime)), dir_fd=dfd,
                                 follow_symlinks=False)
                finally:
                    os.close(dfd)
            except OSError as exc:
                raise map_os_error(exc, key) from exc
            return info_of(key, self._special(key)[0])

    def delete(self, key: str, *, condition: Condition = Condition()) -> None:
        """Remove the file; ``dir/`` removes the empty folder (one with entries stays, as a
        prefix with objects stays on S3 when its marker goes). A ``condition`` is checked
        under the store's lock (Conflict if the file has another version)."""
        if condition.version:
            with self._lock:
                try:
                    now = self.head(key).version
                except NotFound:
                    return
                if now != condition.version:
                    raise Conflict(f"{key}: changed")
                self._delete(key)
            return
        self._delete(key)

    def _delete(self, key: str) -> None:
        parts = self._parts(key)
        if not parts:
            return
        try:
            dfd = self._open_dir(parts[:-1])
        except OSError as exc:
            if exc.errno in ABSENT:
                return  # already absent
            raise map_os_error(exc, key) from exc
        try:
            if key.endswith("/"):
                os.rmdir(parts[-1], dir_fd=dfd)
            else:
                os.unlink(parts[-1], dir_fd=dfd)
        except OSError as exc:
            if exc.errno in ABSENT or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return  # already absent, or a folder that still has entries
            raise map_os_error(exc, key) from exc
        finally:
            os.close(dfd)
