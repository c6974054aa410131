"""The block store without a kernel mount: size bound, permissions, concurrency, checksums,
damaged caches. Mount-level tests of the same properties are at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Bucket, blob, drop_page_cache, make_local_bucket

from fusefs.cache.blocks import BlockKey, DiskBlockStore

KiB = 1024
MiB = 1024 * KiB


def block_files_bytes(directory: Path) -> int:
    """Bytes of the block files under ``directory`` (everything but the SQLite index)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            if not name.startswith("cache.db"):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def pattern(key: BlockKey, n: int) -> bytes:
    """Content of a test block, derived from its key so any mix-up is visible."""
    seed = (key.cache_key * (n // len(key.cache_key) + 1)).encode()
    return seed[:n]


# --- size bound ------------------------------------------------------------------------------


def test_bound_holds_for_small_items_then_big_blocks(tmp_path: Path) -> None:
    """Many small blocks, then big ones: each put frees as much as it needs (issue 8 item 1:
    two small items culled per 8 MiB block let the cache grow to 490% of its bound)."""
    limit = 4 * MiB
    store = DiskBlockStore(str(tmp_path / "c"), limit)
    small = [BlockKey("src", f"small/{i}", "v", 40 * KiB, 0) for i in range(100)]
    units = [BlockKey("src", "rand", "v", 128 * KiB, i) for i in range(30)]
    big = [BlockKey("src", "big", "v", MiB, i) for i in range(24)]
    for k in [*small, *units, *big]:
        store.put(k, pattern(k, k.block_size))
        assert block_files_bytes(tmp_path / "c") <= limit
        assert store.volume() <= limit + 256 * KiB
    assert store.read(big[-1], 0, 100) == pattern(big[-1], 100)  # the newest stays
    store.close()


def test_blocks_kept_inside_sqlite_count_their_bytes_when_culled(tmp_path: Path) -> None:
    """Blocks under 32 KiB live inside SQLite, where diskcache records size 0: a cull that
    counted that size evicted every one of them, and the big block just stored with them."""
    limit = 16 * MiB
    store = DiskBlockStore(str(tmp_path / "c"), limit)
    tiny = [BlockKey("src", f"tiny/{i}", "v", 10_000, 0) for i in range(1000)]
    for k in tiny:
        store.put(k, pattern(k, 10_000))
    big = BlockKey("src", "big", "v", 8 * MiB, 0)
    store.put(big, pattern(big, 8 * MiB))
    assert store.read(big, 0, 100) == pattern(big, 100)  # evicted with the rest before
    assert store.count() > 700  # about 2 MiB of tiny blocks had to go, not all 10 MB
    assert store.volume() <= limit + 256 * KiB
    store.close()


def test_bound_holds_with_two_stores_on_one_directory(tmp_path: Path) -> None:
    """Two stores (as two mounts) sharing a directory keep it within the bound together."""
    limit = 4 * MiB
    a = DiskBlockStore(str(tmp_path / "c"), limit)
    b = DiskBlockStore(str(tmp_path / "c"), limit)
    for i in range(60):
        ka = BlockKey("a", f"small/{i}", "v", 48 * KiB, 0)
        a.put(ka, pattern(ka, ka.block_size))
        if i % 4 == 0:
            kb = BlockKey("b", "big", "v", MiB, i)
            b.put(kb, pattern(kb, kb.block_size))
        assert block_files_bytes(tmp_path / "c") <= limit
    a.close()
    b.close()


def deleted_files_held_open(directory: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and target.endswith("(deleted)"):
                out.append(target)
    return out


def test_evicted_blocks_held_open_are_closed(tmp_path: Path) -> None:
    """Blocks open for pread that the bound evicts are closed at once: their disk space is
    part of the bound, not held until they would next be read."""
    store = DiskBlockStore(str(tmp_path / "c"), 4 * MiB)
    keys = [BlockKey("src", "k", "v", MiB, i) for i in range(12)]
    for k in keys:
        store.put(k, pattern(k, MiB))
        assert store.read(k, 0, 10) == pattern(k, 10)  # now held open
    assert deleted_files_held_open(tmp_path / "c") == []
    store.close()


# --- checksums -------------------------------------------------------------------------------


def block_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_damaged_truncated_and_missing_blocks_are_misses(tmp_path: Path) -> None:
    """Issue 10 item 1: a flipped bit in the data or the trailer, a truncated file and a
    deleted one are each a miss (never wrong bytes), counted, and gone from the index."""
    corrupt: list[int] = []
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB)
    keys = [BlockKey("src", "k", "v", MiB, i) for i in range(6)]
    for k in keys:
        store.put(k, pattern(k, MiB))
    store.close()
    files = {f.stat().st_ino: f for f in block_files(tmp_path / "c")}
    assert len(files) == 6
    victims = list(files.values())
    flip(victims[0], 5)  # first unit
    flip(victims[1], MiB - 1)  # last unit
    flip(victims[2], MiB + 3)  # a digest
    os.truncate(victims[3], MiB // 2)
    victims[4].unlink()
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB, on_corrupt=lambda: corrupt.append(1))
    got = {k.index: store.read(k, 0, MiB) for k in keys}
    good = [i for i, d in got.items() if d is not None]
    assert len(good) == 1 and got[good[0]] == pattern(keys[good[0]], MiB)
    assert len(corrupt) == 5
    assert sum(store.contains(k) for k in keys) == 1  # deleted from the index
    assert len(block_files(tmp_path / "c")) == 1
    for k in keys:  # refetched and stored again: served right
        store.put(k, pattern(k, MiB))
        assert store.read(k, 12345, 4096) == pattern(k, MiB)[12345:12345 + 4096]
    store.close()


def test_damage_under_an_open_block_is_seen_on_the_next_read(tmp_path: Path) -> None:
    corrupt: list[int] = []
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB, on_corrupt=lambda: corrupt.append(1))
    k = BlockKey("src", "k", "v", MiB, 0)
    store.put(k, pattern(k, MiB))
    assert store.read(k, 0, 4096) == pattern(k, 4096)  # held open now
    (victim,) = block_files(tmp_path / "c")
    flip(victim, 200 * KiB)
    assert store.read(k, 0, 4096) == pattern(k, 4096)  # another unit: still fine
    assert store.read(k, 190 * KiB, 4096) is None  # the damaged unit: a miss
    assert corrupt == [1]
    assert store.read(k, 0, 4096) is None  # the whole block is dropped
    store.flush()
    assert not store.contains(k)
    store.close()


def test_small_blocks_inside_sqlite_are_checked(tmp_path: Path) -> None:
    corrupt: list[int] = []
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB, on_corrupt=lambda: corrupt.append(1))
    k = BlockKey("src", "small", "v", 1000, 0)
    store.put(k, pattern(k, 1000))
    assert store.read(k, 10, 20) == pattern(k, 1000)[10:30]
    store.close()
    con = sqlite3.connect(tmp_path / "c" / "cache.db")
    (value,) = con.execute("SELECT value FROM Cache").fetchone()
    bad = bytearray(value)
    bad[7] ^= 1
    con.execute("UPDATE Cache SET value = ?", (bytes(bad),))
    con.commit()
    con.close()
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB, on_corrupt=lambda: corrupt.append(1))
    assert store.read(k, 10, 20) is None
    assert corrupt == [1]
    store.close()


