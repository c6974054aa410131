"""A local directory served as a bucket: files are objects, sub-directories are prefixes.

Symbolic links are never followed, wherever they point (like rclone's default). A link whose
target stays inside the source (:func:`inside`) is an object of its own: ``mode`` ``S_IFLNK``,
its target as content (the convention links have on every store); one that could leave it is
left out of listings (one warning per store, then debug lines) and cannot be made. FIFOs and
sockets are listed as such (size 0); device nodes are not. A key whose path crosses a link
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
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

from ..errors import (
    AccessDenied,
    BackendError,
    Conflict,
    FusefsError,
    NoSpace,
    NotFound,
    NotPermitted,
    StaleVersion,
)
from .base import Attrs, Condition, ListPage, ObjectInfo, Upload
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

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is then refused as not a file)
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# a link met while walking (ELOOP), or a file where a folder was expected: no such key
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
# a file system without hard links
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)
#: Files being written are named so, in their destination folder; listings skip them.
TMP_PREFIX = ".fusefs-tmp-"


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _map_os_error(exc: OSError, what: str) -> FusefsError:
    if exc.errno in _ABSENT:
        return NotFound(f"{what}: not found", cause=exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {exc.strerror}", cause=exc)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: permission denied", cause=exc)
    return BackendError(f"{what}: {exc.strerror or exc}", cause=exc)


class LocalStore:
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
                # a device node is never opened (opening one may act: a tape rewinds), nor
                # a socket (ENXIO: its head, chmod or delete failed with EIO, and its delete
                # was retried for ever)
                kind = stat.S_IFMT(os.stat(parts[-1], dir_fd=parent,
                                           follow_symlinks=False).st_mode)
                if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
                    raise NotFound(f"{key}: not a file")
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
        """A file's info; ``dir/``: the folder's, as a folder marker (size 0)."""
        if key.endswith("/") and self._parts(key):
            try:
                fd = self._open_dir(self._parts(key))
            except OSError as exc:
                raise _map_os_error(exc, key) from exc
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
            raise _map_os_error(exc, key) from exc
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
            if exc.errno in _ABSENT:
                return  # an absent prefix lists as empty, as on S3
            raise _map_os_error(exc, prefix or "/") from exc
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
            raise _map_os_error(exc, prefix or "/") from exc
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
            raise _map_os_error(exc, key) from exc
        finally:
            os.close(fd)

    # --- writes -------------------------------------------------------------------------
    #
    # A new file is written under a hidden temporary name in its destination folder (listings
    # skip it), fsynced, then renamed over the key under the store's lock, after checking the
    # condition there; "absent" is a hard link, which the kernel refuses if the name exists.
    # The lock orders this mount's own writers; another process writing the same file between
    # the check and the rename is not seen (a local folder has no conditional rename).

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
            raise _map_os_error(exc, key) from exc

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
                    if exc.errno not in _NO_LINKS:
                        raise
                    # no hard links here (FAT, some network file systems): check, then rename
                    if _exists(name, dfd):
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
            raise _map_os_error(exc, key) from exc
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
            raise _map_os_error(exc, key) from exc
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
            raise _map_os_error(exc, key) from exc
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
            raise _map_os_error(exc, key) from exc

    def set_attrs(self, key: str, version: str, attrs: Attrs) -> ObjectInfo:
        if key.endswith("/") and self._parts(key):
            # a folder: changed in place, as chmod does (a directory's version moves with
            # every entry added, so there is no version of it to compare)
            try:
                fd = self._open_dir(self._parts(key))
            except OSError as exc:
                raise _map_os_error(exc, key) from exc
            try:
                folder_attrs(fd, attrs)
                return info_of(key, os.fstat(fd))
            except OSError as exc:
                raise _map_os_error(exc, key) from exc
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
            raise _map_os_error(exc, key) from exc
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
                        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
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
                raise _map_os_error(exc, key) from exc
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
            if exc.errno in _ABSENT:
                return  # already absent
            raise _map_os_error(exc, key) from exc
        try:
            if key.endswith("/"):
                os.rmdir(parts[-1], dir_fd=dfd)
            else:
                os.unlink(parts[-1], dir_fd=dfd)
        except OSError as exc:
            if exc.errno in _ABSENT or exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return  # already absent, or a folder that still has entries
            raise _map_os_error(exc, key) from exc
        finally:
            os.close(dfd)
