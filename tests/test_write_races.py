"""Writes under races and crashes (issue 17): descriptors held across renames and unlinks, a
request held in the middle of an upload, ``kill -9`` between two steps, two mounts on one
bucket. S3 on SeaweedFS (conditions enforced as on AWS) and moto (conditions ignored: the
mount checks with a HEAD); what the bucket holds is read with boto3, never through the mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import Bucket, blob, make_s3_bucket
from test_writes import sync, wait_for


@pytest.fixture(params=["seaweed", "s3"])
def store(request: pytest.FixtureRequest) -> Bucket:
    server = request.getfixturevalue("seaweed_server" if request.param == "seaweed"
                                     else "s3_server")
    b = make_s3_bucket(server)
    b.kind = request.param
    return b


def keys(b: Bucket) -> list[str]:
    client, name = b.extra["client"], b.extra["name"]
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(out)


def kill_9(m) -> None:
    """``kill -9`` the daemon and detach its dead mount."""
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait()
    m.stop()


def synced(m) -> None:
    r = sync(m)
    assert r.returncode == 0, r.stderr


def held(proxy, method: str, key: str, seconds: float):
    """Hold requests ``method`` on a path ending in ``/key`` for ``seconds`` (the proxy's
    one slow rule); returns a function that tells whether one is in flight now."""
    proxy.slow(lambda meth, path: meth == method and path.split("?")[0].endswith("/" + key),
               seconds)

    def in_flight() -> bool:
        return any(r.method == method and r.path.endswith("/" + key) and r.finished is None
                   for r in proxy.requests())

    return in_flight


# --- item 1, 17, 18: descriptors held across rename and unlink -------------------------------


def test_closing_an_old_descriptor_never_deletes_the_new_file(store: Bucket, mount):
    m = mount(store)
    old = open(m.path / "a", "wb")
    old.write(b"old writer")
    (m.path / "tmp").write_bytes(b"new")
    os.rename(m.path / "tmp", m.path / "a")
    synced(m)
    assert store.get("a") == b"new"
    old.close()  # the file it wrote lost its name: nothing of it may touch "a"
    synced(m)
    assert store.get("a") == b"new"
    assert keys(store) == ["a"]
    assert (m.path / "a").read_bytes() == b"new"


def test_rm_while_open_then_recreate_keeps_the_new_file(store: Bucket, mount):
    store.put("a", b"stored")
    m = mount(store)
    reader = open(m.path / "a", "rb")
    writer = open(m.path / "w", "wb")
    writer.write(b"pending")
    os.unlink(m.path / "a")
    os.unlink(m.path / "w")
    (m.path / "a").write_bytes(b"new a")  # item 18: right after, the old one still open
    (m.path / "w").write_bytes(b"new w")
    assert reader.read() == b"stored"  # item 17: the unlinked file keeps its bytes
    assert os.fstat(reader.fileno()).st_size == 6
    writer.close()
    reader.close()
    synced(m)
    assert store.get("a") == b"new a" and store.get("w") == b"new w"
    assert keys(store) == ["a", "w"], "no conflict copy, nothing deleted"
    assert m.stats()["conflicts"] == 0


def test_a_read_only_descriptor_on_a_replaced_file(store: Bucket, mount):
    m = mount(store)
    (m.path / "b").write_bytes(b"first b")
    synced(m)
    held_fd = open(m.path / "b", "rb")
    (m.path / "tmp").write_bytes(b"second b")
    os.rename(m.path / "tmp", m.path / "b")
    held_fd.close()
    synced(m)
    assert store.get("b") == b"second b" and keys(store) == ["b"]


def test_unlinked_open_file_stat_and_read_and_removal_survives_kill_9(store: Bucket, mount,
                                                                       tmp_path):
    data = blob(200_000, 3)
    store.put("u.bin", data)
    m = mount(store, cache_dir=tmp_path / "c")
    f = open(m.path / "u.bin", "rb")
    os.unlink(m.path / "u.bin")
    assert os.fstat(f.fileno()).st_size == len(data)  # pjdfstest unlink/14.t
    assert os.pread(f.fileno(), 1000, 100_000) == data[100_000:101_000]
    assert not (m.path / "u.bin").exists()
    assert store.get("u.bin") == data  # still read by the open handle
    kill_9(m)  # item 7: the pending delete is journaled
    with contextlib.suppress(OSError):  # the mount is gone
        f.close()
    m2 = mount(store, cache_dir=tmp_path / "c")
    synced(m2)
    assert store.get("u.bin") is None
    assert not (m2.path / "u.bin").exists()


# --- items 2, 3: rm / mv over a file whose upload is in flight -------------------------------


@pytest.mark.parametrize("action", ["rm", "mv-over"])
def test_rm_or_mv_over_while_the_upload_is_in_flight(store: Bucket, mount, action: str):
    assert store.proxy is not None
    m = mount(store)
    in_flight = held(store.proxy, "PUT", "a", 1.5)
    try:
        (m.path / "a").write_bytes(b"version 1")
        bg = subprocess.Popen([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(in_flight, 20)
        if action == "rm":
            os.unlink(m.path / "a")
        else:  # an editor's atomic save while the previous save uploads
            (m.path / "a.tmp").write_bytes(b"version 2")
            os.rename(m.path / "a.tmp", m.path / "a")
        bg.wait(60)
    finally:
        store.proxy.slow(None, 0)
    synced(m)
    assert m.proc is not None and m.proc.poll() is None, "the daemon must keep serving"
    if action == "rm":
        assert store.get("a") is None and keys(store) == []
        assert not (m.path / "a").exists()
    else:
        assert store.get("a") == b"version 2"
        assert keys(store) == ["a"], "no conflict copy"
        assert (m.path / "a").read_bytes() == b"version 2"
    assert m.stats()["conflicts"] == 0


# --- item 6, 16: log rotation, rename back, folder rename with unsaved changes ---------------


def test_log_rotation_rename_back_and_folder_rename_keep_the_change(store: Bucket, mount):
    store.put("log", b"line 1\n")
    store.put("x", b"old x")
    store.put("d/f", b"old f")
    m = mount(store)
    with open(m.path / "log", "ab") as f:
        f.write(b"line 2\n")
    os.rename(m.path / "log", m.path / "log.1")
    (m.path / "log").write_bytes(b"fresh\n")
    with open(m.path / "x", "ab") as f:
        f.write(b" changed")
    os.rename(m.path / "x", m.path / "y")
    os.rename(m.path / "y", m.path / "x")
    with open(m.path / "d/f", "ab") as f:
        f.write(b" changed")
    os.rename(m.path / "d", m.path / "e")
    synced(m)
    assert store.get("log.1") == b"line 1\nline 2\n"
    assert store.get("log") == b"fresh\n"
    assert store.get("x") == b"old x changed"
    assert store.get("e/f") == b"old f changed"
    assert [k for k in keys(store) if not k.endswith("/")] == ["e/f", "log", "log.1", "x"]
    assert m.stats()["conflicts"] == 0


# --- item 5: deletes are conditional ---------------------------------------------------------


def test_a_delayed_delete_never_removes_another_writers_object(store: Bucket, mount, tmp_path):
    store.put("a", b"original")
    ma = mount(store, cache_dir=tmp_path / "ca")
    reader = open(ma.path / "a", "rb")
    os.unlink(ma.path / "a")  # deleted once the reader closes
    store.put("a", b"theirs")  # mount B (here: the SDK) writes "a" meanwhile
    reader.close()
    synced(ma)
    assert store.get("a") == b"theirs"


# --- item 4: conflicts judged exactly --------------------------------------------------------


def test_two_mounts_same_size_and_mtime_keep_both_versions(store: Bucket, mount, tmp_path):
    ma = mount(store, cache_dir=tmp_path / "ca")
    mb = mount(store, cache_dir=tmp_path / "cb")
    when = 1_700_000_000
    for m, body in ((ma, b"A" * 1000), (mb, b"B" * 1000)):
        with open(m.path / "same", "wb") as f:
            f.write(body)
        os.utime(m.path / "same", (when, when))
    synced(ma)
    synced(mb)
    ks = keys(store)
    conflict = [k for k in ks if k.startswith("same.conflict-")]
    assert len(conflict) == 1, ks
    assert {store.get("same"), store.get(conflict[0])} == {b"A" * 1000, b"B" * 1000}
    assert ma.stats()["conflicts"] + mb.stats()["conflicts"] == 1


# --- item 8: a handle reads the file it opened -----------------------------------------------


def test_a_handle_reads_the_file_it_opened(store: Bucket, mount):
    old = blob(600_000, 4)
    store.put("d", old)
    store.put("a", b"content of a")
    m = mount(store, "--block-size", "65536", "--readahead", "0")
    h = open(m.path / "d", "rb", buffering=0)
    assert h.read(1000) == old[:1000]
    (m.path / "d.tmp").write_bytes(b"N" * 100)
    os.rename(m.path / "d.tmp", m.path / "d")
    try:
        got = os.pread(h.fileno(), 1000, 500_000)
        assert got == old[500_000:501_000], "never the replacement's bytes"
    except OSError as e:  # the old version left the store: an error, not wrong bytes
        assert e.errno == errno.ESTALE
    assert os.fstat(h.fileno()).st_size == len(old)
    h.close()
    ha = open(m.path / "a", "rb", buffering=0)
    os.rename(m.path / "a", m.path / "b")
    assert ha.read() == b"content of a"  # not ENOENT after mv a b
    ha.close()
    synced(m)
    assert store.get("d") == b"N" * 100 and store.get("b") == b"content of a"


# --- item 9: kill -9 while a program writes --------------------------------------------------


def test_kill_9_while_writing_reports_and_never_uploads_a_mix(store: Bucket, mount, tmp_path):
    m = mount(store, cache_dir=tmp_path / "c")
    (m.path / "closed").write_bytes(b"A" * 10_000)
    synced(m)
    (m.path / "twice").write_bytes(b"1" * 10_000)  # closed once, pending
    f = open(m.path / "twice", "r+b")
    f.write(b"2" * 5_000)  # half rewritten, never closed
    f.flush()
    g = open(m.path / "never-closed", "wb")
    g.write(b"data")
    g.flush()
    os.truncate(m.path / "closed", 10)  # within the write-back second
    kill_9(m)
    for h in (f, g):
        with contextlib.suppress(OSError):  # the mount is gone
            h.close()
    m2 = mount(store, cache_dir=tmp_path / "c")
    r = sync(m2)
    assert r.returncode == 1, "files being written at the crash are reported"
    assert "never-closed" in r.stderr and "twice" in r.stderr
    assert store.get("closed") == b"A" * 10
    assert store.get("twice") != b"2" * 5_000 + b"1" * 5_000, "never a mix of two versions"
    assert store.get("never-closed") is None
    assert m2.stats()["uploads_failed"] == 2


# --- items 13, 14: a conflict is never a silent success --------------------------------------


def test_sync_uploads_close_of_a_conflicted_file_fails(store: Bucket, mount):
    store.put("c", b"original")
    m = mount(store, "--sync-uploads")
    with pytest.raises(OSError) as e:
        with open(m.path / "c", "r+b") as f:
            f.write(b"MINE")
            store.put("c", b"theirs")
    assert e.value.errno == errno.EIO
    assert store.get("c") == b"theirs"
    assert any(k.startswith("c.conflict-") for k in keys(store))


def test_a_key_deleted_by_another_writer_is_a_conflict_not_a_retry(store: Bucket, mount):
    store.put("g", b"original")
    m = mount(store)
    with open(m.path / "g", "r+b") as f:
        f.write(b"MINE")
        store.delete("g")
    synced(m)
    ks = keys(store)
    assert len([k for k in ks if k.startswith("g.conflict-")]) == 1, ks
    assert m.stats()["uploads_failed"] == 0 and m.stats()["conflicts"] == 1


def test_a_conflict_name_fits_the_key_limit(store: Bucket, mount):
    name = "n" * 250  # a component of 250 bytes: +26 for the conflict suffix is too long
    store.put(name, b"original")
    m = mount(store)
    with open(m.path / name, "r+b") as f:
        f.write(b"MINE")
        store.put(name, b"theirs")
    synced(m)
    conflict = [k for k in keys(store) if ".conflict-" in k]
    assert len(conflict) == 1 and len(conflict[0]) <= 255
    assert store.get(conflict[0]) == b"MINEinal"


def test_two_mounts_writing_one_bucket_concurrently(store: Bucket, mount, tmp_path):
    """Two mounts write the same names at once: each name holds a version written to it,
    both daemons keep serving."""
    ma = mount(store, cache_dir=tmp_path / "ca")
    mb = mount(store, cache_dir=tmp_path / "cb")
    versions: dict[str, set[bytes]] = {}
    lock = threading.Lock()

    def writer(m, tag: str) -> None:
        for i in range(8):
            name = f"k{i % 3}"
            body = f"{tag}-{i}".encode() * 50
            (m.path / name).write_bytes(body)
            with lock:
                versions.setdefault(name, set()).add(body)
            time.sleep(0.05)

    threads = [threading.Thread(target=writer, args=(m, t)) for m, t in ((ma, "A"), (mb, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    synced(ma)
    synced(mb)
    stored = {store.get(k) for k in keys(store)}
    for name, vs in versions.items():
        assert store.get(name) in vs  # the name holds one of the versions written to it
    assert all(s is not None for s in stored)
    assert ma.proc is not None and ma.proc.poll() is None
    assert mb.proc is not None and mb.proc.poll() is None


# --- item 11: a multipart upload cut by kill -9 is aborted at the next mount -----------------


def test_a_multipart_upload_cut_by_kill_9_is_aborted(store: Bucket, mount, tmp_path):
    assert store.proxy is not None
    client, name = store.extra["client"], store.extra["name"]
    data = blob(12 << 20, 5)
    m = mount(store, "--upload-part-size", "5M", cache_dir=tmp_path / "c")
    store.proxy.slow(lambda meth, path: meth == "PUT" and "uploadId=" in path, 30)
    try:
        (m.path / "big").write_bytes(data)
        bg = subprocess.Popen([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the upload id is journaled before the first part goes out: wait for a part (an
        # upload listed by the server may not have reached the daemon's journal yet)
        wait_for(lambda: any(r.method == "PUT" and "uploadId" in r.query and name in r.path
                             for r in store.proxy.requests()), 30)
        kill_9(m)
        bg.wait(30)
    finally:
        store.proxy.slow(None, 0)
    assert len(client.list_multipart_uploads(Bucket=name)["Uploads"]) == 1
    m2 = mount(store, "--upload-part-size", "5M", cache_dir=tmp_path / "c")
    synced(m2)
    assert store.get("big") == data
    assert not client.list_multipart_uploads(Bucket=name).get("Uploads"), "none left to bill"
    assert "aborted a multipart upload" in m2.log_text()


# --- item 12: staging found under any spelling of the endpoint -------------------------------


def test_pending_uploads_are_found_under_another_spelling_of_the_endpoint(store: Bucket, mount,
                                                                          tmp_path):
    assert store.proxy is not None
    store.proxy.faults(1.0, ["503"], predicate=lambda r: r.method in ("PUT", "POST"))
    try:
        m = mount(store, cache_dir=tmp_path / "c")
        (m.path / "p.txt").write_bytes(b"pending")
        kill_9(m)
    finally:
        store.proxy.faults(0)
    other = store.proxy.url.replace("127.0.0.1", "localhost") + "/"
    m2 = mount(store, "--endpoint-url", other, cache_dir=tmp_path / "c")
    synced(m2)  # (a count of pending uploads would race the resumed upload itself)
    assert store.get("p.txt") == b"pending"
    assert "resuming the upload of 'p.txt'" in m2.log_text()


# --- item 10: a change to part of a big object that another writer replaced ------------------


@pytest.mark.parametrize("cached", [True, False])
def test_a_partial_change_to_a_replaced_big_object(store: Bucket, mount, cached: bool):
    base = blob(3 << 20, 6)
    store.put("big", base)
    m = mount(store, "--block-size", str(256 << 10))
    if cached:
        assert (m.path / "big").read_bytes() == base  # its blocks are in the cache
    with open(m.path / "big", "r+b") as f:
        f.write(b"MINE")
        store.put("big", b"theirs")
    first = sync(m)
    second = sync(m)
    assert store.get("big") == b"theirs"
    assert m.stats()["conflicts"] == 1, "counted once, not at every retry"
    conflict = [k for k in keys(store) if k.startswith("big.conflict-")]
    if cached:  # the bytes it did not rewrite come from the block cache
        assert first.returncode == 0, first.stderr
        assert len(conflict) == 1 and store.get(conflict[0]) == b"MINE" + base[4:]
    else:  # they are gone: kept in the staging area and reported, never half a file
        assert first.returncode == 1 and second.returncode == 1
        assert "changed meanwhile" in second.stderr
        assert conflict == []
        assert m.stats()["uploads_failed"] == 1


# --- item 19: the only writer never gets ESTALE ----------------------------------------------


def test_the_only_writer_reads_back_what_it_wrote_across_close_and_reopen(local_bucket: Bucket,
                                                                          mount):
    m = mount(local_bucket, "--block-size", "65536")
    p = m.path / "f.bin"
    model = bytearray()
    for i in range(40):  # fsx-style: change, close, reopen, read it all, with uploads between
        chunk = blob(70_000 + 997 * i, i)
        offset = (i * 37_001) % (len(model) + 1)
        with open(p, "r+b" if model else "wb") as f:
            f.seek(offset)
            f.write(chunk)
        model[offset:offset + len(chunk)] = chunk
        if i % 5 == 4:
            synced(m)
        with open(p, "rb") as f:  # a descriptor held while the next change uploads
            assert f.read() == bytes(model), i
    synced(m)
    assert local_bucket.get("f.bin") == bytes(model)


# --- fsstress's finds: a full cache disk at sync time ----------------------------------------


def test_sync_with_a_full_cache_disk_keeps_the_daemon(local_bucket: Bucket, mount, small_disk):
    m = mount(local_bucket, "--block-size", "256K", "--cache-size", "1M",
              cache_dir=small_disk / "cache")
    with contextlib.suppress(OSError), open(m.path / "big.bin", "wb") as f:
        for _ in range(16):
            f.write(b"x" * (1 << 20))
    r = sync(m)  # journaling it fails (no room): reported, never the daemon's end
    assert m.proc is not None and m.proc.poll() is None, m.log_text()[-2000:]
    assert r.returncode == 1 and "full" in r.stderr, r.stderr
    assert (m.path / "big.bin").exists()
    os.unlink(m.path / "big.bin")
    (m.path / "after.txt").write_bytes(b"still serving")
    synced(m)
    assert local_bucket.get("after.txt") == b"still serving"
    m.stop()


def test_an_upload_never_starts_under_a_folder_rename(store: Bucket, mount):
    """A folder rename moves a staged file (copying the bytes it keeps from its object to the
    new name first); an upload forced meanwhile (``fusefs sync``) must wait for the move, not
    upload under the old name (fsstress: the old name stayed, the new one became a conflict)."""
    assert store.proxy is not None
    data = blob(12 << 20, 11)
    store.put("d/f", data)
    m = mount(store, "--upload-part-size", "5M")  # parts the upload can copy server-side
    with open(m.path / "d/f", "r+b") as f:  # a change at the start: the rest stays the base's
        f.write(b"NEW")
    in_copy = held(store.proxy, "PUT", "e/f", 3)  # the move's server-side copy to the new name
    try:
        failed: list[OSError] = []

        def move() -> None:
            try:
                os.rename(m.path / "d", m.path / "e")
            except OSError as exc:
                failed.append(exc)

        mover = threading.Thread(target=move)
        mover.start()
        wait_for(in_copy, 20)
        forced = subprocess.Popen([sys.executable, "-m", "fusefs", "sync", str(m.path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mover.join(30)
        assert forced.wait(60) == 0
        assert not failed
    finally:
        store.proxy.slow(None, 0)
    synced(m)
    assert store.get("e/f") == b"NEW" + data[3:]
    assert [k for k in keys(store) if not k.endswith("/")] == ["e/f"], "no old name, no conflict"
    assert m.stats()["conflicts"] == 0


def test_a_file_uploaded_during_its_folder_rename_keeps_its_size(store: Bucket, mount):
    """A folder rename moves its staged files first, then copies what the store holds; a
    moved file's upload that ends meanwhile must reach the file under its new name (fsstress:
    it kept the size it had when created, 0, and the next write started from nothing)."""
    assert store.proxy is not None
    store.put("d/g", b"stored")
    m = mount(store)
    data = blob(1 << 20, 12)
    (m.path / "d/f").write_bytes(data)
    in_copy = held(store.proxy, "PUT", "e/g", 3)  # the copy of the stored object
    try:
        mover = threading.Thread(target=os.rename, args=(m.path / "d", m.path / "e"))
        mover.start()
        wait_for(in_copy, 20)
        synced(m)  # e/f, moved already, is uploaded while the rename still copies e/g
        mover.join(30)
    finally:
        store.proxy.slow(None, 0)
    synced(m)
    assert os.stat(m.path / "e/f").st_size == len(data)
    with open(m.path / "e/f", "ab") as f:
        f.write(b"+")
    synced(m)
    assert store.get("e/f") == data + b"+"
    assert m.stats()["conflicts"] == 0


def test_recreating_a_name_while_its_delete_is_in_flight(store: Bucket, mount):
    """A delete that waited for a reader is sent when the reader closes; a file created under
    that name while the DELETE is in flight must not take the deleted version as its upload's
    condition (the model test: the new file went to a conflict name, its own name empty)."""
    assert store.proxy is not None
    store.put("a", b"stored")
    m = mount(store)
    reader = open(m.path / "a", "rb")
    os.unlink(m.path / "a")  # the delete waits for the reader
    in_delete = held(store.proxy, "DELETE", "a", 1.5)  # (within the 2 s stall timeout)
    try:
        reader.close()  # the delete goes out now, and is held
        wait_for(in_delete, 20)
        with open(m.path / "a", "wb") as f:  # created while the DELETE is in flight
            f.write(b"new a")
            wait_for(lambda: not in_delete(), 20)  # uploaded only after it ended
        synced(m)
    finally:
        store.proxy.slow(None, 0)
    synced(m)
    assert store.get("a") == b"new a"
    assert keys(store) == ["a"], "no conflict copy"
    assert m.stats()["conflicts"] == 0


def test_a_renamed_folder_keeps_listing_its_sub_folders_after_the_uploads(bucket: Bucket, mount):
    """Staged files moved by a folder rename upload afterwards: the folder listed before
    (showing them from staging) must go on listing the sub-folders their uploads made."""
    m = mount(bucket)
    (m.path / "a/b/c").mkdir(parents=True)
    (m.path / "a/b/c/f").write_bytes(b"x")
    (m.path / "a/g").write_bytes(b"y")
    os.rename(m.path / "a", m.path / "z")
    assert sorted(os.listdir(m.path / "z")) == ["b", "g"]  # listed while still staged
    synced(m)
    assert sorted(os.listdir(m.path / "z")) == ["b", "g"]
    assert os.listdir(m.path / "z/b") == ["c"]
    assert (m.path / "z/b/c/f").read_bytes() == b"x"
    assert os.listdir(m.path) == ["z"]
    assert bucket.get("z/b/c/f") == b"x" and bucket.get("a/g") is None


def test_a_folder_rename_keeps_big_files_readable_and_writable(local_bucket: Bucket, mount):
    """A local source's copy is a new file (a new version): the mount follows it (fsstress
    found ESTALE here, and then an upload that failed for good)."""
    m = mount(local_bucket)
    data = blob(9 << 20, 7)
    (m.path / "sh1/a").mkdir(parents=True)
    with open(m.path / "sh1/a/f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    os.rename(m.path / "sh1/a", m.path / "sh1/z")
    drop = os.open(m.path / "sh1/z/f", os.O_RDONLY)
    try:
        assert os.pread(drop, 1 << 20, 8 << 20) == data[8 << 20:9 << 20]
    finally:
        os.close(drop)
    with open(m.path / "sh1/z/f", "ab") as f:
        f.write(b"more")
    synced(m)
    assert local_bucket.get("sh1/z/f") == data + b"more"
    assert local_bucket.get("sh1/a/f") is None


# --- pjdfstest's finds: errnos as ext4 gives them --------------------------------------------


def test_errnos_of_long_names_huge_sizes_and_unlinked_files(local_bucket: Bucket, mount):
    m = mount(local_bucket)
    long = "x" * 256
    for call in (lambda: open(m.path / long, "w"), lambda: os.stat(m.path / long),
                 lambda: os.rename(m.path / "f", m.path / long)):
        (m.path / "f").write_bytes(b"f")
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        os.truncate(m.path / "f", 999_999_999_999_999)
    assert e.value.errno in (errno.EFBIG, errno.EINVAL)  # ext4: EFBIG
    fd = os.open(m.path / "f", os.O_RDONLY)
    try:
        os.unlink(m.path / "f")
        assert os.fstat(fd).st_nlink == 0  # pjdfstest unlink/14.t
    finally:
        os.close(fd)


def test_a_renamed_away_name_whose_delete_fails_never_comes_back(store: Bucket, mount,
                                                                 tmp_path):
    """Item 7: the old name's delete is refused for a while, then the daemon is killed: the
    journaled delete runs at the next mount; the old name never reappears."""
    assert store.proxy is not None
    store.put("old", b"content")
    m = mount(store, cache_dir=tmp_path / "c")
    store.proxy.faults(1.0, ["503"], predicate=lambda r: r.method == "DELETE")
    try:
        os.rename(m.path / "old", m.path / "new")
        assert not (m.path / "old").exists()
        assert store.get("old") == b"content"  # its delete is refused, kept
        assert m.stats()["deletes_pending"] == 1
        kill_9(m)
    finally:
        store.proxy.faults(0)
    m2 = mount(store, cache_dir=tmp_path / "c")
    synced(m2)
    assert store.get("old") is None and store.get("new") == b"content"
    assert sorted(os.listdir(m2.path)) == ["new"]


def test_deletes_are_conditional_on_every_store(bucket: Bucket, mount, tmp_path):
    """Item 5 on GCS (ifGenerationMatch), Azure (If-Match) and local sources too."""
    bucket.put("a", b"original")
    m = mount(bucket, cache_dir=tmp_path / "ca")
    reader = open(m.path / "a", "rb")
    os.unlink(m.path / "a")  # deleted once the reader closes
    time.sleep(1.1)  # another version: a local source's mtime and ctime move on
    bucket.put("a", b"theirs, meanwhile")
    reader.close()
    synced(m)
    assert bucket.get("a") == b"theirs, meanwhile"
    (m.path / "b").write_bytes(b"mine")
    synced(m)
    os.unlink(m.path / "b")  # nobody reads it: deleted at once, conditionally
    synced(m)
    assert bucket.get("b") is None


@pytest.mark.parametrize("opened", ["before-upload", "after-upload", "written-unchanged"])
@pytest.mark.parametrize("change", ["replace", "remove"])
def test_a_name_another_mount_changed_shows_while_a_reader_holds_this_mounts_version(
        store: Bucket, mount, tmp_path, change: str, opened: str):
    """This mount wrote ``a`` and a reader still holds it when another mount replaces or
    removes it: once the metadata TTL has passed the name shows the other's change, and the
    reader keeps reading its own bytes (or gets ESTALE). Found by the model with a second
    mount; before the fix a reader opened before the upload kept the staged file on the name
    (the old bytes shown for as long as it was open), and one opened after shared the new
    version's inode, so its reads came from the new file's pages."""
    ma = mount(store, "--metadata-ttl", "1", cache_dir=tmp_path / "ca")
    (ma.path / "a").write_bytes(b"mine")
    if opened != "before-upload":
        synced(ma)
    with open(ma.path / "a", "rb", buffering=0) as reader:
        if opened == "before-upload":
            synced(ma)
        elif opened == "written-unchanged":  # opened for writing and closed unchanged
            os.close(os.open(ma.path / "a", os.O_RDWR))  # (the write model found it)
        mb = mount(store, "--metadata-ttl", "0", cache_dir=tmp_path / "cb")
        if change == "replace":
            (mb.path / "a").write_bytes(b"theirs, longer")
        else:
            os.unlink(mb.path / "a")
        synced(mb)
        time.sleep(1.5)  # this mount's TTL
        if change == "replace":
            assert (ma.path / "a").read_bytes() == b"theirs, longer"
        else:
            assert not (ma.path / "a").exists()
            assert "a" not in os.listdir(ma.path)
        try:
            assert os.pread(reader.fileno(), 100, 0) == b"mine"
        except OSError as e:
            assert e.errno == errno.ESTALE
    synced(ma)
    assert store.get("a") == (b"theirs, longer" if change == "replace" else None)
    assert ma.stats()["conflicts"] == 0


def test_a_descriptor_on_a_file_another_mount_removed_gets_estale(store: Bucket, mount,
                                                                    tmp_path):
    """A file opened here and removed by another mount before its bytes were read: reading it
    is ESTALE (the file this handle opened is gone), not ENOENT (found by the write model)."""
    mb = mount(store, cache_dir=tmp_path / "cb")
    (mb.path / "f").write_bytes(b"x" * 100_000)
    synced(mb)
    # (its open's stat learns the metadata with a HEAD: "auto" would GET the small file whole
    # at the open, and the read would then be served from the cache)
    ma = mount(store, "--metadata-probe", "head", cache_dir=tmp_path / "ca")
    fd = os.open(ma.path / "f", os.O_RDONLY)
    try:
        os.unlink(mb.path / "f")
        synced(mb)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.ESTALE
    finally:
        os.close(fd)
    assert ma.proc is not None and ma.proc.poll() is None


def test_a_write_open_that_changes_nothing_is_closed_not_crashed(store: Bucket, mount,
                                                                 tmp_path):
    """``open(O_TRUNC)`` of an empty file and ``close`` change nothing; a ``kill -9`` after
    must not leave the file "never closed (crash?)" as failed (the journal kept the open
    state: found by the write model)."""
    m = mount(store, cache_dir=tmp_path / "c")
    (m.path / "e").write_bytes(b"")
    synced(m)
    with open(m.path / "e", "wb"):
        pass
    kill_9(m)
    m2 = mount(store, cache_dir=tmp_path / "c")
    synced(m2)
    assert store.get("e") == b""
    assert m2.stats()["uploads_failed"] == 0


def test_writing_through_a_descriptor_on_a_replaced_file_leaves_no_failed_upload(
        store: Bucket, mount, tmp_path):
    """A writer keeps writing to a file that ``mv`` replaced: nothing of it is uploaded, and a
    ``kill -9`` after must not bring it back as a failed "never closed" upload (its journal
    row, dropped at the rename, came back with the next write: found by the write model)."""
    m = mount(store, cache_dir=tmp_path / "c")
    (m.path / "a").write_bytes(b"old")
    synced(m)
    fd = os.open(m.path / "a", os.O_RDWR)
    reader = os.open(m.path / "a", os.O_RDONLY)
    try:
        (m.path / "new").write_bytes(b"new")
        os.rename(m.path / "new", m.path / "a")
        os.pwrite(fd, b"written after the rename", 10)
    finally:
        os.close(fd)
    kill_9(m)  # while the reader still holds the replaced file
    with contextlib.suppress(OSError):
        os.close(reader)  # ENOTCONN: its mount is gone
    m2 = mount(store, cache_dir=tmp_path / "c")
    synced(m2)
    assert store.get("a") == b"new"
    assert keys(store) == ["a"]
    assert m2.stats()["uploads_failed"] == 0


def test_an_open_uploaded_file_keeps_its_name_after_the_ttl_while_the_store_holds_it(
        store: Bucket, mount, tmp_path):
    """A file this mount uploaded and still has open, asked for again after the metadata TTL:
    the store still holds its upload, so the name stays the open file (a change through the
    name reaches the descriptor, and nothing becomes a conflict), and asking cost requests
    of the name's folder only (no GET, no PUT)."""
    m = mount(store, "--metadata-ttl", "1", cache_dir=tmp_path / "c")
    (m.path / "f").write_bytes(b"x" * 900)
    fd = os.open(m.path / "f", os.O_RDONLY)
    try:
        synced(m)
        time.sleep(1.5)
        store.proxy.reset()
        assert os.stat(m.path / "f").st_size == 900
        assert "f" in os.listdir(m.path)
        sent = store.proxy.requests()
        assert sent and all(r.method == "GET" and "list-type" in r.query
                            or r.method == "HEAD" for r in sent), [
            (r.method, r.path) for r in sent]
        os.truncate(m.path / "f", 10)
        assert os.pread(fd, 3000, 0) == b"x" * 10
    finally:
        os.close(fd)
    synced(m)
    assert store.get("f") == b"x" * 10
    assert m.stats()["conflicts"] == 0


