"""POSIX semantics on real mounts (issue 20): symbolic links kept as s3fs keeps them (an
object whose ``mode`` metadata has ``S_IFLNK``, the target as its content), FIFOs and sockets
as metadata-only objects, hard links refused. Every store: S3 (moto and SeaweedFS), GCS,
Azure, local; what the bucket holds is read with the SDK, never through the mount."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
from conftest import Bucket, make_s3_bucket
from test_writes import sync

from fusefs.testing.proxy import is_file_head, is_head, is_object_get


@pytest.fixture(params=["s3", "seaweed", "gcs", "azure", "local"])
def anystore(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    """A fresh bucket on each store in turn (S3 on moto and on SeaweedFS)."""
    if request.param == "seaweed":
        b = make_s3_bucket(request.getfixturevalue("seaweed_server"))
    else:
        b = request.getfixturevalue("bucket_" + request.param)
    b.kind = request.param
    return b


@pytest.fixture
def bucket_s3(s3_server) -> Bucket:  # type: ignore[no-untyped-def]
    return make_s3_bucket(s3_server)


@pytest.fixture
def bucket_gcs(gcs_server) -> Bucket:  # type: ignore[no-untyped-def]
    from conftest import make_gcs_bucket
    return make_gcs_bucket(gcs_server)


@pytest.fixture
def bucket_azure(azure_server) -> Bucket:  # type: ignore[no-untyped-def]
    from conftest import make_azure_bucket
    return make_azure_bucket(azure_server)


@pytest.fixture
def bucket_local(tmp_path: Path) -> Bucket:
    from conftest import make_local_bucket
    return make_local_bucket(tmp_path / "objects")


def stored_mode(b: Bucket, key: str) -> int | None:
    """The ``mode`` metadata of an object, read with the store's SDK (or lstat, locally)."""
    if b.kind in ("s3", "seaweed"):
        meta = b.extra["client"].head_object(Bucket=b.extra["name"], Key=key)["Metadata"]
    elif b.kind == "gcs":
        blob = b.extra["client"].bucket(b.extra["name"]).get_blob(key)
        meta = blob.metadata or {}
    elif b.kind == "azure":
        meta = b.extra["client"].get_blob_client(key).get_blob_properties().metadata
    else:
        return os.lstat(Path(b.source[len("file://"):]) / key).st_mode
    if "mode" not in meta:
        return None
    text = meta["mode"]  # read as s3fs does (strtol base 0): a leading 0 is octal
    return int(text, 8) if text.startswith("0") else int(text)


def test_symlink_round_trip_and_after_remount(anystore: Bucket, mount, tmp_path: Path) -> None:
    b = anystore
    m = mount(b)
    (m.path / "data").mkdir()
    (m.path / "data" / "v3.txt").write_bytes(b"version three")
    os.symlink("data/v3.txt", m.path / "latest")
    os.symlink("v3.txt", m.path / "data" / "current")
    st = os.lstat(m.path / "latest")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("data/v3.txt")
    assert os.readlink(m.path / "latest") == "data/v3.txt"
    assert (m.path / "latest").read_bytes() == b"version three"  # the kernel follows it
    assert sorted(os.listdir(m.path)) == ["data", "latest"]
    with pytest.raises(OSError) as e:
        os.open(m.path / "latest", os.O_RDONLY | os.O_NOFOLLOW)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(FileExistsError):
        os.symlink("elsewhere", m.path / "latest")
    assert sync(m).returncode == 0
    # the bucket holds it as s3fs does: the target as content, S_IFLNK in "mode"
    mode = stored_mode(b, "latest")
    assert mode is not None and stat.S_ISLNK(mode)
    if b.kind != "local":
        assert b.get("latest") == b"data/v3.txt"
    else:
        assert os.readlink(Path(b.source[len("file://"):]) / "latest") == "data/v3.txt"
    # a second mount on a fresh cache sees the links as links
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    assert stat.S_ISLNK(os.lstat(m2.path / "latest").st_mode)
    assert os.readlink(m2.path / "data" / "current") == "v3.txt"
    assert (m2.path / "data" / "current").read_bytes() == b"version three"
    kinds = {e.name: e.is_symlink() for e in os.scandir(m2.path / "data")}
    assert kinds == {"current": True, "v3.txt": False}
    # rename and unlink a link: the link moves, its target is untouched
    os.rename(m2.path / "latest", m2.path / "newest")
    assert os.readlink(m2.path / "newest") == "data/v3.txt"
    os.unlink(m2.path / "newest")
    assert not os.path.lexists(m2.path / "newest")
    assert (m2.path / "data" / "v3.txt").read_bytes() == b"version three"


