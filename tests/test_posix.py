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

from fusefs.testing.proxy import is_head, is_object_get


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
    assert b.proxy.count(predicate=is_head) == 0
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
    heads, gets = b.proxy.count(predicate=is_head), b.proxy.count(predicate=is_object_get)
    assert (heads, gets) == ((0, n) if size <= 1 << 20 else (n, 0))
    # stat again, and read: only what the read needs that the stat did not fetch
    b.proxy.reset()
    assert all(shows_exec_meta(st) for st in ls_l(m.path / "d").values())
    assert (m.path / "d/f03").read_bytes() == bytes([3]) * size
    assert b.proxy.count(predicate=is_head) == 0
    assert b.proxy.count(predicate=is_object_get) == (0 if size <= 1 << 20 else 1)
    m.stop()
    m2 = mount(b, cache_dir=tmp_path / "c")  # the same cache: remembered (attrs.json)
    b.proxy.reset()
    assert all(shows_exec_meta(st) for st in ls_l(m2.path / "d").values())
    assert b.proxy.count(predicate=is_head) == 0 and b.proxy.count(predicate=is_object_get) == 0


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
    assert (b.proxy.count(predicate=is_head), b.proxy.count(predicate=is_object_get)) == (5, 0)
    m.stop()
    m2 = mount(b, "--metadata-probe", "off", cache_dir=tmp_path / "c2")
    b.proxy.reset()
    got = ls_l(m2.path)
    assert not any(shows_exec_meta(st) for st in got.values())
    assert all(stat.S_IMODE(st.st_mode) == 0o644 for st in got.values())
    assert b.proxy.count(predicate=is_head) == 0 and b.proxy.count(predicate=is_object_get) == 0


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
    assert b.proxy.count(predicate=is_head) == 0
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
        assert b.proxy.count(predicate=is_head) == 0
        assert b.proxy.count(predicate=is_object_get) == 0
        for i in range(n):
            assert (m.path / f"d/f{i}").read_bytes() == b"q" * 100_000
        assert b.proxy.count(predicate=is_head) == 0
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
    heads = [r for r in b.proxy.requests() if is_head(r)]
    assert sorted(r.path.rsplit("/", 1)[1] for r in heads) == [f"f{i}" for i in range(n)]
    first = next(r for r in heads if r.path.endswith("/d/f0"))
    assert first.finished is not None
    assert all(r.started < first.finished for r in heads)  # all asked while f0's was held
