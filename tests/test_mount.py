"""One suite, run against S3 (moto), GCS (fake-gcs-server), Azure Blob (Azurite) and the local
backend, through a real kernel FUSE mount."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Bucket, blob, drop_page_cache

MiB = 1024 * 1024
BLOCK = 256 * 1024  # small blocks so multi-block paths are exercised on small objects


def test_listing_nested_markers_and_odd_names(bucket: Bucket, mount) -> None:
    bucket.put("top.txt", b"top")
    bucket.put("a/b/c/deep.txt", b"deep")
    bucket.put("a/sibling.txt", b"s")
    bucket.put("empty/", b"")  # a folder marker with nothing under it
    odd = ["with space.txt", "unicodé.txt", "per%cent.txt", "plus+sign.txt", "hash#.txt",
           "q?mark.txt", "semi;colon", "quote'.txt"]
    for name in odd:
        bucket.put(f"odd/{name}", name.encode())
    m = mount(bucket, "--block-size", str(BLOCK))
    root = m.path
    assert sorted(os.listdir(root)) == ["a", "empty", "odd", "top.txt"]
    assert ".fusefs" not in os.listdir(root)
    assert sorted(os.listdir(root / "a")) == ["b", "sibling.txt"]
    assert os.listdir(root / "a/b/c") == ["deep.txt"]
    assert (root / "empty").is_dir() and os.listdir(root / "empty") == []
    assert sorted(os.listdir(root / "odd")) == sorted(odd)
    for name in odd:
        assert (root / "odd" / name).read_bytes() == name.encode()
    walked = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}
    assert "a/b/c/deep.txt" in walked and len(walked) == 3 + len(odd)


def test_large_folder_lists_completely(bucket: Bucket, mount) -> None:
    names = [f"f{i:05d}" for i in range(1500)]  # > 1,000: more than one page on S3 and GCS
    if bucket.kind == "local":
        for n in names:
            bucket.put(f"big/{n}", b"x")
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda n: bucket.put(f"big/{n}", b"x"), names))
    m = mount(bucket)
    assert sorted(os.listdir(m.path / "big")) == names
    out = subprocess.run(["find", str(m.path / "big"), "-type", "f"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == 1500


def test_invalid_keys_skipped_and_conflicts(bucket: Bucket, mount) -> None:
    if not bucket.raw_keys:
        pytest.skip("a local directory cannot hold keys that are not file names")
    bucket.put("ok.txt", b"ok")
    bucket.put("bad//double-slash", b"x")
    if bucket.kind != "azure":  # Azure resolves "." and ".." segments of blob URLs itself
        bucket.put("bad/./dot", b"x")
        bucket.put("bad/../dotdot", b"x")
    bucket.put("bad/" + "n" * 300, b"x")  # over 255 bytes
    bucket.put("both", b"I am a file")
    bucket.put("both/inner.txt", b"inner")
    m = mount(bucket)
    assert sorted(os.listdir(m.path)) == ["bad", "both", "ok.txt"]
    assert os.listdir(m.path / "bad") == []
    assert (m.path / "both").is_dir()
    assert (m.path / "both/inner.txt").read_bytes() == b"inner"
    assert (m.path / "ok.txt").read_bytes() == b"ok"
    assert "is both an object and a prefix" in m.log_text()


def test_stat_sizes_mtime_blocks_and_stable_inodes(bucket: Bucket, mount) -> None:
    data = blob(3 * MiB + 17)
    before = time.time()
    bucket.put("d/file.bin", data)
    bucket.put("d/zero", b"")
    m = mount(bucket)
    st = os.stat(m.path / "d/file.bin")
    assert st.st_size == len(data)
    assert abs(st.st_mtime - before) < 120
    assert st.st_blocks * 512 >= len(data)
    assert os.stat(m.path / "d/zero").st_size == 0
    ino = st.st_ino
    os.listdir(m.path / "d")
    assert os.stat(m.path / "d/file.bin").st_ino == ino
    assert os.stat(m.path / "d").st_ino != ino
    du = subprocess.run(["du", "-sk", str(m.path / "d")], capture_output=True, text=True,
                        check=True)
    assert int(du.stdout.split()[0]) >= len(data) // 1024


def test_full_and_ranged_reads_byte_for_byte(bucket: Bucket, mount) -> None:
    sizes = {"tiny": 1, "small": 1000, "exact": BLOCK, "odd": 3 * BLOCK + 7, "big": 5 * MiB + 3}
    datas = {k: blob(n, seed=i) for i, (k, n) in enumerate(sizes.items())}
    for k, d in datas.items():
        bucket.put(f"r/{k}", d)
    bucket.put("r/empty", b"")
    m = mount(bucket, "--block-size", str(BLOCK))
    for k, d in datas.items():
        assert (m.path / "r" / k).read_bytes() == d, k
    assert (m.path / "r/empty").read_bytes() == b""
    rng = random.Random(7)
    d = datas["big"]
    fd = os.open(m.path / "r/big", os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(0, len(d) + 1000)
            size = rng.choice([1, 100, 4096, BLOCK - 1, BLOCK + 1, 3 * BLOCK])
            assert os.pread(fd, size, off) == d[off : off + size], (off, size)
        assert os.pread(fd, 100, len(d)) == b""  # at EOF
        assert os.pread(fd, 100, len(d) + 12345) == b""  # past EOF
        assert os.pread(fd, 100, len(d) - 10) == d[-10:]  # across EOF
    finally:
        os.close(fd)


def test_concurrent_readers_of_one_and_many_files(bucket: Bucket, mount) -> None:
    files = {f"c/{i}.bin": blob(700_000 + i, seed=i) for i in range(12)}
    for k, d in files.items():
        bucket.put(k, d)
    m = mount(bucket, "--block-size", str(BLOCK))
    errors: list[str] = []

    def reader(key: str, seed: int) -> None:
        rng = random.Random(seed)
        d = files[key]
        with open(m.path / key, "rb") as f:
            for _ in range(20):
                off = rng.randrange(0, len(d))
                f.seek(off)
                got = f.read(rng.randrange(1, 300_000))
                if got != d[off : off + len(got)] or not got:
                    errors.append(f"{key}@{off}")
            f.seek(0)
            if f.read() != d:
                errors.append(f"{key} full")

    threads = [threading.Thread(target=reader, args=("c/0.bin", s)) for s in range(8)]
    threads += [threading.Thread(target=reader, args=(k, 99)) for k in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # every block was fetched once however many readers missed it at the same time
    stats = m.stats()
    blocks = sum((len(d) + BLOCK - 1) // BLOCK for d in files.values())
    assert stats["fetches"] == blocks
    if bucket.object_gets() is not None:
        assert stats["errors"] == 0


def test_missing_files_enoent(bucket: Bucket, mount) -> None:
    bucket.put("here.txt", b"x")
    m = mount(bucket)
    for path in ("nope.txt", "nodir/nope.txt", "here.txt/child"):
        with pytest.raises(OSError) as ei:
            os.stat(m.path / path)
        assert ei.value.errno in (errno.ENOENT, errno.ENOTDIR), path
    with pytest.raises(FileNotFoundError):
        open(m.path / "nope.txt", "rb")


def test_read_only_mount_refuses_writes_with_erofs(bucket: Bucket, mount) -> None:
    bucket.put("f.txt", b"x")
    bucket.put("d/g.txt", b"y")
    m = mount(bucket, "--read-only")
    attempts = {
        "create": lambda: open(m.path / "new.txt", "wb"),
        "overwrite": lambda: open(m.path / "f.txt", "wb"),
        "append": lambda: open(m.path / "f.txt", "ab"),
        "rw": lambda: open(m.path / "f.txt", "r+b"),
        "mkdir": lambda: os.mkdir(m.path / "newdir"),
        "unlink": lambda: os.unlink(m.path / "f.txt"),
        "rmdir": lambda: os.rmdir(m.path / "d"),
        "rename": lambda: os.rename(m.path / "f.txt", m.path / "g.txt"),
        "truncate": lambda: os.truncate(m.path / "f.txt", 0),
        "chmod": lambda: os.chmod(m.path / "f.txt", 0o600),
        "symlink": lambda: os.symlink("f.txt", m.path / "link"),
    }
    for what, fn in attempts.items():
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == errno.EROFS, what
    assert (m.path / "f.txt").read_bytes() == b"x"  # still serving


def test_cache_survives_remount_without_gets(bucket: Bucket, mount, tmp_path: Path) -> None:
    data = blob(2 * MiB + 5, seed=3)
    bucket.put("keep/data.bin", data)
    bucket.put("keep/small.txt", b"small")
    cache = tmp_path / "shared-cache"
    m1 = mount(bucket, "--block-size", str(BLOCK), cache_dir=cache)
    assert (m1.path / "keep/data.bin").read_bytes() == data
    assert (m1.path / "keep/small.txt").read_bytes() == b"small"
    first = m1.stats()
    assert first["fetches"] == 10 and first["bytes_fetched"] == len(data) + 5
    assert m1.stop() == 0
    gets_before = bucket.object_gets()
    m2 = mount(bucket, "--block-size", str(BLOCK), cache_dir=cache)
    assert (m2.path / "keep/data.bin").read_bytes() == data
    assert (m2.path / "keep/small.txt").read_bytes() == b"small"
    s = m2.stats()
    assert s["fetches"] == 0 and s["misses"] == 0 and s["hits"] > 0
    if gets_before is not None:
        assert bucket.object_gets() == gets_before  # the server saw no GET at all


def test_eviction_keeps_cache_under_bound(bucket: Bucket, mount, tmp_path: Path) -> None:
    limit = 2 * MiB
    files = {f"ev/{i}": blob(MiB, seed=i) for i in range(8)}
    for k, d in files.items():
        bucket.put(k, d)
    m = mount(bucket, "--block-size", str(BLOCK), "--cache-size", str(limit))
    for k, d in files.items():
        assert (m.path / k).read_bytes() == d
        s = m.stats()
        # documented margin: one block per worker being written, plus SQLite's pages
        assert s["current_size"] <= limit + BLOCK + 256 * 1024, s
    s = m.stats()
    assert s["evictions"] > 0
    assert s["current_count"] * BLOCK <= limit
    # the least recently used blocks went first: the last file read is still fully cached
    before = s["fetches"]
    assert (m.path / "ev/7").read_bytes() == files["ev/7"]
    assert m.stats()["fetches"] == before
    # and an evicted one is fetched again, with the right bytes (once the kernel's own page
    # cache of it is dropped: fusefs lets the kernel keep pages of unchanged objects)
    drop_page_cache(m.path / "ev/0")
    assert (m.path / "ev/0").read_bytes() == files["ev/0"]
    assert m.stats()["fetches"] > before


def test_changed_object_after_ttl_gives_new_bytes(bucket: Bucket, mount) -> None:
    bucket.put("chg.txt", b"version one\n")
    m = mount(bucket, "--metadata-ttl", "1", "--negative-ttl", "0")
    assert (m.path / "chg.txt").read_bytes() == b"version one\n"
    time.sleep(1.1)  # local backend: ensure a distinct mtime
    new = b"the second version, longer than the first\n"
    bucket.put("chg.txt", new)
    time.sleep(1.5)
    assert (m.path / "chg.txt").read_bytes() == new
    assert os.stat(m.path / "chg.txt").st_size == len(new)
    # and a new object appears after the TTL, a deleted one disappears
    bucket.put("later.txt", b"later")
    bucket.delete("chg.txt")
    time.sleep(1.5)
    assert (m.path / "later.txt").read_bytes() == b"later"
    assert not (m.path / "chg.txt").exists()


def test_two_buckets_share_one_cache_dir(bucket: Bucket, mount, tmp_path: Path) -> None:
    other = _sibling(bucket, tmp_path)
    bucket.put("same-name.bin", blob(600_000, seed=1))
    other.put("same-name.bin", blob(600_000, seed=2))
    cache = tmp_path / "one-cache"
    m1 = mount(bucket, "--block-size", str(BLOCK), cache_dir=cache)
    m2 = mount(other, "--block-size", str(BLOCK), cache_dir=cache)
    for _ in range(2):
        assert (m1.path / "same-name.bin").read_bytes() == blob(600_000, seed=1)
        assert (m2.path / "same-name.bin").read_bytes() == blob(600_000, seed=2)
    assert m1.stats()["fetches"] == 3 and m2.stats()["fetches"] == 3


def _sibling(bucket: Bucket, tmp_path: Path) -> Bucket:
    from conftest import make_azure_bucket, make_gcs_bucket, make_local_bucket, make_s3_bucket

    if bucket.kind == "s3":
        from types import SimpleNamespace

        assert bucket.proxy is not None
        return make_s3_bucket(SimpleNamespace(endpoint_url=bucket.proxy.upstream,
                                              proxy=bucket.proxy))
    if bucket.kind == "gcs":
        from types import SimpleNamespace

        assert bucket.proxy is not None
        return make_gcs_bucket(SimpleNamespace(url=bucket.proxy.upstream, proxy=bucket.proxy))
    if bucket.kind == "azure":
        return make_azure_bucket(bucket.extra["server"])
    return make_local_bucket(tmp_path / "objects-2")


def test_prefix_mount(bucket: Bucket, mount) -> None:
    bucket.put("datasets/train/1.txt", b"one")
    bucket.put("datasets/val.txt", b"val")
    bucket.put("other/secret.txt", b"no")
    if bucket.kind == "local":
        pytest.skip("file:// mounts take the directory itself")
    m = mount(bucket, source=bucket.source + "/datasets")
    assert sorted(os.listdir(m.path)) == ["train", "val.txt"]
    assert (m.path / "train/1.txt").read_bytes() == b"one"


def test_tree_walk_lists_each_folder_once(bucket: Bucket, mount) -> None:
    if bucket.proxy is None:
        pytest.skip("counts the server's requests")
    from fusefs.testing.proxy import is_head, is_list

    for i in range(30):
        for j in range(2):
            bucket.put(f"walk/d{i:02d}/f{j}.txt", f"{i}-{j}".encode())
        bucket.put(f"walk/d{i:02d}/sub/leaf.txt", b"leaf")
    m = mount(bucket)
    bucket.proxy.reset()
    out = subprocess.run(["find", str(m.path / "walk")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert len(out) == 1 + 30 * 4 + 30  # walk, dirs, files, sub-dirs and their leaves
    out2 = subprocess.run(["ls", "-lR", str(m.path / "walk")], capture_output=True, text=True,
                          check=True).stdout
    assert out2.count("leaf.txt") == 30
    lists = bucket.proxy.count(predicate=is_list)
    # root, walk, 30 folders, 30 sub-folders: each listed once (listed ahead of the walker or
    # on demand, never both), plus at most the lookups' probes of "walk" itself
    assert 62 <= lists <= 63, sorted(
        (r.query.get("prefix", ""), r.query.get("start-after", r.query.get("startOffset", "")))
        for r in bucket.proxy.requests() if is_list(r))
    # each folder's marker read once (its mode and owner: ls -l stats it), and at most the
    # probe of "walk"
    heads = [r.path for r in bucket.proxy.requests() if is_head(r)]
    assert sum(1 for p in heads if p.endswith("/")) == 61, heads
    assert len(heads) <= 62


def test_reading_a_folder_lists_its_subfolders_ahead(bucket: Bucket, mount) -> None:
    if bucket.proxy is None:
        pytest.skip("counts the server's requests")
    from fusefs.testing.proxy import is_list

    for i in range(12):
        bucket.put(f"ahead/d{i:02d}/f.txt", b"x")
    m = mount(bucket)
    os.listdir(m.path / "ahead")
    prefixes = {f"ahead/d{i:02d}/" for i in range(12)}

    def listed() -> set[str]:
        return {r.query.get("prefix", "") for r in bucket.proxy.requests() if is_list(r)}

    deadline = time.monotonic() + 30
    while not prefixes <= listed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prefixes <= listed()  # nobody opened those folders: they were listed ahead
    before = bucket.proxy.count(predicate=is_list)
    assert os.listdir(m.path / "ahead/d05") == ["f.txt"]
    assert bucket.proxy.count(predicate=is_list) == before  # served from the listing
