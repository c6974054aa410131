"""A local directory served as a bucket: files are objects, sub-directories are prefixes."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator

from ..errors import AccessDenied, BackendError, FusefsError, NotFound, StaleVersion
from .base import ListPage, ObjectInfo


def _version(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


def _map_os_error(exc: OSError, what: str) -> FusefsError:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return NotFound(f"{what}: not found", cause=exc)
    if isinstance(exc, PermissionError):
        return AccessDenied(f"{what}: permission denied", cause=exc)
    return BackendError(f"{what}: {exc.strerror or exc}", cause=exc)


class LocalStore:
    """Objects in ``root``; a key ``a/b.txt`` is the file ``root/a/b.txt``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.source_id = f"file://{self.root}"

    def _path(self, key: str) -> str:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise NotFound(f"{key}: invalid key")
        return os.path.join(self.root, *parts)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise AccessDenied(f"directory {self.root} is not readable")

    def head(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        if not stat.S_ISREG(st.st_mode) or key.endswith("/"):
            raise NotFound(f"{key}: not a file")
        return ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def list(self, prefix: str, *, max_keys: int | None = None) -> Iterator[ListPage]:
        page = ListPage()
        try:
            with os.scandir(self._path(prefix)) as it:
                for entry in it:
                    try:
                        if entry.is_dir():
                            page.prefixes.append(prefix + entry.name + "/")
                        elif entry.is_file():
                            st = entry.stat()
                            page.objects.append(
                                ObjectInfo(
                                    prefix + entry.name, st.st_size, st.st_mtime, _version(st)
                                )
                            )
                    except OSError:
                        continue  # vanished or unreadable entry: skip it
                    if max_keys and len(page.objects) + len(page.prefixes) >= max_keys:
                        break
        except (FileNotFoundError, NotADirectoryError):
            return  # an absent prefix lists as empty, as on S3
        except OSError as exc:
            raise _map_os_error(exc, prefix or "/") from exc
        page.objects.sort(key=lambda o: o.key)
        page.prefixes.sort()
        yield page

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
        try:
            if _version(os.fstat(fd)) != version:
                raise StaleVersion(f"{key}: changed since it was listed")
            return os.pread(fd, length, start) if length > 0 else b""
        finally:
            os.close(fd)

    # --- writes (``fusefs check``'s probe) ------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Write the file atomically (a temporary name, then a rename), parent folders as
        needed; never creates the root directory itself."""
        if not os.path.isdir(self.root):
            raise NotFound(f"directory {self.root} does not exist")
        path = self._path(key)
        tmp = f"{path}.fusefs-tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            st = os.stat(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _map_os_error(exc, key) from exc
        return ObjectInfo(key, st.st_size, st.st_mtime, _version(st))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return  # already absent
        except OSError as exc:
            raise _map_os_error(exc, key) from exc
