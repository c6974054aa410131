"""The core without a kernel mount: scheduler, block store, reader, filesystem, settings."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusefs.backends.base import ListPage, ObjectInfo
from fusefs.backends.local import LocalStore
from fusefs.cache.blocks import BlockKey, DiskBlockStore
from fusefs.config import Settings, human_size, parse_size
from fusefs.errors import NotFound, StaleVersion, UserError
from fusefs.fs import FileSystem
from fusefs.reader import RANDOM_UNIT, Reader
from fusefs.scheduler import FOREGROUND, PREFETCH, READAHEAD, Scheduler, Ticket
from fusefs.stats import Stats

KiB = 1024


class CountingStore:
    """Wraps a real store; counts calls and can hold ranged reads until released."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.source_id = inner.source_id
        self.calls: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def check(self) -> None:
        self.inner.check()

    def head(self, key: str) -> ObjectInfo:
        with self._lock:
            self.calls["head"] += 1
        return self.inner.head(key)

    def list(
        self, prefix: str, *, max_keys: int | None = None, start_after: str = ""
    ) -> Iterator[ListPage]:
        with self._lock:
            self.calls["list"] += 1
        return self.inner.list(prefix, max_keys=max_keys, start_after=start_after)

    def get_range(self, key: str, start: int, length: int, version: str) -> bytes:
        self.gate.wait(10)
        with self._lock:
            self.calls["get"] += 1
            self.calls["get_bytes"] += length
        return self.inner.get_range(key, start, length, version)


@pytest.fixture
def objects(tmp_path: Path) -> Path:
    root = tmp_path / "objects"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a.bin").write_bytes(os.urandom(300 * KiB))
    (root / "small.txt").write_bytes(b"hello")
    return root


def make_reader(store: CountingStore, cache: Path, block: int = 64 * KiB) -> Reader:
    blocks = DiskBlockStore(str(cache), 10 * 1024 * KiB)
    return Reader(store, blocks, Stats(), block_size=block, workers=4, readahead_max=4 * block)


# --- scheduler ---------------------------------------------------------------------------


def test_scheduler_demand_first_and_background_never_holds_a_demand_slot() -> None:
    """One demand slot and one background slot: a held background fetch never delays a
    read; a freed background slot stays unused while a read waits; reads go in priority order."""
    order: list[str] = []

    async def main() -> None:
        import trio.testing

        sched = Scheduler(1, 1)
        gates = {name: trio.Event() for name in ("bg1", "d1")}

        async def job(name: str, prio: int) -> None:
            async with sched.slot(Ticket(prio)):
                order.append(name)
                if name in gates:
                    await gates[name].wait()

        async with trio.open_nursery() as n:
            n.start_soon(job, "bg1", PREFETCH)  # holds the background slot
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(job, "d1", FOREGROUND)  # not behind it: its own pool
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["bg1", "d1"] and sched.running == 2
            for name, prio in (("bg2", PREFETCH), ("ra", READAHEAD), ("d2", FOREGROUND)):
                n.start_soon(job, name, prio)  # trio randomises start order: one at a time
                await trio.testing.wait_all_tasks_blocked()
            gates["bg1"].set()  # the background slot is free, but reads wait: it stays free
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["bg1", "d1"] and sched.running == 1
            assert sched.waiting(PREFETCH) == 1 and sched.waiting() == 3
            gates["d1"].set()
        assert sched.running == 0

    trio.run(main)
    # d2 before ra (priority); bg2 only once no read waited (with ra: the pools are separate)
    assert order[:3] == ["bg1", "d1", "d2"] and sorted(order[3:]) == ["bg2", "ra"]


def test_scheduler_boost_and_cancel_pass_the_slot_on() -> None:
    order: list[str] = []

    async def main() -> None:
        import trio.testing

        sched = Scheduler(1)
        release = trio.Event()
        boosted = Ticket(PREFETCH)

        async def hold() -> None:
            async with sched.slot(Ticket(FOREGROUND)):
                order.append("hold")
                await release.wait()

        async def job(name: str, ticket: Ticket) -> None:
            async with sched.slot(ticket):
                order.append(name)

        async with trio.open_nursery() as n:
            n.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(job, "readahead", Ticket(READAHEAD))
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(job, "boosted", boosted)
            with trio.CancelScope() as doomed:
                doomed.cancel()
                await job("cancelled", Ticket(FOREGROUND))  # cancelled while waiting
            await trio.testing.wait_all_tasks_blocked()
            sched.boost(boosted, FOREGROUND)
            release.set()
        assert sched.running == 0

    trio.run(main)
    assert order == ["hold", "boosted", "readahead"]


# --- block store -------------------------------------------------------------------------


