"""The statistics the control file shows: what ``stats`` (and a plain read) return.

:class:`ControlStats` is a part of :class:`fusefs.control.Control` (its base class): it reads
the state the control object holds (declared below) and changes none of it. Runs on the trio
thread; every figure is a snapshot taken without awaiting.
"""

from __future__ import annotations

import time
from typing import Any

from . import stats as S
from .cache.blocks import BlockStore
from .config import Settings, human_size
from .fs import FileSystem
from .hints import HintStreams
from .prefetch import Prefetcher
from .reader import Reader


class ControlStats:
    """Statistics rendering of the control file (JSON-able dicts)."""

    # the control object's state, set by Control.__init__
    fs: FileSystem
    reader: Reader
    blocks: BlockStore
    stats: S.Stats
    settings: Settings
    source: str
    prefetcher: Prefetcher
    hints: HintStreams
    socket_path: str | None
    _cleared: int  # blocks removed by ``clear``: not evictions


    def stats_dict(self) -> dict[str, Any]:
        c = self.stats.snapshot()
        volume = self.blocks.volume()
        size_limit = self.settings.cache_size if self.settings.cache_enabled else 0
        lookups = c[S.HITS] + c[S.MISSES]
        streams = self.hints.as_list()
        return {
            "source": self.source,
            "cache_dir": self.blocks.directory or None,
            "control_socket": self.socket_path,
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
            "evictions": max(0, self.blocks.evictions() - self._cleared),
            "readahead_blocks": c[S.READAHEAD_BLOCKS],
            "corrupt_blocks": c[S.CORRUPT_BLOCKS],
            **self.prefetcher.totals(),
            "errors": c[S.ERRORS],
            "open_files": self.fs.open_handles,
            "uptime_s": round(time.monotonic() - self.stats.started, 1),
            **self.request_stats(),
            **self.worker_stats(),
            "prefetch_requests": self.prefetcher.requests(),
            "hint_window_limited": any(st["limited_by_cache"] for st in streams),
            "hint_streams": streams,
            **self.write_stats(),
        }

    def counters(self) -> dict[str, Any]:
        """The statistics another user (not the mounting user, not root) may read: counters
        and sizes only, no path, prefetch request or hint stream (they may not be allowed to
        list them), no cache directory."""
        out = {k: v for k, v in self.stats_dict().items()
               if not isinstance(v, (list, dict)) and k != "hint_window_limited"}
        return {**out, "cache_dir": None}

    def request_stats(self) -> dict[str, Any]:
        """FUSE requests by kind and the daemon's CPU time (a reader of the stats sees its own
        LOOKUP/OPEN/READ of the control file counted)."""
        requests = self.stats.request_counts()
        cpu, loop = self.stats.cpu()
        return {
            "fuse_requests": requests,
            "fuse_requests_total": sum(requests.values()),
            "cpu_s": round(cpu, 4),
            "cpu_loop_s": None if loop is None else round(loop, 4),
        }

    def worker_stats(self) -> dict[str, Any]:
        """The worker processes (``--fetch-workers``): how many serve, their pids, the
        blocks they fetched or found cached, the uploads and listings they sent, restarts,
        requests sent again after a worker died, and their CPU seconds (as of each one's
        last reply)."""
        pool = self.reader.pool
        if pool is None:
            return {"fetch_workers": 0, "workers_ready": 0, "worker_pids": [],
                    "worker_fetches": 0, "worker_uploads": 0, "worker_lists": 0,
                    "worker_hits": 0,
                    "worker_restarts": 0, "worker_retries": 0, "worker_cpu_s": 0.0}
        return {
            "fetch_workers": 0 if pool.broken else pool.count,
            "workers_ready": pool.ready(),
            "worker_pids": pool.pids(),
            "worker_fetches": pool.fetches,
            "worker_uploads": pool.puts,
            "worker_lists": pool.lists,
            "worker_hits": pool.hits,
            "worker_restarts": pool.restarts,
            "worker_retries": pool.retries,
            "worker_cpu_s": round(pool.cpu_s(), 4),
        }

    def write_stats(self) -> dict[str, Any]:
        w = self.fs.writes
        if w is None:
            return {"staged_bytes": 0, "uploads_pending": 0, "uploads_done": 0,
                    "uploads_failed": 0, "upload_bytes": 0, "conflicts": 0,
                    "deletes_pending": 0}
        u = w.uploads
        return {
            "staged_bytes": w.staging.staged_bytes(),
            "uploads_pending": u.pending,
            "uploads_in_flight": u.in_flight,
            "uploads_done": u.done,
            "uploads_failed": len(u.failed),
            "upload_bytes": u.bytes,
            "conflicts": u.conflicts,
            "deletes_pending": len(w.deletes.entries),
        }

    def upload_state(self, path: str) -> dict[str, Any]:
        """A file's upload state for ``stats PATH``."""
        w = self.fs.writes
        sf = w.staged(path) if w is not None else None
        if sf is None:
            return {"upload": "none"}
        if sf.rec.state in ("failed", "conflict"):
            state = sf.rec.state
        elif sf.busy is not None:
            state = "uploading"
        elif sf.needs_upload:
            state = "open" if sf.writers else "pending"
        else:
            state = "uploaded"
        out: dict[str, Any] = {"upload": state, "staged_size": sf.size}
        if sf.rec.error:
            out["upload_error"] = sf.rec.error
        return out