@pytest.mark.parametrize("kind", ["s3", "seaweed"])
def test_links_written_by_the_sdk_in_s3fs_convention(kind: str, request, mount) -> None:
    """s3fs writes ``mode`` in decimal (``41471``) and the target as content: a link on the
    mount. A listing carries no metadata: the small object is fetched once (a GET, which
    also fills the block cache), a big one never."""
    server = request.getfixturevalue("seaweed_server" if kind == "seaweed" else "s3_server")
    b = make_s3_bucket(server)
    client, name = b.extra["client"], b.extra["name"]
    client.put_object(Bucket=name, Key="dir/link", Body=b"../target",
                      Metadata={"mode": str(stat.S_IFLNK | 0o777), "mtime": "1700000000"})
    client.put_object(Bucket=name, Key="dir/fifo", Body=b"",
                      Metadata={"mode": str(stat.S_IFIFO | 0o640)})
    client.put_object(Bucket=name, Key="dir/small.txt", Body=b"just text")
    client.put_object(Bucket=name, Key="dir/big.bin", Body=b"x" * 10000)
    client.put_object(Bucket=name, Key="target", Body=b"the target")
    m = mount(b)
    b.proxy.reset()
    entries = {e.name: e for e in os.scandir(m.path / "dir")}
    assert entries["link"].is_symlink() and not entries["small.txt"].is_symlink()
    assert stat.S_ISFIFO(entries["fifo"].stat(follow_symlinks=False).st_mode)
    assert stat.S_IMODE(os.lstat(m.path / "dir" / "fifo").st_mode) == 0o640
    assert os.readlink(m.path / "dir" / "link") == "../target"
    assert (m.path / "dir" / "link").read_bytes() == b"the target"
    assert (m.path / "dir" / "small.txt").read_bytes() == b"just text"
    assert b.proxy.count(predicate=is_head) == 1  # the folder's marker "dir/", at its lookup
    # one GET each for the three small objects of dir/ (their bytes then cached), one for
    # "target" when the kernel follows the link; none for big.bin
    assert b.proxy.count(predicate=is_object_get) == 4


def test_link_count_after_remount_on_same_cache(s3_bucket: Bucket, mount, tmp_path: Path) -> None:
    """The type learnt of a version is remembered: a second mount on the same cache sends
    nothing more for it."""
    client, name = s3_bucket.extra["client"], s3_bucket.extra["name"]
    for i in range(5):
        client.put_object(Bucket=name, Key=f"f{i}", Body=b"tiny")
    m = mount(s3_bucket)
    s3_bucket.proxy.reset()
    assert len(os.listdir(m.path)) == 5 and all(
        not os.path.islink(m.path / f"f{i}") for i in range(5))
    assert s3_bucket.proxy.count(predicate=is_object_get) == 5
    m.stop()
    m2 = mount(s3_bucket)  # the same cache directory
    s3_bucket.proxy.reset()
    assert [(m2.path / f"f{i}").read_bytes() for i in range(5)] == [b"tiny"] * 5
    assert s3_bucket.proxy.count(predicate=is_head) == 0