def test_blocks_of_the_old_layout_are_plain_misses(tmp_path: Path) -> None:
    """A cache written before checksums (bare blocks, 5-element keys) is read as empty."""
    import diskcache

    old = diskcache.Cache(str(tmp_path / "c"), eviction_policy="least-recently-used",
                          tag_index=True, disk_min_file_size=32 * KiB)
    legacy_key = '["src", "k", "v", 1048576, 0]'
    old.set(legacy_key, b"x" * MiB)
    old.close()
    corrupt: list[int] = []
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB, on_corrupt=lambda: corrupt.append(1))
    k = BlockKey("src", "k", "v", MiB, 0)
    assert store.read(k, 0, 10) is None
    assert corrupt == []
    store.put(k, pattern(k, MiB))
    assert store.read(k, 0, 10) == pattern(k, 10)
    store.close()


# --- permissions -----------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    """Permission bits of ``directory`` and everything below it, by relative path."""
    out = {".": directory.stat().st_mode & 0o777}
    for p in directory.rglob("*"):
        out[str(p.relative_to(directory))] = p.stat().st_mode & 0o777
    return out


def assert_private(directory: Path) -> None:
    found = modes(directory)
    assert any(name.endswith(".val") for name in found), found  # block files were checked
    for name, mode in found.items():
        want = 0o700 if (directory / name).is_dir() else 0o600
        assert mode == want, (name, oct(mode))


