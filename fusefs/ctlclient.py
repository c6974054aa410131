"""Talking to a running mount's control (stdlib only: ``fusefs.loader`` uses it in workers).

:class:`ControlConnection` runs command lines through the control file ``MOUNT/.fusefs``, or,
where the kernel refuses to open it for writing (a ``--read-only`` mount is mounted ``ro``:
``EROFS``), through the mount's control socket, whose path the statistics name
(``control_socket``). Either way a command answers the same JSON and fails with the same errno.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

CONTROL_NAME = ".fusefs"
#: Bytes of command lines per write to the control file (each line is at most 1 MiB).
_WRITE_BYTES = 1 << 20
#: sun_path holds 108 bytes with its NUL; longer paths are reached through /proc/self/fd.
_SUN_PATH_MAX = 107


#: The keys of a failed command's document (a result may hold an ``error`` of its own).
_ERROR_KEYS = {"command", "error", "errno", "code"}


class ControlError(OSError):
    """A command the mount refused; ``result`` is its error document (may be empty)."""

    def __init__(self, code: int, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(code, message)
        self.result = result or {}


def read_stats(mountpoint: str) -> dict[str, Any]:
    """The mount's statistics (a read of the control file; works on every mount)."""
    with open(os.path.join(mountpoint, CONTROL_NAME), "rb") as f:
        data: dict[str, Any] = json.loads(f.read())
    return data


class ControlConnection:
    """One conversation with the mount at ``mountpoint`` (a handle of its control file, or a
    connection to its control socket). OSError if neither can be had: ``ENOENT`` (not a fusefs
    mount), ``EACCES`` (only the mounting user, or root, may send commands)."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._replies: Any = None
        path = os.path.join(mountpoint, CONTROL_NAME)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            try:
                stats = read_stats(mountpoint)
            except ValueError:
                raise OSError(errno.ENOENT, f"{path} is not a fusefs control file") from None
            self._connect(stats.get("control_socket"))

    @property
    def via_socket(self) -> bool:
        return self._sock is not None

    def _connect(self, path: str | None) -> None:
        if not path:
            raise OSError(errno.EROFS, f"{self.mountpoint} is read-only and names no "
                          "control socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if len(os.fsencode(path)) <= _SUN_PATH_MAX:
                sock.connect(path)
            else:
                folder, name = os.path.split(path)
                dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
                try:
                    sock.connect(f"/proc/self/fd/{dir_fd}/{name}")
                finally:
                    os.close(dir_fd)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._replies = sock.makefile("rb")

    def run(self, lines: Sequence[str], *, result: bool = True) -> dict[str, Any]:
        """Run command lines in order; the last one's JSON result (``{}`` if ``result`` is
        false: the control file is then not read back). :class:`ControlError` with the
        command's errno at the first that fails; the lines after it are not run."""
        if self._sock is not None:
            return self._run_socket(lines)
        return self._run_file(lines, result)

    def _run_file(self, lines: Sequence[str], result: bool) -> dict[str, Any]:
        assert self._fd is not None
        batch: list[bytes] = []
        size = 0
        try:
            for line in lines:
                data = (line + "\n").encode()
                if batch and size + len(data) > _WRITE_BYTES:
                    os.write(self._fd, b"".join(batch))
                    batch, size = [], 0
                batch.append(data)
                size += len(data)
            if batch:
                os.write(self._fd, b"".join(batch))
        except OSError as exc:
            doc = self._read_back()
            raise ControlError(exc.errno or errno.EIO, str(doc.get("error") or exc.strerror),
                               doc) from None
        return self._read_back() if result else {}

    def _read_back(self) -> dict[str, Any]:
        """The document of the handle's last command (read from offset 0)."""
        assert self._fd is not None
        chunks, off = [], 0
        while chunk := os.pread(self._fd, 1 << 20, off):
            chunks.append(chunk)
            off += len(chunk)
        try:
            doc: dict[str, Any] = json.loads(b"".join(chunks)) if chunks else {}
        except ValueError:
            doc = {}
        return doc

    def _run_socket(self, lines: Sequence[str]) -> dict[str, Any]:
        assert self._sock is not None
        doc: dict[str, Any] = {}
        for line in lines:  # one at a time: a reply is never left unread while sending
            try:
                self._sock.sendall((line + "\n").encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once (the peer's uid): its reply is waiting
            reply = self._replies.readline()
            if not reply:
                raise ControlError(errno.ECONNRESET,
                                   f"{self.mountpoint}: the control socket closed")
            doc = json.loads(reply)
            if doc.keys() == _ERROR_KEYS:
                raise ControlError(int(doc["errno"]), str(doc["error"]), doc)
        return doc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._replies.close()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