def test_fifo_and_socket_are_metadata_only_objects(anystore: Bucket, mount) -> None:
    b = anystore
    m = mount(b)
    os.mkfifo(m.path / "pipe", 0o640)
    st = os.lstat(m.path / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    os.mknod(m.path / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.lstat(m.path / "sock").st_mode)
    assert sync(m).returncode == 0
    mode = stored_mode(b, "pipe")
    assert mode is not None and stat.S_ISFIFO(mode)
    if b.kind != "local":
        assert b.get("pipe") == b""



@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_device_nodes_are_metadata_only_objects(anystore: Bucket, mount, tmp_path: Path
                                                ) -> None:
    """A device node keeps its type in ``mode`` and its number in ``rdev`` (s3fs's names);
    the mount is ``nodev``: it cannot be opened as a device there."""
    b = anystore
    m = mount(b)
    os.mknod(m.path / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(m.path / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 9))
    st = os.lstat(m.path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o640
    with pytest.raises(PermissionError):  # nodev
        open(m.path / "null", "rb")
    assert sync(m).returncode == 0
    mode = stored_mode(b, "null")
    assert mode is not None and stat.S_ISCHR(mode)
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    st = os.lstat(m2.path / "blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 9)
    os.rename(m2.path / "blk", m2.path / "blk2")
    assert os.lstat(m2.path / "blk2").st_rdev == os.makedev(7, 9)


def test_hard_links_stay_refused(local_bucket: Bucket, mount) -> None:
    m = mount(local_bucket)
    (m.path / "a").write_bytes(b"a")
    with pytest.raises(PermissionError):
        os.link(m.path / "a", m.path / "b")


def test_local_links_inside_shown_outside_refused(local_bucket: Bucket, mount,
                                                  tmp_path: Path) -> None:
    root = Path(local_bucket.source[len("file://"):])
    (root / "sub").mkdir()
    (root / "sub" / "file").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    os.symlink("sub/file", root / "in")
    os.symlink("../sub/file", root / "sub" / "up")
    os.symlink(str(tmp_path / "secret"), root / "abs")
    os.symlink("../secret", root / "escape")
    os.symlink("sub/../../secret", root / "sneaky")
    m = mount(local_bucket)
    assert sorted(os.listdir(m.path)) == ["in", "sub"]
    assert os.readlink(m.path / "in") == "sub/file"
    assert (m.path / "sub" / "up").read_bytes() == b"inside"
    for name in ("abs", "escape", "sneaky"):
        assert not os.path.lexists(m.path / name)
    with pytest.raises(PermissionError):  # a link that could lead out is not made either
        os.symlink("../../etc/passwd", m.path / "sub" / "out")
    with pytest.raises(PermissionError):
        os.symlink("/etc/passwd", m.path / "out")
    assert not os.path.lexists(root / "out")


def test_unused_socket_module_guard() -> None:
    assert socket.AF_UNIX  # sockets are made with mknod above, never bound


# --- owners ----------------------------------------------------------------------------------


def stored_owner(b: Bucket, key: str) -> tuple[int | None, int | None]:
    """``uid``/``gid`` metadata of an object, read with the SDK (lstat's, locally)."""
    if b.kind in ("s3", "seaweed"):
        meta = b.extra["client"].head_object(Bucket=b.extra["name"], Key=key)["Metadata"]
    elif b.kind == "gcs":
        meta = b.extra["client"].bucket(b.extra["name"]).get_blob(key).metadata or {}
    elif b.kind == "azure":
        meta = b.extra["client"].get_blob_client(key).get_blob_properties().metadata
    else:
        st = os.lstat(Path(b.source[len("file://"):]) / key)
        return st.st_uid, st.st_gid
    return (int(meta["uid"]) if "uid" in meta else None,
            int(meta["gid"]) if "gid" in meta else None)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_chown_is_stored_and_survives_a_remount(anystore: Bucket, mount, tmp_path: Path) -> None:
    b = anystore
    m = mount(b)
    (m.path / "f").write_bytes(b"owned")
    os.symlink("f", m.path / "ln")
    os.chown(m.path / "f", 1234, 5678)
    os.chown(m.path / "ln", 4321, 8765, follow_symlinks=False)  # lchown: the link itself
    st = os.stat(m.path / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (os.lstat(m.path / "ln").st_uid, os.lstat(m.path / "ln").st_gid) == (4321, 8765)
    os.chmod(m.path / "f", 0o6755)  # setuid/setgid are never stored
    assert stat.S_IMODE(os.stat(m.path / "f").st_mode) & 0o6000 == 0
    assert sync(m).returncode == 0
    assert stored_owner(b, "f") == (1234, 5678)
    assert stored_owner(b, "ln") == (4321, 8765)
    # a rewrite keeps the owner; a fresh mount (another cache) shows it
    with open(m.path / "f", "ab") as f:
        f.write(b"!")
    assert sync(m).returncode == 0
    assert stored_owner(b, "f") == (1234, 5678)
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    st = os.stat(m2.path / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert os.lstat(m2.path / "ln").st_uid == 4321
    os.rename(m2.path / "f", m2.path / "g")  # a rename keeps it
    assert os.stat(m2.path / "g").st_uid == 1234


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_default_owner_and_objects_owned_in_s3fs_metadata(s3_bucket: Bucket, mount) -> None:
    """s3fs's decimal ``uid``/``gid``/``mode`` are read; ``--uid``/``--gid`` are the owner of
    objects without; a file a user creates is theirs."""
    client, name = s3_bucket.extra["client"], s3_bucket.extra["name"]
    client.put_object(Bucket=name, Key="theirs", Body=b"small",
                      Metadata={"uid": "1001", "gid": "1002", "mode": "33261"})
    client.put_object(Bucket=name, Key="nobody-said", Body=b"y")
    m = mount(s3_bucket, "--uid", "2000", "--gid", "3000")
    st = os.stat(m.path / "nobody-said")
    assert (st.st_uid, st.st_gid) == (2000, 3000)
    st = os.stat(m.path / "theirs")  # a small object: its metadata came with its bytes
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1001, 1002, 0o755)
    (m.path / "mine").write_bytes(b"m")  # root made it, and root is not the default owner
    assert os.stat(m.path / "mine").st_uid == 0
    assert sync(m).returncode == 0
    assert stored_owner(s3_bucket, "mine") == (0, 0)


def test_links_written_with_each_sdk_are_links(anystore: Bucket, mount) -> None:
    """An object written with the store's own SDK in s3fs's convention (decimal ``mode``
    with S_IFLNK, the target as content) is a link on a fresh mount, on every store."""
    b = anystore
    if b.kind == "local":
        pytest.skip("a local source keeps real links (test_local_links_inside_...)")
    meta = {"mode": str(stat.S_IFLNK | 0o777)}
    if b.kind in ("s3", "seaweed"):
        b.extra["client"].put_object(Bucket=b.extra["name"], Key="l", Body=b"t/x", Metadata=meta)
    elif b.kind == "gcs":
        blob = b.extra["client"].bucket(b.extra["name"]).blob("l")
        blob.metadata = meta
        blob.upload_from_string(b"t/x")
    else:
        b.extra["client"].upload_blob("l", b"t/x", metadata=meta)
    b.put("t/x", b"through the link")
    m = mount(b)
    assert [e.name for e in os.scandir(m.path) if e.is_symlink()] == ["l"]
    assert os.readlink(m.path / "l") == "t/x"
    assert (m.path / "l").read_bytes() == b"through the link"


def test_a_rewrite_keeps_mode_and_owner(anystore: Bucket, mount) -> None:
    """Changing a file's bytes keeps the mode (and owner) kept in its metadata: an
    executable stays executable after an edit (it lost its mode in the store before)."""
    b = anystore
    m = mount(b)
    (m.path / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(m.path / "run.sh", 0o750)
    assert sync(m).returncode == 0
    with open(m.path / "run.sh", "ab") as f:
        f.write(b"echo hi\n")
    assert sync(m).returncode == 0
    mode = stored_mode(b, "run.sh")
    assert mode is not None and stat.S_IMODE(mode) == 0o750


# --- metadata after a remount on a fresh cache (issue 20 item 7) --------------------------

#: attributes the SDK writes in s3fs's form: an executable, another owner, an old mtime
EXEC_META = {"mode": "0100755", "uid": "1234", "gid": "2345", "mtime": "1600000000.5"}


def put_with_meta(b: Bucket, key: str, data: bytes, meta: dict[str, str]) -> None:
    """Write an object with user metadata through the store's own SDK."""
    if b.kind in ("s3", "seaweed"):
        b.extra["client"].put_object(Bucket=b.extra["name"], Key=key, Body=data, Metadata=meta)
    elif b.kind == "gcs":
        blob = b.extra["client"].bucket(b.extra["name"]).blob(key)
        blob.metadata = meta
        blob.upload_from_string(data)
    else:
        b.extra["client"].upload_blob(key, data, metadata=meta)


def shows_exec_meta(st: os.stat_result) -> bool:
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (
        0o755, 1234, 2345, 1600000000.5)


def ls_l(path: Path) -> dict[str, os.stat_result]:
    """What ``ls -l`` asks: the folder's entries (READDIRPLUS), then an lstat of each, one
    at a time."""
    return {e.name: os.lstat(path / e.name) for e in sorted(os.scandir(path), key=lambda e: e.name)}


@pytest.mark.parametrize("kind", ["s3", "seaweed"])
@pytest.mark.parametrize("size", [100_000, 2_000_000])
def test_ls_l_on_a_fresh_mount_shows_metadata_at_one_request_per_file(
        kind: str, size: int, request, mount, tmp_path: Path) -> None:
    """S3 listings lack user metadata: the first stat of a file above the link probe size
    fetches it, once per object version: a GET of an object of at most 1 MiB (its bytes kept
    in the block cache: reading it then costs nothing), a HEAD of a bigger one. Remembered
    across a remount on the same cache (no request then)."""
    server = request.getfixturevalue("seaweed_server" if kind == "seaweed" else "s3_server")
    b = make_s3_bucket(server)
    b.kind = kind
    n = 12
    for i in range(n):
        put_with_meta(b, f"d/f{i:02d}", bytes([i]) * size, EXEC_META)
    m = mount(b, cache_dir=tmp_path / "c")
    b.proxy.reset()
    got = ls_l(m.path / "d")
    assert len(got) == n and all(shows_exec_meta(st) for st in got.values()), got
    heads, gets = b.proxy.count(predicate=is_file_head), b.proxy.count(predicate=is_object_get)
    assert (heads, gets) == ((0, n) if size <= 1 << 20 else (n, 0))
    # stat again, and read: only what the read needs that the stat did not fetch
    b.proxy.reset()
    assert all(shows_exec_meta(st) for st in ls_l(m.path / "d").values())
    assert (m.path / "d/f03").read_bytes() == bytes([3]) * size
    assert b.proxy.count(predicate=is_file_head) == 0
    assert b.proxy.count(predicate=is_object_get) == (0 if size <= 1 << 20 else 1)
    m.stop()
    m2 = mount(b, cache_dir=tmp_path / "c")  # the same cache: remembered (attrs.json)
    b.proxy.reset()
    assert all(shows_exec_meta(st) for st in ls_l(m2.path / "d").values())
    assert b.proxy.count(predicate=is_file_head) == 0
    assert b.proxy.count(predicate=is_object_get) == 0


@pytest.mark.parametrize("size", [100_000, 2_000_000])
def test_ls_l_with_metadata_probe_head_and_off(s3_bucket: Bucket, mount, tmp_path: Path,
                                                size: int) -> None:
    """``--metadata-probe head``: a HEAD per file whatever its size; ``off``: no request,
    the defaults shown (as before item 7)."""
    b = s3_bucket
    b.kind = "s3"
    for i in range(5):
        put_with_meta(b, f"f{i}", b"z" * size, EXEC_META)
    m = mount(b, "--metadata-probe", "head", cache_dir=tmp_path / "c1")
    b.proxy.reset()
    assert all(shows_exec_meta(st) for st in ls_l(m.path).values())
    assert (b.proxy.count(predicate=is_file_head), b.proxy.count(predicate=is_object_get)) == (5, 0)
    m.stop()
    m2 = mount(b, "--metadata-probe", "off", cache_dir=tmp_path / "c2")
    b.proxy.reset()
    got = ls_l(m2.path)
    assert not any(shows_exec_meta(st) for st in got.values())
    assert all(stat.S_IMODE(st.st_mode) == 0o644 for st in got.values())
    assert b.proxy.count(predicate=is_file_head) == 0
    assert b.proxy.count(predicate=is_object_get) == 0


@pytest.mark.parametrize("kind", ["s3", "seaweed"])
def test_training_reads_by_path_gain_no_request(kind: str, request, mount, tmp_path: Path
                                                ) -> None:
    """A training loop opens files by path and reads them, never asking their mode. The
    kernel's permission check (``default_permissions``) still asks for the attributes of a
    file whose metadata is unknown, so the open's GETATTR fetches it: a GET of the whole
    object (at most 1 MiB), which the read then takes from the cache. One GET per file, no
    HEAD: what reading cost before item 7. And the file's mode is known after."""
    server = request.getfixturevalue("seaweed_server" if kind == "seaweed" else "s3_server")
    b = make_s3_bucket(server)
    b.kind = kind
    n = 20
    for i in range(n):
        put_with_meta(b, f"train/{i:03d}.jpg", bytes([i]) * 50_000, EXEC_META)
    m = mount(b, cache_dir=tmp_path / "c")
    b.proxy.reset()
    for i in range(n):
        with open(m.path / f"train/{i:03d}.jpg", "rb") as f:
            assert f.read() == bytes([i]) * 50_000
    assert b.proxy.count(predicate=is_file_head) == 0
    assert b.proxy.count(predicate=is_object_get) == n
    b.proxy.reset()
    assert shows_exec_meta(os.stat(m.path / "train/007.jpg"))
    assert len(b.proxy.requests()) == 0


def test_gcs_and_azure_listings_need_no_request_for_metadata(anystore: Bucket, mount) -> None:
    """GCS, Azure and local listings carry each object's metadata: ``ls -l`` of files written
    by the SDK sends no request per file, and reading them only their GETs."""
    b = anystore
    if b.kind in ("s3", "seaweed"):
        pytest.skip("S3 listings lack metadata (the tests above)")
    n = 8
    for i in range(n):
        if b.kind == "local":
            b.put(f"d/f{i}", b"q" * 100_000)
            os.chmod(Path(b.source[len("file://"):]) / f"d/f{i}", 0o755)
        else:
            put_with_meta(b, f"d/f{i}", b"q" * 100_000, EXEC_META)
    m = mount(b)
    if b.proxy is not None:
        b.proxy.reset()
    got = ls_l(m.path / "d")
    assert all(stat.S_IMODE(st.st_mode) == 0o755 for st in got.values())
    if b.kind != "local":
        assert all(shows_exec_meta(st) for st in got.values())
        assert b.proxy.count(predicate=is_file_head) == 0
        assert b.proxy.count(predicate=is_object_get) == 0
        for i in range(n):
            assert (m.path / f"d/f{i}").read_bytes() == b"q" * 100_000
        assert b.proxy.count(predicate=is_file_head) == 0
        assert b.proxy.count(predicate=is_object_get) == n


def test_ls_l_learns_the_next_files_metadata_ahead(s3_bucket: Bucket, mount) -> None:
    """``ls -l`` stats the listed files one at a time: the first stat of one starts fetching
    the metadata of the next ones listed (up to the metadata workers' limit), so they are not
    one round trip each in a row. Seen at the proxy: while the first file's HEAD is held,
    the next files' HEADs arrive. Still one request per file in all."""
    b = s3_bucket
    b.kind = "s3"
    n = 10
    for i in range(n):
        put_with_meta(b, f"d/f{i}", b"w" * 2_000_000, EXEC_META)  # above 1 MiB: HEADs
    m = mount(b, "--stall-timeout", "60")  # the held HEAD must not be retried
    assert b.proxy is not None
    b.proxy.reset()
    b.proxy.slow(lambda method, path: method == "HEAD" and path.endswith("/d/f0"), 3.0)
    try:
        got = ls_l(m.path / "d")
    finally:
        b.proxy.slow(None, 0)
    assert all(shows_exec_meta(st) for st in got.values())
    heads = [r for r in b.proxy.requests() if is_file_head(r)]
    assert sorted(r.path.rsplit("/", 1)[1] for r in heads) == [f"f{i}" for i in range(n)]
    first = next(r for r in heads if r.path.endswith("/d/f0"))
    assert first.finished is not None
    assert all(r.started < first.finished for r in heads)  # all asked while f0's was held


# --- folders (item 4), times (item 5), errnos (item 6) ----------------------------------------


def stored_meta(b: Bucket, key: str) -> dict[str, str]:
    """An object's metadata read with the SDK (for a local source: the lstat's, by name)."""
    if b.kind in ("s3", "seaweed"):
        return b.extra["client"].head_object(Bucket=b.extra["name"], Key=key)["Metadata"]
    if b.kind == "gcs":
        return b.extra["client"].bucket(b.extra["name"]).get_blob(key).metadata or {}
    if b.kind == "azure":
        return b.extra["client"].get_blob_client(key).get_blob_properties().metadata
    st = os.lstat(Path(b.source[len("file://"):]) / key)
    return {"mode": f"0{st.st_mode:o}", "uid": str(st.st_uid), "gid": str(st.st_gid),
            "mtime": str(st.st_mtime)}


def put_marker(b: Bucket, key: str, meta: dict[str, str]) -> None:
    """A folder marker ``key`` (ending in /) with ``meta``, written with the store's SDK."""
    if b.kind in ("s3", "seaweed"):
        b.extra["client"].put_object(Bucket=b.extra["name"], Key=key, Body=b"", Metadata=meta)
    elif b.kind == "gcs":
        blob = b.extra["client"].bucket(b.extra["name"]).blob(key)
        blob.metadata = meta
        blob.upload_from_string(b"")
    else:
        b.extra["client"].upload_blob(key, b"", metadata=meta, overwrite=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_folder_mode_owner_times_kept_in_marker(anystore: Bucket, mount, tmp_path: Path
                                                ) -> None:
    """mkdir -m, chmod (the sticky bit kept), chown and utimensat of a folder are kept in
    its marker ``dir/`` under s3fs's keys (``mode`` with S_IFDIR), and a fresh mount on
    another cache shows them."""
    b = anystore
    m = mount(b)
    os.mkdir(m.path / "d", 0o751)
    st = os.stat(m.path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_nlink == 1
    os.mkdir(m.path / "d" / "sub")
    os.chmod(m.path / "d", 0o1755)
    os.chown(m.path / "d", 1234, 5678)
    os.utime(m.path / "d", (1_500_000_000, 1_600_000_000))
    st = os.stat(m.path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o1755
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime, st.st_mtime) == (1_500_000_000, 1_600_000_000)
    assert st.st_ctime > 1_600_000_000  # ctime: when it changed, not the mtime set
    os.rename(m.path / "d", m.path / "e0")  # a rename keeps the folder's attributes
    os.rename(m.path / "e0", m.path / "d")
    st = os.stat(m.path / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime) == (0o1755, 1234, 1_600_000_000)
    if b.kind == "seaweed":
        # SeaweedFS keeps no metadata on folder markers (they are filer directories): kept
        # in memory by the mount that made them, a fresh mount shows the defaults
        assert stored_meta(b, "d/").get("mode") is None
        m2 = mount(b, cache_dir=tmp_path / "cache2")
        st = os.stat(m2.path / "d")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, os.getuid())
        return
    meta = {k.lower(): v for k, v in stored_meta(b, "d/").items()}
    mode = int(meta["mode"], 8) if meta["mode"].startswith("0") else int(meta["mode"])
    assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o1755  # read as s3fs reads it
    assert (meta["uid"], meta["gid"]) == ("1234", "5678")
    assert float(meta["mtime"]) == 1_600_000_000
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    st = os.stat(m2.path / "d")
    assert stat.S_IMODE(st.st_mode) == 0o1755 and stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, st.st_gid, st.st_mtime) == (1234, 5678, 1_600_000_000)
    assert sorted(os.listdir(m2.path / "d")) == ["sub"]
    # a rename in another mount keeps the folder's attributes (in the store)
    os.rename(m2.path / "d", m2.path / "e")
    st = os.stat(m2.path / "e")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o1755, 1234)
    m3 = mount(b, cache_dir=tmp_path / "cache3")
    st = os.stat(m3.path / "e")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1755, 1234, 5678)


def test_folder_without_marker_shows_defaults_and_gets_one(anystore: Bucket, mount,
                                                           tmp_path: Path) -> None:
    """A folder that is only a prefix shows --dir-mode/--uid/--gid; a chmod makes its marker
    (on a local source every folder is a directory: its own mode)."""
    b = anystore
    if b.kind == "local":
        root = Path(b.source[len("file://"):])
        (root / "implied").mkdir()
        os.chmod(root / "implied", 0o710)
        (root / "implied" / "x").write_bytes(b"x")
    else:
        b.put("implied/x", b"x")
    m = mount(b, "--dir-mode", "0750", "--uid", "2000", "--gid", "3000")
    st = os.stat(m.path / "implied")
    if b.kind == "local":
        assert stat.S_IMODE(st.st_mode) == 0o710
    else:
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 2000, 3000)
    os.chmod(m.path / "implied", 0o700)
    assert stat.S_IMODE(os.stat(m.path / "implied").st_mode) == 0o700
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    kept = 0o755 if b.kind == "seaweed" else 0o700  # SeaweedFS: no marker metadata
    assert stat.S_IMODE(os.stat(m2.path / "implied").st_mode) == kept
    assert (m2.path / "implied" / "x").read_bytes() == b"x"


def test_folder_change_is_conditional_on_the_marker_read(anystore: Bucket, mount) -> None:
    """A marker changed by another writer after the mount read it: the chmod's condition
    fails, the mount reads the marker again and changes only the mode (the other writer's
    owner stays)."""
    b = anystore
    if b.kind == "local":
        pytest.skip("a local directory is changed in place (no version to compare)")
    if b.kind == "seaweed":
        pytest.skip("SeaweedFS keeps no metadata on folder markers")
    put_marker(b, "d/", {"mode": str(stat.S_IFDIR | 0o755)})
    m = mount(b)
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o755  # marker read now
    put_marker(b, "d/", {"mode": str(stat.S_IFDIR | 0o755), "uid": "4242"})
    os.chmod(m.path / "d", 0o700)
    meta = {k.lower(): v for k, v in stored_meta(b, "d/").items()}
    assert meta["uid"] == "4242"
    assert stat.S_IMODE(int(meta["mode"], 8)) == 0o700
    assert os.stat(m.path / "d").st_uid == 4242


def test_folder_times_move_with_entries_and_ctime_apart(anystore: Bucket, mount,
                                                         tmp_path: Path) -> None:
    """A folder's mtime and ctime move when this mount adds, removes or renames entries in
    it; a file's ctime moves on chmod/chown/rename/write/truncate while its mtime does not
    (but for write/truncate); utimensat's atime is kept."""
    b = anystore
    m = mount(b)
    os.mkdir(m.path / "d")
    old = 1_000_000_000
    for op in (lambda: (m.path / "d" / "f").write_bytes(b"x"),
               lambda: os.rename(m.path / "d" / "f", m.path / "d" / "g"),
               lambda: os.mkdir(m.path / "d" / "s"),
               lambda: os.rmdir(m.path / "d" / "s"),
               lambda: os.unlink(m.path / "d" / "g")):
        os.utime(m.path / "d", (old, old))
        assert os.stat(m.path / "d").st_mtime == old
        op()
        st = os.stat(m.path / "d")
        assert st.st_mtime > old and st.st_ctime > old
    f = m.path / "f"
    f.write_bytes(b"data")
    checks = [(lambda: os.chmod(f, 0o600), False),
              (lambda: os.chown(f, os.getuid(), os.getgid()), False),
              (lambda: os.rename(f, m.path / "f2") or os.rename(m.path / "f2", f), False),
              (lambda: f.open("ab").write(b"more"), True),
              (lambda: os.truncate(f, 2), True),
              (lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)), True)]
    for op, moves_mtime in checks:
        os.utime(f, (old, old))
        st = os.stat(f)
        assert (st.st_atime, st.st_mtime) == (old, old)
        op()
        st = os.stat(f)
        assert st.st_ctime > old
        assert (st.st_mtime > old) == moves_mtime
        if moves_mtime:  # the change moved both: the ctime is never before the mtime
            assert st.st_ctime_ns >= st.st_mtime_ns
    os.utime(f, (1_500_000_000, 1_600_000_000))
    st = os.stat(f)
    assert (st.st_atime, st.st_mtime) == (1_500_000_000, 1_600_000_000)
    assert sync(m).returncode == 0
    # ctime and atime are kept in memory only: a fresh mount shows the stored mtime for both
    m2 = mount(b, cache_dir=tmp_path / "cache2")
    st = os.stat(m2.path / "f")
    assert st.st_mtime == 1_600_000_000
    assert st.st_atime == st.st_ctime == 1_600_000_000  # (a local file's own are not shown)


