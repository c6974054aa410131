"""Reading an :class:`~fusefs.backends.base.Upload`'s bytes, part by part, for every store.

An upload's bytes come from the staged file, except in its copy ranges, which come from the
base object (``get_range`` at the base version, so a changed base is StaleVersion, never
mixed bytes). Nothing here holds more than one part in memory.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import BackendError
from .base import Upload

MiB = 1 << 20

#: A ``get_range(key, start, length, version)`` of the store doing the upload.
GetRange = Callable[[str, int, int, str], bytes]


def plan_parts(size: int, part_size: int, max_parts: int = 10_000,
               align: int = MiB) -> list[tuple[int, int]]:
    """``(start, end)`` of each part: ``part_size`` bytes (grown, in steps of ``align``, so
    that there are at most ``max_parts``), the last one shorter. An empty upload is one
    empty part."""
    if size <= 0:
        return [(0, 0)]
    need = -(-size // max_parts)
    if need > part_size:
        part_size = -(-need // align) * align
    return [(s, min(s + part_size, size)) for s in range(0, size, part_size)]


def inside_copy(upload: Upload, start: int, end: int) -> bool:
    """True when ``[start, end)`` lies wholly inside one copy range of ``upload``."""
    return any(a <= start and end <= b for a, b in upload.copy)


def pieces(upload: Upload, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``[start, end)`` cut into ``(start, end, from_base)`` pieces, in order."""
    pos = start
    for a, b in upload.copy:
        if b <= pos:
            continue
        if a >= end:
            break
        if a > pos:
            yield pos, a, False
            pos = a
        stop = min(b, end)
        yield pos, stop, True
        pos = stop
    if pos < end:
        yield pos, end, False


class _Skipped(Exception):
    """A part not sent because another one failed."""


def run_parts(n_workers: int, jobs: Sequence[Callable[[], str]]) -> list[str]:
    """Run ``jobs`` on ``n_workers`` threads, results in order; on the first failure the jobs
    not started are dropped, the running ones finish, then the error is raised."""
    failed = threading.Event()

    def guarded(job: Callable[[], str]) -> str:
        if failed.is_set():
            raise _Skipped()
        try:
            return job()
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max(1, min(n_workers, len(jobs))), thread_name_prefix="upload-part")
    futures: list[Future[str]] = []
    try:
        futures = [pool.submit(guarded, job) for job in jobs]
        pool.shutdown(wait=True)
    except BaseException:
        failed.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    for f in futures:
        err = None if f.cancelled() else f.exception()
        if err is not None and not isinstance(err, _Skipped):
            raise err
    return [f.result() for f in futures]


class UploadSource:
    """Random access to an upload's bytes: the staged file (opened once, read with
    ``pread`` so threads can share it) and the base object for the copy ranges."""

    def __init__(self, upload: Upload, get_range: GetRange) -> None:
        self.upload = upload
        self._get = get_range
        self._fd: int | None = None
        if any(b > a for a, b in upload.copy) and not upload.base_key:
            raise BackendError(f"{upload.path}: copy ranges without a base object")
        try:
            self._fd = os.open(upload.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # a local failure (never NotFound: that is about the store)
            raise BackendError(f"{upload.path}: staged file: {exc.strerror or exc}",
                               cause=exc) from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> UploadSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the new content (clipped to its size); a file shorter
        than its part reads as zeros there (a hole at the end of a sparse file)."""
        end = min(end, self.upload.size)
        if end <= start:
            return b""
        out: list[bytes] = []
        for a, b, from_base in pieces(self.upload, start, end):
            if from_base:
                if self.upload.read_base is not None:
                    data = self.upload.read_base(a, b - a)
                else:
                    data = self._get(self.upload.base_key, a, b - a, self.upload.base_version)
                if len(data) != b - a:
                    raise BackendError(
                        f"{self.upload.base_key}: base object shorter than its copy range")
            else:
                assert self._fd is not None
                data = os.pread(self._fd, b - a, a)
                if len(data) < b - a:
                    data += bytes(b - a - len(data))
            out.append(data)
        return out[0] if len(out) == 1 else b"".join(out)  # one copy at most


class UploadReader(io.RawIOBase):
    """A sequential, read-only file object over an :class:`UploadSource` (for SDKs that
    stream from a file: GCS resumable uploads). ``seek``/``tell`` work, so an SDK may rewind
    to resend a chunk."""

    def __init__(self, source: UploadSource, chunk: int = 4 * MiB) -> None:
        super().__init__()
        self._src = source
        self._pos = 0
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._src.upload.size}
        self._pos = max(0, base[whence] + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._src.upload.size - self._pos
        data = self._src.read(self._pos, self._pos + size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
