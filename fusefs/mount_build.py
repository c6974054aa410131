"""Builds one mount from its settings, in one place: store, caches, reader, filesystem,
write side, control file and FUSE adapter (:func:`build`). Nothing here mounts or serves:
:mod:`fusefs.mount` runs what this returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import stats as S
from .backends import ObjectStore, open_store
from .cache.blocks import BlockStore, DiskBlockStore, NullBlockStore
from .config import Settings
from .control import Control
from .ctlsocket import ControlSocket, socket_path
from .errors import UserError
from .fs import CONTROL_NAME, FileSystem
from .fuse_ops import FuseOperations
from .reader import Reader
from .safety import check_cache_dir
from .stats import Stats
from .workers.pool import FetchPool
from .write.staging import Staging
from .write.writes import Writes

#: Just-fetched blocks kept in memory (32 MiB with the default 8 MiB blocks).
RECENT_BLOCKS = 4

@dataclass
class Mount:
    """Everything one mount is made of."""

    source: str
    mountpoint: str
    settings: Settings
    store: ObjectStore
    blocks: BlockStore
    stats: Stats
    reader: Reader
    fs: FileSystem
    control: Control
    ops: FuseOperations
    extra_fuse_options: list[str] = field(default_factory=list)
    #: The Prometheus endpoint (``--metrics``), serving; None when off.
    metrics: Any = None
    #: Loads the settings again from the same layers (SIGHUP); None: nothing to re-read.
    reload_settings: Callable[[], Settings] | None = None
    #: The write side; None on a read-only mount.
    writes: Writes | None = None
    #: The control socket (read-only mounts: the kernel refuses writes to the control file).
    control_socket: ControlSocket | None = None
    #: The FUSE session was closed (unmounted) already.
    closed: bool = False


def build(
    source: str, mountpoint: str, settings: Settings, store: ObjectStore | None = None
) -> Mount:
    """Construct the store, caches, reader, filesystem and FUSE adapter for one mount.

    With ``--metrics``, the store is wrapped to time its requests, the adapter reports each
    request's duration, and ``/metrics`` is served from here on (UserError if it cannot be).
    """
    if settings.cache_enabled or not settings.read_only:
        check_cache_dir(settings.cache_dir)  # never trust what another user prepared there
    explicit_store = store is not None
    store = store or open_store(source, settings)
    metrics = None
    if settings.metrics:
        from .metrics import InstrumentedStore, Metrics

        metrics = Metrics(source)
        store = InstrumentedStore(store, metrics)
    blocks: BlockStore
    stats = Stats()
    if settings.cache_enabled:
        blocks = DiskBlockStore(settings.cache_dir, settings.cache_size,
                                on_corrupt=lambda: stats.add(S.CORRUPT_BLOCKS))
        # just-fetched blocks stay in memory a little: a sequential reader consumes each in
        # several requests, served without reading the block back from its cache file
        recent = RECENT_BLOCKS * settings.block_size
    else:
        blocks = NullBlockStore()
        recent = settings.readahead_max + 2 * settings.block_size
    pool = None
    if settings.fetch_workers > 0 and not explicit_store:
        # the workers build their own store from the source and settings: not for a store
        # handed in (tests, tools), which they could not rebuild
        pool = FetchPool(source, settings, settings.fetch_workers,
                         on_corrupt=lambda n: stats.add(S.CORRUPT_BLOCKS, n))
    reader = Reader(
        store,
        blocks,
        stats,
        block_size=settings.block_size,
        workers=settings.workers,
        readahead_max=settings.readahead_max,
        recent_bytes=recent,
        pool=pool,
    )
    fs = FileSystem(store, reader, settings)
    fs.folders.pool = pool
    writes = None
    if not settings.read_only:
        try:
            staging = Staging(settings.cache_dir, store.source_id)
        except OSError as exc:
            raise UserError(f"cannot use {settings.cache_dir} for staging writes: "
                            f"{exc.strerror} (mount with --read-only to only read)") from None
        writes = Writes(fs, store, settings, staging, CONTROL_NAME)
    control = Control(fs, reader, blocks, stats, settings, source, mountpoint=mountpoint)
    ctl_socket = None
    if settings.read_only:
        ctl_socket = ControlSocket(control, socket_path(settings.cache_dir, mountpoint))
        ctl_socket.bind()
        control.socket_path = ctl_socket.path
    ops = FuseOperations(fs, control)
    if metrics is not None and settings.metrics:
        metrics.add_stats(control.stats_dict)
        ops.observe = metrics.observe_fuse
        metrics.serve(settings.metrics)
    return Mount(
        source,
        mountpoint,
        settings,
        store,
        blocks,
        stats,
        reader,
        fs,
        control,
        ops,
        metrics=metrics,
        writes=writes,
        control_socket=ctl_socket,
    )