def test_a_descriptor_sees_changes_made_through_the_name_after_the_upload(store: Bucket,
                                                                          mount):
    """A descriptor open on a staged file keeps seeing changes made through its name once
    the file is uploaded (one file, one inode). Found by the write model, seed 100626373: a
    staged file that only readers held left its name at its upload, and a truncate through
    the name then changed another file than the one the descriptor read."""
    m = mount(store)
    (m.path / "f").write_bytes(b"x" * 900)
    fd = os.open(m.path / "f", os.O_RDONLY)
    try:
        synced(m)
        os.truncate(m.path / "f", 0)
        os.truncate(m.path / "f", 2000)
        assert os.pread(fd, 3000, 0) == bytes(2000)
    finally:
        os.close(fd)


def test_a_folder_renamed_away_stays_away_while_and_after_its_deletes_wait(
        store: Bucket, mount, tmp_path):
    """Item 15 (fsstress, found after the last stop: folders renamed away came back until the
    TTL). A reader holds ``d/f`` and ``mv d e`` runs: the delete of ``d/f`` waits for the
    reader (it keeps its bytes). A listing made meanwhile (after the TTL) finds ``d/`` in the
    store: it must not show; nor after the delete ran (that listing must not be trusted for
    the rest of its TTL)."""
    store.put("top/d/f", b"x" * 1000)
    m = mount(store, "--metadata-ttl", "3", cache_dir=tmp_path / "c")
    fd = os.open(m.path / "top/d/f", os.O_RDONLY)
    try:
        os.rename(m.path / "top/d", m.path / "top/e")
        assert m.stats()["deletes_pending"] == 1  # d/f: the reader keeps it
        time.sleep(3.3)  # the TTL: the next listing of top asks the store (d/f is there)
        assert sorted(os.listdir(m.path / "top")) == ["e"]
        assert not (m.path / "top/d").exists()
        assert os.pread(fd, 10, 0) == b"x" * 10
    finally:
        os.close(fd)
    synced(m)  # the delete of d/f
    assert m.stats()["deletes_pending"] == 0
    assert sorted(os.listdir(m.path / "top")) == ["e"]
    assert not (m.path / "top/d").exists()
    assert store.get("top/d/f") is None and store.get("top/e/f") == b"x" * 1000


def test_a_file_another_mount_removed_while_held_here_never_comes_back_after_kill_9(
        store: Bucket, mount, tmp_path):
    """This mount uploaded ``a``, a reader holds it, another mount removes it; once this
    mount has seen that (a lookup after the TTL), a ``kill -9`` and a remount must not
    upload ``a`` again from the staging journal (found by the write model: the file came
    back in the bucket)."""
    ma = mount(store, "--metadata-ttl", "1", cache_dir=tmp_path / "ca")
    fd = os.open(ma.path / "a", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"mine")
    reader = os.open(ma.path / "a", os.O_RDONLY)
    os.close(fd)
    try:
        synced(ma)
        mb = mount(store, "--metadata-ttl", "0", cache_dir=tmp_path / "cb")
        os.unlink(mb.path / "a")
        synced(mb)
        time.sleep(1.5)
        assert not (ma.path / "a").exists()
        time.sleep(0.5)  # (its journal row goes in the background)
        kill_9(ma)
    finally:
        with contextlib.suppress(OSError):
            os.close(reader)
    m2 = mount(store, cache_dir=tmp_path / "ca")
    synced(m2)
    assert store.get("a") is None
    assert m2.stats()["uploads_failed"] == 0 and m2.stats()["conflicts"] == 0