def test_folder_link_count_and_find(anystore: Bucket, mount) -> None:
    """Folders have one link (as on btrfs): find and du walk every level."""
    b = anystore
    m = mount(b)
    (m.path / "a" / "b" / "c").mkdir(parents=True)
    for p in ("a/f", "a/b/f", "a/b/c/f"):
        (m.path / p).write_bytes(b"x" * 1000)
    assert os.stat(m.path / "a").st_nlink == 1
    import subprocess
    found = subprocess.run(["find", str(m.path / "a"), "-type", "f"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert len(found) == 3
    du = subprocess.run(["du", "-a", str(m.path / "a")], capture_output=True, text=True,
                        check=True).stdout.splitlines()
    assert len(du) == 6  # three files, three folders


def test_folder_marker_reads_cost(s3_bucket: Bucket, mount) -> None:
    """On S3 a folder's marker is read with one HEAD when the folder is looked up; a listing
    hands sub-folders out without reading theirs (a plain ls sends no HEAD), a stat of each
    (ls -l) one HEAD each, once."""
    for i in range(3):
        s3_bucket.put(f"top/sub{i}/f", b"x")
    m = mount(s3_bucket)
    s3_bucket.proxy.reset()
    assert sorted(os.listdir(m.path / "top")) == ["sub0", "sub1", "sub2"]
    assert s3_bucket.proxy.count(predicate=is_head) == 1  # "top/" at its lookup
    for i in range(3):
        os.stat(m.path / "top" / f"sub{i}")
        os.stat(m.path / "top" / f"sub{i}")
    assert s3_bucket.proxy.count(predicate=is_head) == 4


def _renameat2(old: Path, new: Path, flags: int) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    r = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new),
                       ctypes.c_uint(flags))
    return 0 if r == 0 else ctypes.get_errno()


