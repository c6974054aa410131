"""The control socket of a ``--read-only`` mount: the control file's commands over a Unix socket.

A read-only mount is mounted ``ro`` by the kernel (so reads cost no atime GETATTR), and the
kernel then refuses every write, the control file's too. Its commands (``clear``, ``prefetch``,
hints, ``sync``...) come through this socket instead; the control file stays readable for the
statistics, which name the socket (``control_socket``). ``fusefs.ctlclient`` picks the channel.

Protocol: the control file's command lines (split as a shell splits them; a newline inside
quotes belongs to the line). Each line is answered by one line of compact JSON: the command's
result, or ``{"command", "error", "errno", "code"}`` if it failed; a blank line is answered
with the statistics. A connection's lines run one at a time, in order; connections run
concurrently. A last line without a newline runs when the client shuts down its sending side.

Who may connect: the socket (mode 0600) lives in ``CACHE_DIR/control/`` (mode 0700, the
mounting user's), and each connection's peer (``SO_PEERCRED``) must be the mounting user or
root -- the rule of writes to the control file. Runs on the trio thread like every request.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from typing import Any

import trio

from .cmdline import CommandLines
from .control import MAX_COMMAND, Control
from .errors import FusefsError, InvalidArgument, UserError

log = logging.getLogger(__name__)

#: sun_path holds 108 bytes with its NUL; longer paths are reached through /proc/self/fd.
_SUN_PATH_MAX = 107


def socket_path(cache_dir: str, mountpoint: str) -> str:
    """Where the control socket of the mount at ``mountpoint`` lives: one name per mount point
    (a second mount at the same place replaces a dead one's socket, never a live one's)."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "control", f"mnt-{digest}.sock")


def _error(exc: FusefsError, command: str = "") -> dict[str, Any]:
    code = exc.errno
    return {"command": command, "error": str(exc), "errno": code,
            "code": errno.errorcode.get(code, str(code))}


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


class ControlSocket:
    """A listening control socket for one mount (bound at :meth:`bind`, before mounting)."""

    def __init__(self, control: Control, path: str) -> None:
        self.control = control
        self.path = path
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Make the private directory, replace a dead mount's socket, bind and listen.
        UserError (one line) if the directory is not the mounting user's alone."""
        folder, name = os.path.split(self.path)
        try:
            os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(folder)
        except OSError as exc:
            raise UserError(f"cannot make the control socket's folder {folder}: "
                            f"{exc.strerror}") from None
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid()
                or st.st_mode & 0o077):
            raise UserError(f"{folder} must be a folder of uid {os.geteuid()} that no one else "
                            "may use (mode 0700): it holds the mount's control socket")
        dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            where = (self.path if len(os.fsencode(self.path)) <= _SUN_PATH_MAX
                     else f"/proc/self/fd/{dir_fd}/{name}")
            try:
                os.unlink(name, dir_fd=dir_fd)  # a dead mount's (the mount point is free)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(where)
                os.chmod(name, 0o600, dir_fd=dir_fd)
                sock.listen(64)
            except OSError as exc:
                sock.close()
                raise UserError(f"cannot listen on the control socket {self.path}: "
                                f"{exc.strerror}") from None
        finally:
            os.close(dir_fd)
        self._sock = sock
        log.debug("control socket %s", self.path)

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Answer connections until cancelled (the mount's nursery ends)."""
        assert self._sock is not None, "bind() first"
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        task_status.started()
        await trio.serve_listeners(self._connection, [listener])

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._converse(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            except Exception as exc:  # noqa: BLE001 - never end the mount over one client
                log.error("control socket connection failed", exc_info=exc)

    async def _converse(self, stream: trio.SocketStream) -> None:
        try:
            fh = self.control.open(peer_uid(stream.socket), os.O_RDWR)
        except FusefsError as exc:
            await stream.send_all(self._line(_error(exc)))
            return
        try:
            lines = CommandLines()
            while data := await stream.receive_some(1 << 16):
                lines.feed(data)
                while (raw := lines.take()) is not None:
                    await stream.send_all(self._line(await self.control.answer(fh, raw)))
                if len(lines) > MAX_COMMAND:
                    await stream.send_all(self._line(_error(InvalidArgument(
                        f"command longer than {MAX_COMMAND} bytes"))))
                    return
            if len(lines):  # a last line without a newline, then the client shut down
                await stream.send_all(self._line(await self.control.answer(fh, lines.rest())))
        finally:
            self.control.release(fh)

    @staticmethod
    def _line(doc: dict[str, Any]) -> bytes:
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
