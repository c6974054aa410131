"""Training from a mount: hint the files a data loader will read next, in its order.

Pure Python, no torch needed (and it works with torch's ``DataLoader``):

- :class:`MountHints` drives one hint stream of a mount's control file (``hint-open``,
  ``hint``, ``hint-at``, ``hint-cancel``; see the README): give it the order of an epoch with
  :meth:`~MountHints.start`, tell it how far the reader got with :meth:`~MountHints.advance`.
  It sends the paths a little ahead of the window (never the whole order at once, so a
  million-file epoch costs the mount no memory) and the position every few files.
- :class:`HintingSampler` wraps a sampler (anything iterable over dataset indices, with a
  length): each epoch it takes the sampler's order, opens a stream, and advances the window as
  indices are handed out. Hinting happens in ONE place -- the process that iterates the
  sampler (a ``DataLoader``'s main process) -- however many worker processes read the files.

Each epoch (each :meth:`~MountHints.start`), the process that holds the stream also lists every
folder of the order once (``os.scandir``, ``list_folders=True``): the kernel answers that with
READDIRPLUS, which fills its dentries and attributes, so the opens of the files -- in this
process or in a ``DataLoader``'s worker processes -- find them without a LOOKUP each while the
mount's entry timeout (``--metadata-ttl``) holds. The mount fetches hinted files in its
background pool, behind programs' reads: a hint never holds a slot a read waits for.

Hints are an optimisation: once a stream is open, a failure to send a later hint is logged
(one warning) and hinting stops; the program's reads go on unaffected; a folder that cannot be
listed is skipped (logged).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import shlex
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from .ctlclient import CONTROL_NAME, ControlConnection, ControlError

log = logging.getLogger(__name__)

__all__ = ["CONTROL_NAME", "HintError", "HintWindowWarning", "HintingSampler", "MountHints"]

#: Bytes of paths sent in one command (the control file accepts lines up to 1 MiB).
_CHUNK_BYTES = 256 * 1024


class HintError(OSError):
    """A hint command the mount refused (bad path, cache disabled, not a fusefs mount)."""


class HintWindowWarning(UserWarning):
    """The cache cannot hold the window asked for: fewer files are kept hinted ahead."""


class MountHints:
    """One ordered hint stream on the fusefs mount at ``mountpoint``.

    ``window_files``/``window_bytes``: how far ahead of the reader files are kept hinted
    (``window_bytes`` None: as much as the cache holds without evicting hinted files not read
    yet; a larger value is cut to that, with a :class:`HintWindowWarning`). ``stream``: the
    stream's name (unique per reader; default random). ``list_folders``: list each folder of
    an order once when it starts (fills the kernel's dentries; see the module's doc).
    """

    def __init__(
        self,
        mountpoint: str | os.PathLike[str],
        *,
        window_files: int = 256,
        window_bytes: int | None = None,
        stream: str | None = None,
        list_folders: bool = True,
    ) -> None:
        if window_files < 1:
            raise ValueError("window_files must be at least 1")
        self.mountpoint = os.fspath(mountpoint)
        self.window_files = window_files
        self.window_bytes = window_bytes
        self.stream = stream or uuid.uuid4().hex[:16]
        self.list_folders = list_folders
        self.folders_listed = 0  # folders the last start() listed
        self.window: dict[str, Any] = {}  # what hint-open answered (the effective window)
        self._order: Sequence[str] = ()
        self._sent = 0  # paths of the order sent so far
        self._reported = 0  # the last position sent
        self._active = False
        self._warned = False  # the window was found limited by the cache (warned once)
        self._conn: ControlConnection | None = None
        self._pid = 0

    # --- the stream ------------------------------------------------------------------------

    def start(self, paths: Sequence[str]) -> dict[str, Any]:
        """A new order (an epoch): replaces the previous one, whose queued hints are dropped.
        ``paths`` are relative to the mount root, in the order they will be read. Sends the
        first hints, then (``list_folders``) lists each folder of the order once, in the order
        the paths first name them, before returning."""
        words = ["hint-open", self.stream, str(self.window_files)]
        if self.window_bytes is not None:
            words.append(str(self.window_bytes))
        self.window = self._command(words)
        self._order, self._sent, self._reported, self._active = paths, 0, 0, True
        if self.window.get("limited_by_cache") and not self._warned:
            self._warned = True
            warnings.warn(
                f"fusefs hints on {self.mountpoint}: {self.window.get('warning')}",
                HintWindowWarning,
                stacklevel=2,
            )
        self._send(self._ahead(0), None)
        if self.list_folders:
            self.folders_listed = self.list_order_folders(paths)
        return self.window

    def list_order_folders(self, paths: Iterable[str]) -> int:
        """List each folder of ``paths`` once (``os.scandir`` to the end): the kernel fills its
        dentries from the READDIRPLUS answers. Returns the folders listed; one that cannot be
        listed is logged and skipped."""
        listed = 0
        for folder in dict.fromkeys(posixpath.dirname(p) for p in paths):
            try:
                with os.scandir(os.path.join(self.mountpoint, folder)) as entries:
                    for _ in entries:
                        pass
            except OSError as exc:
                log.info("fusefs hints: listing %r failed: %s", folder or ".", exc)
                continue
            listed += 1
        return listed

    def advance(self, position: int) -> None:
        """The reader has consumed the first ``position`` files of the order."""
        if not self._active or position <= self._reported:
            return
        end = len(self._order)
        if position - self._reported < max(1, self.window_files // 8) and position < end:
            return  # every few files, not every file: one write moves the window on
        self._reported = min(position, end)
        self._send(self._ahead(self._reported), self._reported)

    def cancel(self) -> None:
        """Drop the stream and every hint still queued (the epoch was abandoned)."""
        if not self._active:
            return
        self._active = False
        try:
            self._command(["hint-cancel", self.stream])
        except OSError as exc:
            log.info("fusefs hints: cancel of stream %s failed: %s", self.stream, exc)

    def stats(self) -> dict[str, Any] | None:
        """This stream's entry in the mount's statistics (None once it is closed)."""
        data = json.loads(self._read_stats())
        return next((s for s in data.get("hint_streams", []) if s["id"] == self.stream), None)

    def close(self) -> None:
        self.cancel()
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __del__(self) -> None:
        # dropped without close() (a failed start, a sampler never closed): the control file
        # must not stay open, or the mount cannot be unmounted while this process lives
        conn = getattr(self, "_conn", None)
        if conn is not None and getattr(self, "_pid", 0) == os.getpid():
            with contextlib.suppress(OSError):
                conn.close()
            self._conn = None

    def __enter__(self) -> MountHints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sending ---------------------------------------------------------------------------

    def _ahead(self, position: int) -> int:
        """Send paths up to two windows ahead of the reader, so the mount never waits."""
        return min(len(self._order), position + 2 * self.window_files)

    def _send(self, upto: int, position: int | None) -> None:
        """Send the order's paths up to ``upto`` and the position, as few writes as fit."""
        lines: list[str] = []
        while self._sent < upto:
            words, size = [], 0
            while self._sent < upto and size < _CHUNK_BYTES:
                q = shlex.quote(self._order[self._sent])
                words.append(q)
                size += len(q) + 1
                self._sent += 1
            lines.append(f"hint {shlex.quote(self.stream)} {' '.join(words)}")
        if position is not None:
            lines.append(f"hint-at {shlex.quote(self.stream)} {position}")
        if not lines:
            return
        try:
            want = position is not None and not self._warned
            state = self._control().run(lines, result=want)  # hint-at: the stream's state
            if want and state.get("limited_by_cache"):
                self._warned = True
                warnings.warn(
                    f"fusefs hints on {self.mountpoint}: the cache holds only "
                    f"{state.get('files_in_window')} of the {self.window_files} files asked "
                    "for ahead without evicting hinted files not read yet",
                    HintWindowWarning,
                    stacklevel=3,
                )
        except (OSError, ValueError) as exc:
            self._active = False
            warnings.warn(
                f"fusefs hints on {self.mountpoint} stopped: {exc}", RuntimeWarning, stacklevel=3
            )

    # --- the control file (or, on a read-only mount, the control socket) -----------------

    def _control(self) -> ControlConnection:
        if self._conn is None or self._pid != os.getpid():  # a fork does not share it
            try:
                self._conn = ControlConnection(self.mountpoint)
            except FileNotFoundError:
                raise HintError(
                    errno.ENOENT, f"{self.mountpoint} is not a fusefs mount (no {CONTROL_NAME})"
                ) from None
            self._pid = os.getpid()
        return self._conn

    def _command(self, words: list[str]) -> dict[str, Any]:
        """Run one command and return its JSON result; :class:`HintError` if refused."""
        try:
            return self._control().run([shlex.join(words)])
        except ControlError as exc:
            raise HintError(exc.errno, f"{words[0]} on {self.mountpoint}: {exc.strerror}"
                            ) from None

    def _read_stats(self) -> bytes:
        with open(os.path.join(self.mountpoint, CONTROL_NAME), "rb") as f:
            return f.read()


