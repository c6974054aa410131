"""Writes through a real mount: files, folders, attributes, durability, conflicts, errors.

Every backend (moto, fake-gcs-server, Azurite, local) runs the semantic tests; what the store
holds is read back through its own SDK (``bucket.get``), never through the mount.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import Bucket, blob

from fusefs.testing.proxy import Request

MiB = 1024 * 1024


def sync(m, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """``fusefs sync MOUNT [PATH]``."""
    return subprocess.run([sys.executable, "-m", "fusefs", "sync", str(m.path),
                           *([path] if path else [])], capture_output=True, text=True,
                          timeout=120)


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def is_put(req: Request) -> bool:
    return req.method in ("PUT", "POST")


# --- files ------------------------------------------------------------------------------------


def test_new_file_reaches_the_bucket_and_reads_back_without_a_get(bucket: Bucket, mount):
    m = mount(bucket)
    data = blob(300_000, 1)
    (m.path / "out").mkdir()
    (m.path / "out/a.bin").write_bytes(data)
    assert (m.path / "out/a.bin").read_bytes() == data  # from the staged file
    r = sync(m)
    assert r.returncode == 0, r.stderr
    assert bucket.get("out/a.bin") == data
    s = m.stats()
    assert s["uploads_done"] >= 1 and s["uploads_pending"] == 0 and s["uploads_failed"] == 0
    assert s["upload_bytes"] >= len(data)
    gets = bucket.object_gets()
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
    assert (m.path / "out/a.bin").read_bytes() == data
    if gets is not None:
        assert bucket.object_gets() == gets  # the staged bytes became cached blocks
    assert sorted(os.listdir(m.path / "out")) == ["a.bin"]


def test_partial_overwrite_append_truncate_and_sparse(bucket: Bucket, mount):
    base = blob(2 * MiB + 123, 2)
    bucket.put("f.bin", base)
    m = mount(bucket, "--block-size", str(256 * 1024))
    p = m.path / "f.bin"
    model = bytearray(base)
    with open(p, "r+b") as f:
        f.seek(1000)
        f.write(b"X" * 5000)
        model[1000:6000] = b"X" * 5000
        f.seek(0)
        assert f.read(7000) == bytes(model[:7000])  # read back mixes staged and base bytes
    with open(p, "ab") as f:
        f.write(b"tail")
    model += b"tail"
    os.truncate(p, 1_500_000)
    del model[1_500_000:]
    os.truncate(p, 1_600_000)
    model += bytes(100_000)
    with open(p, "r+b") as f:
        f.seek(3 * MiB)  # past the end: a hole
        f.write(b"end")
    model += bytes(3 * MiB - len(model)) + b"end"
    assert p.stat().st_size == len(model)
    assert p.read_bytes() == bytes(model)
    assert sync(m).returncode == 0
    assert bucket.get("f.bin") == bytes(model)


def test_o_trunc_rewrite_and_fsync_means_in_the_bucket(bucket: Bucket, mount):
    bucket.put("r.txt", b"old content that is long")
    m = mount(bucket)
    fd = os.open(m.path / "r.txt", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"new")
        os.fsync(fd)
        assert bucket.get("r.txt") == b"new"  # fsync returned: it is in the bucket
        os.write(fd, b"er")
    finally:
        os.close(fd)
    assert sync(m).returncode == 0
    assert bucket.get("r.txt") == b"newer"


def test_exclusive_create_hard_links_and_the_control_file(bucket: Bucket, mount):
    bucket.put("exists", b"x")
    m = mount(bucket)
    with pytest.raises(FileExistsError):
        os.open(m.path / "exists", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with pytest.raises(PermissionError):  # hard links stay refused (EPERM)
        os.link(m.path / "exists", m.path / "hard")
    os.symlink("exists", m.path / "sym")  # symbolic links are stored (tests/test_posix.py)
    assert os.readlink(m.path / "sym") == "exists"
    with pytest.raises(FileExistsError):
        os.symlink("exists", m.path / ".fusefs")
    with pytest.raises(OSError):
        os.unlink(m.path / ".fusefs")
    with pytest.raises(OSError):
        os.rename(m.path / "exists", m.path / ".fusefs")
    assert json.loads((m.path / ".fusefs").read_bytes())["source"]


# --- folders and names ------------------------------------------------------------------------


def test_mkdir_rmdir_unlink(bucket: Bucket, mount):
    m = mount(bucket)
    d = m.path / "new"
    d.mkdir()
    assert d.is_dir() and os.listdir(d) == []
    with pytest.raises(FileExistsError):
        d.mkdir()
    (d / "f").write_bytes(b"1")
    with pytest.raises(OSError) as e:
        d.rmdir()
    assert e.value.errno == errno.ENOTEMPTY
    assert sync(m).returncode == 0
    assert bucket.get("new/f") == b"1"
    (d / "f").unlink()
    assert bucket.get("new/f") is None
    assert not (d / "f").exists()
    d.rmdir()
    assert not d.exists()
    assert "new" not in os.listdir(m.path)


def test_unlinked_open_file_keeps_reading(bucket: Bucket, mount):
    data = blob(200_000, 3)
    bucket.put("keep.bin", data)
    m = mount(bucket)
    with open(m.path / "keep.bin", "rb") as f:
        assert f.read(10) == data[:10]
        os.unlink(m.path / "keep.bin")
        assert not (m.path / "keep.bin").exists()
        assert f.read() == data[10:]
    wait_for(lambda: bucket.get("keep.bin") is None)


def test_rename_files_staged_and_stored_and_folders(bucket: Bucket, mount):
    bucket.put("dir/a.txt", b"A")
    bucket.put("dir/sub/b.txt", b"B")
    bucket.put("doc.txt", b"v1")
    m = mount(bucket)
    # a stored file: server-side copy + delete
    os.rename(m.path / "dir/a.txt", m.path / "a2.txt")
    assert (m.path / "a2.txt").read_bytes() == b"A"
    assert bucket.get("dir/a.txt") is None and bucket.get("a2.txt") == b"A"
    # a staged file (editor style: temp + rename over an existing file): one upload
    assert (m.path / "doc.txt").read_bytes() == b"v1"
    tmp = m.path / ".doc.txt.swp"
    tmp.write_bytes(b"v2")
    os.rename(tmp, m.path / "doc.txt")
    assert (m.path / "doc.txt").read_bytes() == b"v2"
    assert sync(m).returncode == 0
    assert bucket.get("doc.txt") == b"v2" and bucket.get(".doc.txt.swp") is None
    # a folder
    os.rename(m.path / "dir", m.path / "moved")
    assert sorted(os.listdir(m.path / "moved")) == ["sub"]
    assert (m.path / "moved/sub/b.txt").read_bytes() == b"B"
    assert bucket.get("moved/sub/b.txt") == b"B" and bucket.get("dir/sub/b.txt") is None
    assert not (m.path / "dir").exists()


def test_folder_rename_above_the_limit_is_exdev_and_mv_copies(bucket: Bucket, mount):
    for i in range(4):
        bucket.put(f"big/f{i}", b"%d" % i)
    m = mount(bucket, "--rename-limit", "2")
    with pytest.raises(OSError) as e:
        os.rename(m.path / "big", m.path / "big2")
    assert e.value.errno == errno.EXDEV
    r = subprocess.run(["mv", str(m.path / "big"), str(m.path / "big2")], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert sync(m).returncode == 0
    assert [bucket.get(f"big2/f{i}") for i in range(4)] == [b"%d" % i for i in range(4)]
    assert bucket.get("big/f0") is None


# --- attributes -------------------------------------------------------------------------------


def test_mtime_and_mode_are_kept_in_metadata(bucket: Bucket, mount, tmp_path):
    bucket.put("old.txt", b"o")
    m = mount(bucket)
    p = m.path / "t.txt"
    p.write_bytes(b"t")
    os.utime(p, (1_600_000_000, 1_600_000_000))
    os.chmod(p, 0o600)
    os.utime(m.path / "old.txt", (1_500_000_000, 1_500_000_000))  # a stored object
    assert sync(m).returncode == 0
    os.chown(p, os.getuid(), os.getgid())  # to the owner: allowed, nothing to store
    if os.geteuid() == 0:  # root may give a file away: kept (tests/test_posix.py)
        os.chown(p, 12345, 12345)
        assert (p.stat().st_uid, p.stat().st_gid) == (12345, 12345)
        os.chown(p, os.getuid(), os.getgid())
    with pytest.raises(PermissionError):  # a folder keeps no owner
        os.chown(m.path, 12345, 12345)
    m.stop()
    # remounted with the same cache (S3 listings carry no metadata: the mount remembers what
    # it wrote); other stores list it, so a fresh cache (another machine) sees it too
    fresh = [tmp_path / "cache"] + ([tmp_path / "cache2"] if bucket.kind != "s3" else [])
    for cache in fresh:
        m2 = mount(bucket, cache_dir=cache)
        st = (m2.path / "t.txt").stat()
        assert int(st.st_mtime) == 1_600_000_000
        assert st.st_mode & 0o777 == 0o600
        assert int((m2.path / "old.txt").stat().st_mtime) == 1_500_000_000
        m2.stop()


# --- durability and failures ------------------------------------------------------------------


def test_kill_9_after_close_uploads_on_the_next_mount(s3_bucket: Bucket, mount, tmp_path):
    b = s3_bucket
    assert b.proxy is not None
    b.proxy.faults(1.0, ["503"], predicate=is_put)  # nothing gets through for now
    try:
        m = mount(b, cache_dir=tmp_path / "c")
        (m.path / "saved.txt").write_bytes(b"must not be lost")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
        m.stop()
    finally:
        b.proxy.faults(0)
    assert b.get("saved.txt") is None
    m2 = mount(b, cache_dir=tmp_path / "c")
    assert (m2.path / "saved.txt").read_bytes() == b"must not be lost"
    assert sync(m2).returncode == 0
    assert b.get("saved.txt") == b"must not be lost"


def test_failing_puts_are_retried_and_sync_uploads_reports_eio(s3_bucket: Bucket, mount):
    b = s3_bucket
    assert b.proxy is not None
    m = mount(b, "--sync-uploads")
    b.proxy.faults(1.0, ["503"], predicate=is_put)
    try:
        with pytest.raises(OSError) as e:
            with open(m.path / "s.txt", "wb") as f:
                f.write(b"kept")
        assert e.value.errno == errno.EIO
        assert (m.path / "s.txt").read_bytes() == b"kept"  # the data stays
        assert m.stats()["uploads_failed"] == 1
        r = sync(m)
        assert r.returncode != 0 and "s.txt" in r.stderr
    finally:
        b.proxy.faults(0)
    assert sync(m).returncode == 0
    assert b.get("s.txt") == b"kept"
    assert m.stats()["uploads_failed"] == 0


def test_a_conflict_keeps_both_versions(s3_bucket: Bucket, mount):
    b = s3_bucket
    b.put("c.txt", b"original")
    m = mount(b)
    with open(m.path / "c.txt", "r+b") as f:
        f.write(b"MINE")
        b.put("c.txt", b"theirs")  # another writer, meanwhile
    r = sync(m)
    assert b.get("c.txt") == b"theirs"
    names = [n for n in os.listdir(m.path) if n.startswith("c.txt.conflict-")]
    assert len(names) == 1, (os.listdir(m.path), r.stderr)
    assert b.get(names[0]) == b"MINEinal"
    assert m.stats()["conflicts"] == 1
    assert "changed in the store" in m.log_text()


def test_a_bucket_that_refuses_writes_keeps_the_data(s3_bucket: Bucket, mount):
    b = s3_bucket
    assert b.proxy is not None
    m = mount(b)
    b.proxy.faults(1.0, ["403"], predicate=is_put)
    try:
        (m.path / "denied.txt").write_bytes(b"mine")
        r = sync(m)
        assert r.returncode == 1
        s = m.stats()
        assert s["uploads_failed"] == 1 and s["staged_bytes"] > 0
        assert (m.path / "denied.txt").read_bytes() == b"mine"
        st = json.loads(subprocess.run(
            [sys.executable, "-m", "fusefs", "stats", str(m.path), "denied.txt", "--json"],
            capture_output=True, text=True).stdout)
        assert st["upload"] == "failed"
    finally:
        b.proxy.faults(0)
    assert m.log_text().count("upload of denied.txt failed") == 1


def test_a_full_cache_disk_is_enospc_and_the_mount_keeps_serving(local_bucket: Bucket, mount,
                                                                  small_disk):
    local_bucket.put("r.txt", b"readable")
    m = mount(local_bucket, "--block-size", "256K", "--cache-size", "1M",
              cache_dir=small_disk / "cache")
    (m.path / "ok.txt").write_bytes(b"small")
    with pytest.raises(OSError) as e:
        with open(m.path / "big.bin", "wb") as f:
            for _ in range(16):
                f.write(b"x" * MiB)
    assert e.value.errno == errno.ENOSPC
    assert (m.path / "r.txt").read_bytes() == b"readable"
    os.unlink(m.path / "big.bin")
    assert sync(m).returncode == 0
    assert local_bucket.get("ok.txt") == b"small"
    m.stop()


def test_two_mounts_see_each_others_changes_after_the_ttl(bucket: Bucket, mount, tmp_path):
    a = mount(bucket, "--metadata-ttl", "1", cache_dir=tmp_path / "ca")
    b = mount(bucket, "--metadata-ttl", "1", cache_dir=tmp_path / "cb")
    (a.path / "shared.txt").write_bytes(b"from a")
    assert sync(a).returncode == 0
    wait_for(lambda: (b.path / "shared.txt").exists())
    assert (b.path / "shared.txt").read_bytes() == b"from a"
    (b.path / "shared.txt").write_bytes(b"from b, longer")
    assert sync(b).returncode == 0
    wait_for(lambda: (a.path / "shared.txt").read_bytes() == b"from b, longer")
    os.unlink(a.path / "shared.txt")
    wait_for(lambda: not (b.path / "shared.txt").exists())


@pytest.mark.parametrize("how", ["unmount", "sigterm"])
def test_unmount_and_sigterm_wait_for_pending_uploads(s3_bucket: Bucket, mount, how: str):
    b = s3_bucket
    assert b.proxy is not None
    m = mount(b)
    b.proxy.slow(lambda method, path: method == "PUT", 1.0)
    try:
        for i in range(3):
            (m.path / f"u{i}").write_bytes(b"%d" % i)
        if how == "sigterm":
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(timeout=60) == 0
        m.stop()
    finally:
        b.proxy.slow(None, 0)
    assert [b.get(f"u{i}") for i in range(3)] == [b"0", b"1", b"2"]


def test_uploads_past_the_grace_stay_journaled_and_resume(s3_bucket: Bucket, mount, tmp_path):
    b = s3_bucket
    assert b.proxy is not None
    m = mount(b, "--upload-grace", "1", cache_dir=tmp_path / "c")
    b.proxy.faults(1.0, ["503"], predicate=is_put)
    try:
        (m.path / "late.txt").write_bytes(b"later")
        m.stop()
    finally:
        b.proxy.faults(0)
    assert "not finished at unmount" in m.log_text()
    assert b.get("late.txt") is None
    m2 = mount(b, cache_dir=tmp_path / "c")
    assert sync(m2).returncode == 0
    assert b.get("late.txt") == b"later"


def test_a_small_change_to_a_big_object_copies_the_rest_server_side(s3_bucket: Bucket, mount):
    """S3: parts the change does not touch are UploadPartCopy (no bytes sent), and the
    unchanged bytes of the changed part are the only ones read back from the store."""
    b = s3_bucket
    assert b.proxy is not None
    data = bytearray(blob(16 * MiB, 9))
    b.put("big.bin", bytes(data))
    m = mount(b, "--upload-part-size", "5M")
    b.proxy.reset()
    with open(m.path / "big.bin", "r+b") as f:
        f.seek(MiB)
        f.write(b"CHANGED")
    data[MiB:MiB + 7] = b"CHANGED"
    assert sync(m).returncode == 0
    assert b.get("big.bin") == bytes(data)
    reqs = [r for r in b.proxy.requests() if r.method in ("PUT", "POST")]
    copies = [r for r in reqs if "x-amz-copy-source" in r.headers]
    sent = sum(r.bytes_in for r in reqs)
    assert len(copies) == 2, [(r.method, r.target, r.headers.get("x-amz-copy-source-range"))
                              for r in reqs]
    assert sent < 8 * MiB, sent  # one part (the plan evens parts out to whole MiB), not 16 MiB


def test_unchanged_bytes_come_from_the_block_cache(bucket: Bucket, mount):
    """A store that cannot copy ranges server-side gets the unchanged bytes of a changed
    object through the block cache: blocks already cached cost no GET."""
    if bucket.proxy is None or bucket.kind == "s3":
        pytest.skip("counts the server's GETs; S3 copies whole parts server-side")
    data = bytearray(blob(2 * MiB, 11))
    bucket.put("c.bin", bytes(data))
    m = mount(bucket, "--block-size", str(256 * 1024))
    assert (m.path / "c.bin").read_bytes() == bytes(data)  # every block cached
    gets = bucket.object_gets()
    with open(m.path / "c.bin", "r+b") as f:
        f.seek(100_000)
        f.write(b"new")
    data[100_000:100_003] = b"new"
    assert sync(m).returncode == 0
    assert bucket.get("c.bin") == bytes(data)
    assert bucket.object_gets() == gets  # (bucket.get reads around the proxy)


def test_a_server_that_enforces_conditions_gets_no_head_per_upload(s3_bucket: Bucket, mount):
    """moto refuses a second If-None-Match put: after one probe, small uploads go without a
    HEAD first (a big one, multipart, is still checked: moto ignores conditions there)."""
    b = s3_bucket
    assert b.proxy is not None
    m = mount(b)
    b.proxy.reset()
    for i in range(5):
        (m.path / f"n{i}.txt").write_bytes(b"%d" % i)
    assert sync(m).returncode == 0
    reqs = b.proxy.requests()
    heads = [r for r in reqs if r.method == "HEAD" and ".fusefs-probe-" not in r.path]
    probes = [r for r in reqs if ".fusefs-probe-" in r.path]
    assert heads == [] and len(probes) <= 4  # put, refused put (+ the store's HEAD), delete
    assert "enforces conditional writes" in m.log_text()
    assert [b.get(f"n{i}.txt") for i in range(5)] == [b"%d" % i for i in range(5)]
    assert not [k for k in os.listdir(m.path) if k.startswith(".fusefs-probe")]