def test_directory_and_files_private_whatever_the_umask(tmp_path: Path) -> None:
    with umask(0):
        store = DiskBlockStore(str(tmp_path / "parent" / "c"), 8 * MiB)
        for i, n in enumerate([100, 40 * KiB, MiB]):  # in SQLite, and files
            k = BlockKey("src", f"k{i}", "v", n, 0)
            store.put(k, pattern(k, n))
            assert store.read(k, 0, n) == pattern(k, n)
    store.close()
    assert_private(tmp_path / "parent" / "c")


def test_warns_once_about_a_directory_others_can_enter(tmp_path: Path, caplog) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    caplog.set_level(logging.WARNING, logger="fusefs.cache")
    for _ in range(2):
        DiskBlockStore(str(d), 8 * MiB).close()
    lines = [r for r in caplog.records if "other local users" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert d.stat().st_mode & 0o777 == 0o755  # the operator's choice is left alone
    private = tmp_path / "private"
    DiskBlockStore(str(private), 8 * MiB).close()
    assert len([r for r in caplog.records if "other local users" in r.getMessage()]) == 1


# --- concurrency ---------------------------------------------------------------------------


def test_no_wrong_bytes_while_entries_are_closed_under_readers(tmp_path: Path) -> None:
    """Issue 8 item 7: readers pread open block files while other threads close them (open-file
    limit, drop, evict, clear) and open others, which reuse the freed descriptor numbers. Every
    byte returned must be its own block's; a miss (None) is allowed."""
    block = 64 * KiB
    store = DiskBlockStore(str(tmp_path / "c"), 256 * MiB, max_open=3)
    keys = [BlockKey("src", f"k{i % 6}", "v", block, i) for i in range(24)]
    for k in keys:
        store.put(k, pattern(k, block))
    stop = threading.Event()
    wrong: list[str] = []
    reads = [0]

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            k = rnd.choice(keys)
            off = rnd.randrange(0, block - 4096)
            got = store.read(k, off, 4096)
            reads[0] += 1
            if got is not None and got != pattern(k, block)[off:off + 4096]:
                wrong.append(f"{k.key}/{k.index}@{off}")

    def churn(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            k = rnd.choice(keys)
            what = rnd.random()
            if what < 0.1:
                store.evict_object("src", k.key)
            elif what < 0.12:
                store.clear()
            else:
                store.put(k, pattern(k, block))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: widen every window
    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=churn, args=(100 + i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not wrong and reads[0] < 40_000:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
        store.close()
    assert not wrong, f"{len(wrong)} reads returned another block's bytes, e.g. {wrong[:3]}"
    assert reads[0] > 1000


# --- on real mounts ----------------------------------------------------------------------------


def test_mount_bound_holds_for_small_files_then_a_big_one(local_bucket: Bucket, mount,
                                                        tmp_path: Path) -> None:
    """Issue 8 item 1 on a mount: one-block small files fill the cache, then a big file is
    read; the cache directory stays within --cache-size plus one block per worker."""
    limit, block, workers = 4 * MiB, MiB, 2
    small = {f"s/{i}": blob(60 * KiB, seed=i) for i in range(70)}
    big = blob(12 * MiB, seed=99)
    for k, d in small.items():
        local_bucket.put(k, d)
    local_bucket.put("big", big)
    m = mount(local_bucket, "--cache-size", str(limit), "--block-size", str(block),
              "--workers", str(workers))
    for k, d in small.items():
        assert (m.path / k).read_bytes() == d
    assert block_files_bytes(tmp_path / "cache") <= limit
    assert (m.path / "big").read_bytes() == big
    assert block_files_bytes(tmp_path / "cache") <= limit + workers * block
    assert m.stats()["current_size"] <= limit + workers * block


def test_mount_bound_holds_for_two_mounts_sharing_a_directory(mount, tmp_path: Path) -> None:
    """Mount A fills the shared directory with small files, then mount B reads big ones."""
    limit, block, workers = 4 * MiB, MiB, 2
    a, b = make_local_bucket(tmp_path / "a"), make_local_bucket(tmp_path / "b")
    small = {f"s/{i}": blob(50 * KiB, seed=i) for i in range(80)}
    bigs = {f"big{i}": blob(3 * MiB, seed=100 + i) for i in range(4)}
    for k, d in small.items():
        a.put(k, d)
    for k, d in bigs.items():
        b.put(k, d)
    args = ["--cache-size", str(limit), "--block-size", str(block), "--workers", str(workers)]
    ma, mb = mount(a, *args), mount(b, *args)
    for k, d in small.items():
        assert (ma.path / k).read_bytes() == d
    for k, d in bigs.items():
        assert (mb.path / k).read_bytes() == d
        assert block_files_bytes(tmp_path / "cache") <= limit + workers * block
    assert (ma.path / "s/0").read_bytes() == small["s/0"]
    assert block_files_bytes(tmp_path / "cache") <= limit + workers * block


def test_mount_cache_private_under_a_permissive_umask(local_bucket: Bucket, mount,
                                                     tmp_path: Path) -> None:
    """Issue 8 item 4: a mount started with umask 000 still keeps its cache 0700/0600."""
    data = {f"f{i}": blob(n, seed=i) for i, n in enumerate([10, 100 * KiB, 3 * MiB])}
    for k, d in data.items():
        local_bucket.put(k, d)
    with umask(0):
        m = mount(local_bucket, "--block-size", str(MiB))
    for k, d in data.items():
        assert (m.path / k).read_bytes() == d
    m.stop()
    assert_private(tmp_path / "cache")
    assert "other local users" not in m.log_text()


def test_mount_warns_once_about_an_open_cache_directory(local_bucket: Bucket, mount,
                                                       tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir(mode=0o755)
    (tmp_path / "cache").chmod(0o755)
    local_bucket.put("f", b"x" * 100_000)
    m = mount(local_bucket)
    assert (m.path / "f").read_bytes() == b"x" * 100_000
    m.stop()
    assert m.log_text().count("other local users may read cached data") == 1


def test_mount_refetches_damaged_truncated_and_missing_blocks(s3_bucket: Bucket, mount,
                                                             tmp_path: Path) -> None:
    """Issue 10 item 1 on a mount: blocks damaged on disk between two mounts are served right
    (fetched again: one GET each), and counted in corrupt_blocks."""
    files = {f"d/f{i}": blob(2 * MiB + 40 * KiB + 1000 * i, seed=i) for i in range(4)}
    for k, d in files.items():
        s3_bucket.put(k, d)
    args = ["--block-size", str(MiB)]
    m = mount(s3_bucket, *args)
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    m.stop()
    victims = block_files(tmp_path / "cache")
    assert len(victims) == 12
    rnd = random.Random(7)
    rnd.shuffle(victims)
    for v in victims[:3]:
        flip(v, rnd.randrange(v.stat().st_size))  # anywhere: data or trailer
    os.truncate(victims[3], victims[3].stat().st_size - 1)
    victims[4].unlink()
    gets = s3_bucket.object_gets()
    m = mount(s3_bucket, *args)
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    s = m.stats()
    assert s["corrupt_blocks"] == 5, s
    assert s3_bucket.object_gets() == gets + 5
    assert m.log_text().count("is damaged") == 5
    m.stop()
    # and the refetched blocks were stored again: a third mount reads without a GET
    gets = s3_bucket.object_gets()
    m = mount(s3_bucket, *args)
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    assert s3_bucket.object_gets() == gets
    assert m.stats()["corrupt_blocks"] == 0


def test_mount_keeps_serving_while_the_cache_index_is_locked(local_bucket: Bucket, mount,
                                                            tmp_path: Path) -> None:
    """Issue 10 item 5: while another process holds SQLite's write lock on the cache index (a
    busy shared directory, a long checkpoint), a read that must store a block waits in a
    worker thread; lookups, other reads and the control file keep answering meanwhile, and a
    cached block is opened without the write lock."""
    data = {k: blob(3 * MiB, seed=i) for i, k in enumerate(["a", "b", "c"])}
    for k, d in data.items():
        local_bucket.put(k, d)
    m = mount(local_bucket, "--block-size", str(MiB))
    assert (m.path / "a").read_bytes() == data["a"]
    m.stop()
    m = mount(local_bucket, "--block-size", str(MiB))  # cached on disk, nothing open yet
    assert (m.path / "b").read_bytes() == data["b"]  # fetched: b's blocks are open now
    con = sqlite3.connect(tmp_path / "cache" / "cache.db", timeout=0, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")  # the write lock every diskcache set needs
    got: dict[str, object] = {}
    try:
        slow = threading.Thread(target=lambda: got.update(c=(m.path / "c").read_bytes()))
        slow.start()
        time.sleep(1)  # let that read reach SQLite and wait there

        def meanwhile() -> None:
            got["stat"] = os.stat(m.path / "b").st_size
            got["list"] = sorted(os.listdir(m.path))
            drop_page_cache(m.path / "b")
            got["b"] = (m.path / "b").read_bytes()  # open block files: no SQLite
            got["a"] = (m.path / "a").read_bytes()  # cached, not open: a read, no lock
            got["stats"] = m.stats()["current_count"]

        t = threading.Thread(target=meanwhile)
        t.start()
        t.join(timeout=20)  # SQLite's busy timeout is 60 s: a stalled loop would still wait
        assert not t.is_alive(), "the mount stopped answering while the cache index was locked"
        assert "c" not in got  # the lock really was in the way
    finally:
        con.execute("ROLLBACK")
        con.close()
    slow.join(timeout=60)
    assert got["stat"] == 3 * MiB and got["list"] == ["a", "b", "c"] and got["b"] == data["b"]
    assert got["a"] == data["a"] and got["c"] == data["c"]


def _garbage_index(cache: Path) -> None:
    (cache / "cache.db").write_bytes(random.Random(1).randbytes(64 * KiB))


def _truncated_index(cache: Path) -> None:
    db = cache / "cache.db"
    os.truncate(db, db.stat().st_size // 2)


def _other_version(cache: Path) -> None:
    (cache / "fusefs-cache.json").write_text('{"format": 99}')


def _unreadable_marker(cache: Path) -> None:
    (cache / "fusefs-cache.json").write_bytes(b"\x00garbage")


@pytest.mark.parametrize("damage", [_garbage_index, _truncated_index, _other_version,
                                    _unreadable_marker])
def test_mount_starts_over_a_broken_cache(s3_bucket: Bucket, mount, tmp_path: Path,
                                          damage: Callable[[Path], None]) -> None:
    """Issue 10 item 6: a damaged index or a cache of another format: the mount starts, logs
    one line, moves the old contents aside and serves from the store; the new cache works."""
    files = {f"f{i}": blob(MiB + 100 * KiB, seed=i) for i in range(3)}
    for k, d in files.items():
        s3_bucket.put(k, d)
    args = ["--block-size", str(MiB)]
    m = mount(s3_bucket, *args)
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    m.stop()
    cache = tmp_path / "cache"
    for wal in ("cache.db-wal", "cache.db-shm"):
        assert not (cache / wal).exists()  # a clean unmount checkpointed the index
    damage(cache)
    gets = s3_bucket.object_gets()
    m = mount(s3_bucket, *args)
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    assert s3_bucket.object_gets() == gets + 6  # every block fetched again
    m.stop()
    assert m.log_text().count("moved its contents to") == 1, m.log_text()[-2000:]
    (aside,) = cache.glob(".broken-*")
    assert (aside / "cache.db").exists()
    assert json.loads((cache / "fusefs-cache.json").read_text())["format"] == 1
    gets = s3_bucket.object_gets()
    m = mount(s3_bucket, *args)  # the new cache is a good one
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
    assert s3_bucket.object_gets() == gets
    m.stop()
    assert "moved its contents" not in m.log_text()


def test_unusable_cache_directory_is_one_line(tmp_path: Path) -> None:
    """A cache directory that cannot be used (here: a file) fails the mount with one line."""
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    (tmp_path / "file").write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "fusefs", "mount", f"file://{tmp_path / 'src'}",
         str(tmp_path / "mnt"), "--foreground", "--cache-dir", str(tmp_path / "file")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FUSEFS_CONFIG_PATH": os.devnull})
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"fusefs: cache directory {tmp_path / 'file'}: not a directory"], r.stderr


def test_mount_keeps_serving_when_the_index_breaks_under_it(local_bucket: Bucket, mount,
                                                            tmp_path: Path) -> None:
    """The cache's index destroyed while mounted: reads go on from the store, right bytes."""
    data = {f"f{i}": blob(MiB + 7, seed=i) for i in range(6)}
    for k, d in data.items():
        local_bucket.put(k, d)
    m = mount(local_bucket, "--block-size", str(256 * KiB))
    for k in ["f0", "f1"]:
        assert (m.path / k).read_bytes() == data[k]
    for name in ("cache.db", "cache.db-wal"):
        p = tmp_path / "cache" / name
        if p.exists():
            with open(p, "r+b") as f:  # in place: the mount's open connections see it
                f.write(random.Random(2).randbytes(p.stat().st_size))
    for k, d in data.items():
        drop_page_cache(m.path / k)
        assert (m.path / k).read_bytes() == d
    assert m.stats()["bytes_served"] >= sum(len(d) for d in data.values())
    assert m.stop() == 0
    warnings = [ln for ln in m.log_text().splitlines() if " WARNING " in ln]
    assert len(warnings) <= 10, warnings


def test_orphaned_block_files_are_removed(tmp_path: Path) -> None:
    """A process killed between writing a block file and recording it leaves a file nothing
    lists and the bound does not count: the next store removes it (only once it is old enough
    not to be another mount's write in progress)."""
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB)
    k = BlockKey("src", "k", "v", MiB, 0)
    store.put(k, pattern(k, MiB))
    store.close()
    orphan_dir = tmp_path / "c" / "ab" / "cd"
    orphan_dir.mkdir(parents=True, exist_ok=True)
    old = orphan_dir / "dead.val"
    fresh = orphan_dir / "writing.val"
    old.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y" * 1000)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store = DiskBlockStore(str(tmp_path / "c"), 64 * MiB)
    store.sweep_orphans()  # (the maintenance thread runs it at start too)
    assert not old.exists() and fresh.exists()
    assert store.read(k, 0, 100) == pattern(k, 100)  # indexed blocks are untouched
    store.close()


# --- layout ----------------------------------------------------------------------------------


def test_block_files_share_at_most_256_directories(tmp_path: Path) -> None:
    """A new directory costs the kernel as much as a block file: blocks go into one level of
    256 sub-directories (diskcache's own layout makes up to 65,536, nearly one per block of a
    young cache); the files are found, read and evicted as before."""
    store = DiskBlockStore(str(tmp_path / "c"), 10**9)
    keys = [BlockKey("s3://b", f"k{i}", "v1", 64 * 1024, 0) for i in range(600)]
    for k in keys:
        store.put(k, pattern(k, 40 * 1024))
    files = block_files(tmp_path / "c")
    assert len(files) == 600
    assert {len(f.relative_to(tmp_path / "c").parts) for f in files} == {2}  # dir/file
    dirs = {f.parent for f in files}
    assert len(dirs) <= 256
    assert all(d.stat().st_mode & 0o777 == 0o700 for d in dirs)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for k in keys[::50]:
        assert store.read(k, 0, 40 * 1024) == pattern(k, 40 * 1024)
    assert store.evict_object("s3://b", "k0") == 1
    assert len(block_files(tmp_path / "c")) == 599
    store.close()


@pytest.mark.parametrize(
    "key", ["plain.jpg", 'q"uote\\back/slash', "é ü 日本 \U0001f600", "ctl\x01\n\t"])
def test_cache_keys_are_the_json_of_their_fields(key: str) -> None:
    """Keys built without json.dumps are its output exactly: caches written before still
    match, and the keys still parse."""
    from fusefs.cache.keys import KEY_FORMAT, parse_cache_key

    src, version, size, idx = "s3+http://h:1/b", '"etag-1"', 4 << 20, 12345678901
    b = BlockKey(src, key, version, size, idx)
    assert b.cache_key == json.dumps([KEY_FORMAT, src, key, version, size, idx])
    assert parse_cache_key(b.cache_key) == (src, key, version, size, idx)


def test_lookups_take_no_write_lock_and_accesses_are_written_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diskcache's LRU ``get`` is a write transaction, even for a miss (one per cold block,
    contending with the stores): a miss is one select, looking blocks up and opening them
    writes nothing; the access times are written together by the next flush, and keep the
    LRU order."""
    import diskcache

    store = DiskBlockStore(str(tmp_path / "c"), 10**9, max_open=2)
    keys = [BlockKey("s3://b", f"k{i}", "v1", 64 * 1024, 0) for i in range(6)]
    for k in keys:
        store.put(k, pattern(k, 40 * 1024))
    real = diskcache.Cache._transact
    transactions: list[int] = []

    def counting(self: diskcache.Cache, *args: object, **kwargs: object) -> object:
        transactions.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "_transact", counting)
    statements: list[str] = []
    store._cache._con.set_trace_callback(statements.append)  # this thread's connection
    assert store.read(BlockKey("s3://b", "absent", "v1", 64 * 1024, 0), 0, 10) is None
    assert len(statements) == 1 and statements[0].startswith("SELECT")  # a miss: one select
    for k in (keys[0], *keys[2:], keys[0]):  # k0 first and last; k1 never; only 2 stay open
        assert store.read(k, 0, 100) == pattern(k, 100)
    assert transactions == []
    store.flush()
    assert transactions == [1]
    order = [k for (k,) in store._cache._sql("SELECT key FROM Cache ORDER BY access_time")]
    assert order[0] == keys[1].cache_key  # the one block not read is the least recent
    store.close()
