"""One block from the cache or the store, stored on the way: the cold work of a read.

Shared by the in-process fetch (a worker thread of the FUSE process) and the fetch worker
processes (:mod:`fusefs.workers`), so both verify the same way: the store's ``get_range``
checks the version (StaleVersion if the object changed), and a block shorter than the object
says it must be is refused (BackendError), never cached or served.
"""

from __future__ import annotations

from ..backends.base import ObjectStore
from ..errors import BackendError
from .blocks import BlockStore
from .keys import BlockKey


def fetch_block(
    store: ObjectStore, blocks: BlockStore, key: str, version: str, bkey: BlockKey,
    start: int, length: int,
) -> tuple[bytes, bool, bool]:
    """(the block, True, False) if the cache holds it, else (the block, False, stored) from
    the store, put into the cache (``stored``: the cache took it). Blocking (SQLite, the
    network): worker threads or processes only."""
    cached = blocks.read(bkey, 0, length)
    if cached is not None and len(cached) == length:
        return cached, True, False
    data = store.get_range(key, start, length, version)
    if len(data) != length:
        raise BackendError(
            f"{key}: short read at {start} ({len(data)} of {length} bytes); "
            "the object may have changed"
        )
    stored = blocks.put(bkey, data)
    blocks.maybe_touch()
    return data, False, stored