def test_block_store_keys_carry_version_and_reads_are_exact(tmp_path: Path) -> None:
    store = DiskBlockStore(str(tmp_path / "c"), 64 * 1024 * KiB)
    k1 = BlockKey("s3://b", "k", '"etag1"', 1024, 0)
    k2 = BlockKey("s3://b", "k", '"etag2"', 1024, 0)
    store.put(k1, b"a" * 1024)
    assert store.read(k1, 10, 5) == b"aaaaa"
    assert store.read(k2, 0, 5) is None  # a new version never sees old bytes
    store.put(k2, b"b" * 1024)
    assert store.read(k2, 1020, 100) == b"bbbb"  # clipped to the block
    assert store.evict_object("s3://b", "k") == 2
    assert store.read(k1, 0, 1) is None and store.read(k2, 0, 1) is None


def test_block_store_bound_lru_and_eviction_seen_by_open_files(tmp_path: Path) -> None:
    block = 64 * KiB
    store = DiskBlockStore(str(tmp_path / "c"), 8 * block, touch_interval=0)
    keys = [BlockKey("src", f"k{i}", "v", block, 0) for i in range(30)]
    store.put(keys[0], b"0" * block)
    assert store.read(keys[0], 0, 4) == b"0000"  # now held open for pread
    for i, k in enumerate(keys[1:], 1):
        store.put(k, bytes([i]) * block)
        store.read(keys[1], 0, 1)  # k1 is read through its open file (no SQLite write)...
        store.maybe_touch()  # ...and its access time refreshed in the batch
        assert store.volume() <= 8 * block + block + 256 * KiB
    assert store.read(keys[0], 0, 4) is None  # evicted although its file was open
    assert store.read(keys[1], 0, 1) == b"\x01"  # recently used: kept
    assert store.read(keys[-1], 0, 1) == bytes([29])
    assert store.evictions() > 0


# --- reader ------------------------------------------------------------------------------


def test_concurrent_misses_make_one_fetch(objects: Path, tmp_path: Path) -> None:
    store = CountingStore(LocalStore(str(objects)))
    reader = make_reader(store, tmp_path / "cache")
    info = store.inner.head("d/a.bin")
    data = (objects / "d/a.bin").read_bytes()
    results: list[bytes] = []

    async def main() -> None:
        import trio.testing

        store.gate.clear()  # hold the first GET until every reader is waiting
        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(lambda: _read(reader, info, 1000, 5000, results))
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            await trio.to_thread.run_sync(store.gate.set)

    trio.run(main)
    assert results == [data[1000:6000]] * 10
    assert store.calls["get"] == 1


async def _read(reader: Reader, info: ObjectInfo, off: int, size: int, out: list[bytes]) -> None:
    out.append(await reader.read(info, off, size))