class HintingSampler:
    """Wraps ``sampler`` so that the files of the indices it is about to hand out are hinted.

    ``paths``: the relative path of each dataset index (a sequence, or a function of the
    index). ``lookahead``: indices the consumer takes ahead of reading them -- for a torch
    ``DataLoader`` ``prefetch_factor * num_workers * batch_size`` -- so the window starts where
    reading is, not where handing out is; it is added to ``window_files``. Use it as the
    ``sampler=`` of a ``DataLoader``: it is iterated in the main process only, so one stream
    serves every worker. Each epoch it lists every folder of the order once, in this process
    (``list_folders``), so the workers' opens find the kernel's dentries. Ending an epoch
    early (``break``) cancels its queued hints; the next epoch's order replaces the previous
    stream.
    """

    def __init__(
        self,
        sampler: Iterable[int],
        paths: Sequence[str] | Callable[[int], str],
        mountpoint: str | os.PathLike[str],
        *,
        window_files: int = 256,
        window_bytes: int | None = None,
        lookahead: int = 0,
        stream: str | None = None,
        list_folders: bool = True,
    ) -> None:
        self.sampler = sampler
        self.paths = paths
        self.mountpoint = os.fspath(mountpoint)
        self.window_files = window_files
        self.window_bytes = window_bytes
        self.lookahead = max(0, lookahead)
        self.stream = stream or uuid.uuid4().hex[:16]
        self.list_folders = list_folders
        self._hints: MountHints | None = None

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the wrapped sampler (``DistributedSampler``)."""
        fn = getattr(self.sampler, "set_epoch", None)
        if fn is not None:
            fn(epoch)

    def hints(self) -> MountHints:
        if self._hints is None:
            self._hints = MountHints(
                self.mountpoint,
                window_files=self.window_files + self.lookahead,
                window_bytes=self.window_bytes,
                stream=self.stream,
                list_folders=self.list_folders,
            )
        return self._hints

    def _path(self, index: int) -> str:
        return self.paths(index) if callable(self.paths) else self.paths[index]

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        hints = self.hints()
        hints.start(_LazyPaths(order, self._path))
        done = False
        try:
            for n, index in enumerate(order):
                hints.advance(max(0, n - self.lookahead))
                yield index
            hints.advance(max(0, len(order) - self.lookahead))
            done = True
        finally:
            if not done:  # abandoned mid-epoch (break, exception): drop its queued hints
                hints.cancel()

    def close(self) -> None:
        """Close the hint stream's control file (its queued hints are dropped); the next
        epoch opens a new one. A mount cannot be unmounted while it is open."""
        hints, self._hints = self._hints, None
        if hints is not None:
            hints.close()

    def __enter__(self) -> HintingSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hints"] = None  # an open control file does not travel to another process
        return state


class _LazyPaths(Sequence[str]):
    """The paths of an order, computed as they are sent."""

    def __init__(self, order: list[int], path: Callable[[int], str]) -> None:
        self.order, self.path = order, path

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.path(self.order[i])