def test_errnos_as_ext4(anystore: Bucket, mount) -> None:
    b = anystore
    m = mount(b)
    (m.path / "f").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.truncate(m.path / "f", 999_999_999_999_999)
    assert e.value.errno == errno.EFBIG
    long = "n" * 256
    for op in (lambda: os.mkdir(m.path / long), lambda: (m.path / long).write_bytes(b""),
               lambda: os.rename(m.path / "f", m.path / long), lambda: os.stat(m.path / long)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.ENAMETOOLONG
    (m.path / "g").write_bytes(b"g")
    assert _renameat2(m.path / "f", m.path / "g", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert (m.path / "g").read_bytes() == b"g"
    assert _renameat2(m.path / "f", m.path / "h", 1) == 0
    assert (m.path / "h").read_bytes() == b"x"
    assert _renameat2(m.path / "h", m.path / "g", 2) == errno.EINVAL  # RENAME_EXCHANGE
    # a key over the store's limit (1,024 bytes on S3, GCS, Azure): ENAMETOOLONG
    deep = m.path
    for i in range(5):
        deep = deep / (f"{i}" * 250)
    with pytest.raises(OSError) as e:
        deep.mkdir(parents=True)
    assert e.value.errno == errno.ENAMETOOLONG


def test_local_socket_chmod_chown_and_unlink(local_bucket: Bucket, mount) -> None:
    """A socket in a local source is never opened (ENXIO): chmod, chown and unlink of one
    work (they were EIO, and its delete was retried for ever)."""
    m = mount(local_bucket)
    root = Path(local_bucket.source[len("file://"):])
    os.mknod(m.path / "sock", stat.S_IFSOCK | 0o600)
    assert sync(m).returncode == 0  # a real socket in the source now
    os.chmod(m.path / "sock", 0o640)
    assert sync(m).returncode == 0
    assert stat.S_IMODE(os.lstat(root / "sock").st_mode) == 0o640
    os.chown(m.path / "sock", os.getuid(), os.getgid())
    os.unlink(m.path / "sock")
    assert sync(m).returncode == 0
    assert not os.path.lexists(root / "sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another owner needs root")
def test_local_rename_of_a_fifo_or_link_keeps_its_owner(local_bucket: Bucket, mount) -> None:
    """A local source's link, FIFO or socket renamed (made anew at the new name) keeps its
    owner (it took the daemon's)."""
    m = mount(local_bucket)
    root = Path(local_bucket.source[len("file://"):])
    os.mkfifo(m.path / "p", 0o644)
    os.symlink("p", m.path / "l")
    assert sync(m).returncode == 0
    os.chown(m.path / "p", 65533, 65532)
    os.chown(m.path / "l", 65531, 65530, follow_symlinks=False)
    os.rename(m.path / "p", m.path / "p2")
    os.rename(m.path / "l", m.path / "l2")
    assert sync(m).returncode == 0
    assert (os.lstat(root / "p2").st_uid, os.lstat(root / "p2").st_gid) == (65533, 65532)
    assert (os.lstat(root / "l2").st_uid, os.lstat(root / "l2").st_gid) == (65531, 65530)
    st = os.lstat(m.path / "p2")
    assert (st.st_uid, st.st_gid) == (65533, 65532)


@pytest.mark.skipif(os.geteuid() != 0, reason="copying owners (cp -a, tar --same-owner) needs root")
@pytest.mark.parametrize("tool", ["cp -a", "tar --same-owner", "rsync -a"])
def test_copy_tools_keep_links_owners_modes_and_times(anystore: Bucket, mount, tmp_path: Path,
                                                      tool: str) -> None:
    """``cp -a``, ``tar --same-owner`` and ``rsync -a`` into a mount keep links, owners, modes
    and mtimes of files, as read back on a new mount on an empty cache."""
    import shutil
    import subprocess
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "run.sh").write_bytes(b"#!/bin/sh\n" + b"x" * 5000)
    (src / "data.bin").write_bytes(b"d" * 3000)
    os.symlink("sub/run.sh", src / "link")
    os.chmod(src / "sub" / "run.sh", 0o750)
    os.chown(src / "sub" / "run.sh", 1234, 5678)
    os.chown(src / "data.bin", 4321, 8765)
    for p in (src / "sub" / "run.sh", src / "data.bin"):
        os.utime(p, (1_600_000_000, 1_600_000_000))
    if not shutil.which(tool.split()[0]):
        pytest.skip(f"{tool.split()[0]} is not installed")
    m = mount(anystore, cache_dir=tmp_path / "c1")
    dst = m.path / "t"
    if tool == "cp -a":
        subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)
    elif tool == "rsync -a":
        subprocess.run(["rsync", "-a", f"{src}/", str(dst)], check=True)
    else:
        dst.mkdir()
        subprocess.run(f"tar -C {src} -cf - . | tar --same-owner -C {dst} -xf -", shell=True,
                       check=True)
    assert sync(m).returncode == 0
    m.stop()
    m2 = mount(anystore, cache_dir=tmp_path / "c2")
    got = m2.path / "t"
    assert os.readlink(got / "link") == "sub/run.sh"
    for rel in ("sub/run.sh", "data.bin"):
        a, b = os.lstat(src / rel), os.lstat(got / rel)
        assert (stat.S_IMODE(b.st_mode), b.st_uid, b.st_gid, int(b.st_mtime)) == (
            stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid, int(a.st_mtime)), rel
        assert (got / rel).read_bytes() == (src / rel).read_bytes()
