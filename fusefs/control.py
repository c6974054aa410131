"""The control file ``MOUNT/.fusefs``: statistics as JSON, and commands written to it."""

from __future__ import annotations

import json
import stat
import time
from dataclasses import dataclass
from typing import Any

from . import stats as S
from .cache.blocks import BlockStore
from .config import Settings, human_size
from .errors import InvalidArgument
from .fs import CONTROL_INO, Attr, FileSystem
from .reader import Reader


@dataclass
class _CtlHandle:
    uid: int
    result: bytes | None = None  # the last command's JSON; None -> fresh stats on read


class Control:
    """State behind the control file; one handle per ``open``."""

    def __init__(
        self,
        fs: FileSystem,
        reader: Reader,
        blocks: BlockStore,
        stats: S.Stats,
        settings: Settings,
        source: str,
    ) -> None:
        self.fs, self.reader, self.blocks, self.stats = fs, reader, blocks, stats
        self.settings, self.source = settings, source
        self._handles: dict[int, _CtlHandle] = {}
        self._next = 1 << 40  # distinct from file handles

    def attr(self) -> Attr:
        return Attr(
            CONTROL_INO,
            stat.S_IFREG | 0o644,
            0,
            time.time_ns(),
            0,
            4096,
            1,
            self.fs.uid,
            self.fs.gid,
        )

    def owns(self, fh: int) -> bool:
        return fh in self._handles

    def open(self, uid: int) -> int:
        fh = self._next
        self._next += 1
        self._handles[fh] = _CtlHandle(uid)
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handles[fh]
        if h.result is None or offset == 0:
            body = h.result if h.result is not None else self.render(self.stats_dict())
            if offset == 0:
                h.result = body  # a read that continues at offset > 0 sees the same snapshot
        else:
            body = h.result
        return body[offset : offset + size]

    async def write(self, fh: int, data: bytes, uid: int) -> int:
        raise InvalidArgument("control commands are not supported yet")

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @staticmethod
    def render(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

    def stats_dict(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        volume = self.blocks.volume()
        size_limit = self.settings.cache_size if self.settings.cache_enabled else 0
        lookups = c[S.HITS] + c[S.MISSES]
        return {
            "source": self.source,
            "cache_dir": self.blocks.directory or None,
            "cache_size": size_limit,
            "cache_size_str": human_size(size_limit),
            "current_size": volume,
            "current_size_str": human_size(volume),
            "current_count": self.blocks.count(),
            "load_factor": round(volume / size_limit, 4) if size_limit else 0.0,
            "block_size": self.settings.block_size,
            "hits": c[S.HITS],
            "misses": c[S.MISSES],
            "hit_ratio": round(c[S.HITS] / lookups, 4) if lookups else 0.0,
            "bytes_served": c[S.BYTES_SERVED],
            "bytes_fetched": c[S.BYTES_FETCHED],
            "fetches": c[S.FETCHES],
            "fetches_in_flight": self.stats.fetches_in_flight,
            "evictions": self.blocks.evictions(),
            "readahead_blocks": c[S.READAHEAD_BLOCKS],
            "prefetch_queued": c[S.PREFETCH_QUEUED],
            "prefetch_done": c[S.PREFETCH_DONE],
            "prefetch_failed": c[S.PREFETCH_FAILED],
            "errors": c[S.ERRORS],
            "open_files": self.fs.open_handles,
            "uptime_s": round(time.monotonic() - self.stats.started, 1),
        }
