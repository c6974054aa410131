"""Frames between the FUSE process and a worker process, over two pipes.

Request (FUSE process -> worker): ``REQUEST`` header (request id, payload length), then a
pickle of a :data:`Request` tuple (a block fetch), a :class:`Put` (an upload) or a
:class:`List` (a folder's listing). The first
frame a worker reads is its :class:`Init` instead.
Reply (worker -> FUSE process): ``REPLY`` header (request id, status, the worker's CPU seconds
so far, the cache's volume and item count as the worker last read them, damaged cached blocks
the worker found so far, payload length), then the payload: the block's bytes (``STORED``,
``HIT``, ``FETCHED``), a pickle (``SMALL``, ``PUT``, ``LISTED``), an upload id (``STARTED``) or
``kind NUL message`` (``FAILED``; ``kind`` from :func:`fusefs.errors.error_kind`). Every
request gets exactly one final reply; ``STARTED`` is the only one that may come before it, and
the worker sends no part of that upload until the FUSE process answers it with a request
frame of the same id whose object is a bool: True once the upload id is journaled, False if
it could not be (the worker then aborts the upload and fails).

Both sides are the same fusefs install (the worker is started with the FUSE process's own
interpreter), so pickle is safe here: nothing else writes to these pipes.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

REQUEST = struct.Struct("<QI")
REPLY = struct.Struct("<QBdQQQQ")

#: Reply statuses: fetched and stored in the cache; found in the cache; failed; fetched but
#: not stored (the cache is off, or refused it).
STORED, HIT, FAILED, FETCHED = 0, 1, 2, 3
#: The worker has built its store and cache and takes requests (request id 0, no payload).
READY = 4
#: The answer to a request for a small object whole with its metadata (``start`` -1): a
#: pickle of (its ``ObjectInfo``, whether its bytes were stored in the cache as block 0, its
#: bytes if they are that block whole, else b"").
SMALL = 5
#: The answer to a :class:`Put`: a pickle of (the new object's ``ObjectInfo``, whether its
#: bytes were put into the block cache).
PUT = 6
#: The answer to a :class:`List`: a pickle of (objects, prefixes, more), every page joined.
LISTED = 8
#: A :class:`Put` began a multipart upload (payload: its id, UTF-8) and waits for the answer
#: (see above); its final reply follows.
STARTED = 7


@dataclass(frozen=True, slots=True)
class Init:
    """What a worker needs to build its own store and cache (never an SDK client)."""

    source: str
    settings: Any  # fusefs.config.Settings
    number: int


#: A request: fetch bytes ``[start, start+length)`` of ``key`` at ``version`` as the block
#: ``BlockKey(source, key, version, block_size, index)``; ``start`` -1: the whole object of
#: ``length`` bytes with its metadata (S3's small GET), stored as block 0 (answered
#: ``SMALL``). A plain tuple: it pickles in C (a dataclass would cost the FUSE process a
#: Python-level ``__getstate__`` per request).
Request = tuple[str, str, int, int, str, int, int]  # key, version, start, length, source,
#                                                     block_size, index

@dataclass(frozen=True, slots=True)
class Put:
    """Upload the local file ``path`` (``size`` bytes, read by the worker) to ``key`` with
    ``condition`` (a ``Condition``) and ``attrs`` (an ``Attrs``); ``check``: first HEAD-check
    that ``key`` is at this version ("" absent), for stores that may ignore conditions."""

    key: str
    path: str
    size: int
    condition: Any
    attrs: Any
    check: str | None = None
    #: (source, block size): once the store holds it, put its bytes into the block cache as
    #: the blocks of the new version (reading it back then makes no request); None: don't
    seed: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class List:
    """One delimited listing of ``prefix`` (``ObjectStore.list``, every page): the SDK's
    parsing of the answer (XML or JSON) is the worker's CPU, not the FUSE process's."""

    prefix: str
    max_keys: int | None
    start_after: str


#: Pipe buffer asked for (``F_SETPIPE_SZ``; Linux allows unprivileged processes up to 1 MiB):
#: a reply up to this size is read in one ``read``, never pieced together and copied.
PIPE_SIZE = 1024 * 1024


def widen_pipe(fd: int) -> None:
    """Ask for a ``PIPE_SIZE`` buffer on the pipe ``fd`` (best effort)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        pass


def write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write every byte of ``parts`` to ``fd`` (a pipe may take fewer at a time)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def read_exact(fd: int, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``fd``; None at end of file (the other side is gone)."""
    if n == 0:
        return b""
    first = os.read(fd, n)
    if len(first) == n:
        return first
    if not first:
        return None
    buf = bytearray(n)
    buf[: len(first)] = first
    view, got = memoryview(buf), len(first)
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def send_frame(fd: int, rid: int, obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    frame = REQUEST.pack(rid, len(payload)) + payload
    if os.write(fd, frame) < len(frame):  # a small frame goes in one write, unless the pipe
        raise OSError("request pipe full")  # is full: the worker is stuck (it is replaced)


def read_frame(fd: int) -> tuple[int, Any] | None:
    """(request id, object) of the next request frame; None at end of file."""
    head = read_exact(fd, REQUEST.size)
    if head is None:
        return None
    rid, n = REQUEST.unpack(head)
    payload = read_exact(fd, n)
    if payload is None:
        return None
    return rid, pickle.loads(payload)


def read_reply(fd: int) -> tuple[int, int, float, tuple[int, int], int, bytes] | None:
    """(request id, status, worker CPU seconds, (cache volume, cache items), damaged blocks
    found, payload) of the next reply; None at EOF."""
    head = read_exact(fd, REPLY.size)
    if head is None:
        return None
    rid, status, cpu, volume, items, corrupt, n = REPLY.unpack(head)
    payload = read_exact(fd, n)
    if payload is None:
        return None
    return rid, status, cpu, (volume, items), corrupt, payload