def test_cold_small_file_costs_one_thread_hop_and_one_index_write(
    objects: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon CPU per small file: a cold read is one worker-thread hop (cache lookup, GET and
    store in the same thread) and one index write; once the block is open, no hop at all."""
    import diskcache

    from fusefs import threads

    store = CountingStore(LocalStore(str(objects)))
    reader = make_reader(store, tmp_path / "cache")
    info = store.inner.head("small.txt")
    counts: Counter[str] = Counter()
    real_run_sync, real_set = threads.run_sync, diskcache.Cache.set

    async def counting_run_sync(*args: object, **kwargs: object) -> object:
        counts["hops"] += 1
        return await real_run_sync(*args, **kwargs)  # type: ignore[arg-type]

    def counting_set(self: diskcache.Cache, *args: object, **kwargs: object) -> object:
        counts["index_writes"] += 1
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(threads, "run_sync", counting_run_sync)
    monkeypatch.setattr(diskcache.Cache, "set", counting_set)
    seen: list[Counter[str]] = []

    async def main() -> None:
        for _ in range(3):
            out: list[bytes] = []
            await _read(reader, info, 0, 4096, out)
            assert out == [b"hello"]
            seen.append(counts.copy())

    trio.run(main)
    assert seen[0] == Counter(hops=1, index_writes=1)  # cold: one hop, one write
    assert seen[1] == Counter(hops=2, index_writes=1)  # cached, not open: opened in one hop
    assert seen[2] == seen[1]  # open: served on the event loop
    assert store.calls["get"] == 1


def test_sequential_reader_gets_readahead_random_does_not(objects: Path, tmp_path: Path) -> None:
    store = CountingStore(LocalStore(str(objects)))
    reader = make_reader(store, tmp_path / "cache", block=256 * KiB)
    (objects / "big.bin").write_bytes(os.urandom(24 * 1024 * KiB))
    info = store.inner.head("big.bin")
    data = (objects / "big.bin").read_bytes()

    async def main() -> None:
        from fusefs.reader import SeqState

        async with trio.open_nursery() as n:
            reader.start(n)
            seq = SeqState()
            got = await reader.read(info, 0, 4096, seq)
            assert got == data[:4096]
            await trio.sleep(0.3)
            assert reader.stats["readahead_blocks"] >= 1  # the next block was fetched ahead
            rnd = SeqState(next_offset=-1)
            before = reader.stats["readahead_blocks"]
            fetched = store.calls["get_bytes"]
            for off in (20 * 1024 * KiB, 6 * 1024 * KiB, 13 * 1024 * KiB + 127 * KiB):
                assert bytes(await reader.read(info, off, 4096, rnd)) == data[off : off + 4096]
            await trio.sleep(0.2)
            assert reader.stats["readahead_blocks"] == before
            # random reads fetch small units (the last one straddles two), not 256 KiB blocks
            assert store.calls["get_bytes"] - fetched == 4 * RANDOM_UNIT
            assert rnd.random
            # the same ranges again are cache hits
            calls = store.calls["get"]
            assert bytes(await reader.read(info, 6 * 1024 * KiB, 4096, rnd)) == (
                data[6 * 1024 * KiB : 6 * 1024 * KiB + 4096])
            assert store.calls["get"] == calls
            n.cancel_scope.cancel()

    trio.run(main)


def test_changed_object_raises_stale_not_mixed_bytes(objects: Path, tmp_path: Path) -> None:
    store = CountingStore(LocalStore(str(objects)))
    reader = make_reader(store, tmp_path / "cache")
    info = store.inner.head("d/a.bin")
    (objects / "d/a.bin").write_bytes(b"new content")

    async def main() -> None:
        with pytest.raises(StaleVersion):
            await reader.read(info, 0, 10)

    trio.run(main)


def test_filesystem_lookup_uses_listing_and_negative_cache(
    objects: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountingStore(LocalStore(str(objects)))
    reader = make_reader(store, tmp_path / "cache")
    fs = FileSystem(store, reader, Settings(metadata_ttl=60, negative_ttl=60))
    for i in range(5):
        (objects / "d" / f"n{i}").write_bytes(b"n")

    async def main() -> None:
        names = [e.path for e in await fs.entries("")]
        assert names == ["d", "small.txt"]
        calls = store.calls.copy()
        node = await fs.lookup(1, "small.txt")
        assert node.info is not None and node.info.size == 5
        with pytest.raises(NotFound):
            await fs.lookup(1, "missing")
        assert store.calls == calls  # answered from the listing
        d = await fs.lookup(1, "d")
        # lookups in a folder not listed yet: one listing page answers them all, no HEAD
        for i in range(5):
            assert (await fs.lookup(d.ino, f"n{i}")).info is not None
        with pytest.raises(NotFound):
            await fs.lookup(d.ino, "nope")
        # (one HEAD: the folder's marker "d/", for its mode and owner, at its lookup)
        assert store.calls["list"] - calls["list"] == 1
        assert store.calls["head"] == calls["head"] + 1
        fh, keep = await fs.open(node.ino, os.O_RDONLY)
        assert keep is False  # first open: the kernel holds nothing yet
        assert bytes(await fs.read(fh, 0, 100)) == b"hello"
        fh2, keep2 = await fs.open(node.ino, os.O_RDONLY)
        assert keep2 is True  # same version: the kernel may keep its pages
        assert (await fs.lookup(1, "small.txt")).ino == node.ino  # stable inode

    trio.run(main)


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("32G", 32 * 2**30), ("512M", 512 * 2**20), ("4MiB", 4 * 2**20), ("100", 100),
     ("1.5K", 1536), ("0", 0), ("-1", -1), ("2gb", 2 * 2**30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_garbage_and_human_size() -> None:
    with pytest.raises(ValueError):
        parse_size("lots")
    assert human_size(32 * 2**30) == "32.0GB"
    assert human_size(512) == "512B"


def test_bad_setting_names_its_source(tmp_path: Path) -> None:
    from fusefs.config import load_settings

    with pytest.raises(UserError, match="FUSEFS_CACHE_SIZE_BYTES"):
        load_settings({}, env={"FUSEFS_CACHE_SIZE_BYTES": "huge"}, config_path=os.devnull)
    with pytest.raises(UserError, match="--block-size"):
        load_settings({"block_size": "1"}, env={}, config_path=os.devnull)


@pytest.mark.parametrize(
    "text",
    ["2026-11-21T21:00:00.000Z", "2026-11-21T21:00:00Z", "2026-11-21T21:00:00+00:00",
     "Sat, 21 Nov 2026 21:00:00 GMT"],
)
def test_s3_timestamps_parse_as_listed_and_as_headers(text: str) -> None:
    from fusefs.backends.s3 import epoch

    assert epoch(text) == 1795294800.0


@pytest.mark.parametrize(("workers", "tasks"), [(1, 1), (2, 1), (4, 2), (16, 14), (64, 56)])
def test_prefetch_leaves_connections_to_programs(workers: int, tasks: int) -> None:
    from fusefs.config import prefetch_concurrency

    assert prefetch_concurrency(workers) == tasks
