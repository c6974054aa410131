"""Real programs writing through real mounts: cp, tar, rsync, git, sqlite3, dd, vim, sed, mv,
rm, and an fsx-style random exerciser.

What the store holds is read back through its own SDK (``Bucket.get``, :func:`stored`), never
through the mount that wrote it; a second look goes through a fresh mount with an empty cache.
The cheap programs run on every backend (local, moto, fake-gcs-server, SeaweedFS); the heavy
ones on one or two. Counts of requests and bytes, never timings.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    MountProc,
    blob,
    make_azure_bucket,
    make_gcs_bucket,
    make_local_bucket,
    make_s3_bucket,
)

from fusefs.backends import attrs as meta_attrs
from fusefs.testing.proxy import Request, is_file_head, is_object_get

MiB = 1024 * 1024
GiB = 1024 * MiB
Mount = Callable[..., MountProc]


# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    """A fresh bucket on the backend named by the (indirect) parameter; its proxy's counts
    start at zero."""
    kind = request.param
    if kind == "s3":
        b = make_s3_bucket(request.getfixturevalue("s3_server"))
    elif kind == "seaweed":
        b = make_s3_bucket(request.getfixturevalue("seaweed_server"))
        b.kind = "seaweed"
    elif kind == "gcs":
        b = make_gcs_bucket(request.getfixturevalue("gcs_server"))
    elif kind == "azure":
        b = make_azure_bucket(request.getfixturevalue("azure_server"))
    else:
        b = make_local_bucket(tmp_path / "objects")
    if b.proxy is not None:
        b.proxy.reset()
    return b


def needs(*programs: str) -> pytest.MarkDecorator:
    """Skip where a program is not installed (scripts/setup.sh installs them)."""
    missing = [p for p in programs if shutil.which(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def on(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("store", kinds, indirect=True)


EVERY = ("local", "s3", "gcs", "seaweed", "azure")


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        input: str | None = None, timeout: float = 300) -> str:
    """Run a program; its stdout, or a failure showing what it said."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env,
                       input=input, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def sync(m: MountProc, path: str | None = None) -> None:
    """``fusefs sync MOUNT [PATH]``: every pending upload done."""
    run(sys.executable, "-m", "fusefs", "sync", m.path, *([path] if path else []))


def remount(m: MountProc, mount: Mount, b: Bucket, cache_dir: Path, *args: str) -> MountProc:
    """Stop ``m`` and mount ``b`` again with an empty cache directory."""
    m.stop()
    return mount(b, *args, cache_dir=cache_dir)


def local_root(b: Bucket) -> Path:
    return Path(b.source.removeprefix("file://"))


def stored(b: Bucket, prefix: str = "") -> dict[str, int]:
    """Every key under ``prefix`` and its size, listed through the store's SDK (a local
    bucket's folders count as ``dir/`` markers)."""
    out: dict[str, int] = {}
    if b.kind == "local":
        root = local_root(b)
        for dirpath, _dirs, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            base = "" if rel == "." else rel + "/"
            if base:
                out[base] = 0
            for f in files:
                out[base + f] = os.path.getsize(os.path.join(dirpath, f))
    elif b.kind == "gcs":
        for bl in b.extra["client"].list_blobs(b.extra["name"], prefix=prefix):
            out[bl.name] = bl.size
    elif b.kind == "azure":
        for props in b.extra["client"].list_blobs(name_starts_with=prefix):
            out[props.name] = props.size
    else:
        pages = b.extra["client"].get_paginator("list_objects_v2").paginate(
            Bucket=b.extra["name"], Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
    return {k: v for k, v in out.items() if k.startswith(prefix)}


def stored_attrs(b: Bucket, key: str) -> tuple[float | None, int | None]:
    """(mtime, permission bits) the store keeps for ``key``, read through its SDK."""
    if b.kind == "local":
        st = (local_root(b) / key).stat()
        return st.st_mtime, stat.S_IMODE(st.st_mode)
    if b.kind == "gcs":
        bl = b.extra["client"].bucket(b.extra["name"]).get_blob(key)
        meta = bl.metadata
    elif b.kind == "azure":
        meta = b.extra["client"].get_blob_client(key).get_blob_properties().metadata
    else:
        meta = b.extra["client"].head_object(Bucket=b.extra["name"], Key=key)["Metadata"]
    return meta_attrs.decode(meta)


def requests(b: Bucket) -> list[Request]:
    """Requests the proxy passed for this bucket (empty for the local backend)."""
    if b.proxy is None:
        return []
    name = b.extra["name"]
    return [r for r in b.proxy.requests() if f"/{name}/" in r.path + "/" or
            f"/b/{name}/" in r.path + "/"]


def is_copy(r: Request) -> bool:
    """A server-side copy (S3 CopyObject / UploadPartCopy, GCS rewrite or copyTo, Azure Copy
    Blob or Put Block From URL)."""
    return r.header("x-amz-copy-source") is not None or "/rewriteTo/" in r.path or \
        "/copyTo/" in r.path or r.header("x-ms-copy-source") is not None


def is_upload(r: Request) -> bool:
    """A request carrying object bytes (S3 PUT or part, GCS upload), not a copy."""
    return r.method in ("PUT", "POST") and r.bytes_in > 0 and not is_copy(r)


def make_tree(root: Path, seed: int = 0) -> dict[str, bytes]:
    """A small tree of files (empty to 1 MiB, odd names, an empty folder, fixed mtimes and
    modes); returns relative path -> bytes."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    sizes = [0, 1, 100, 4096, 65_537, 300_000, MiB + 5]
    names = ["a.txt", "b c.bin", "ünï.dat", "d1/x", "d1/y.json", "d1/d2/deep.bin",
             "d1/d2/d3/z", "d4/only"]
    for i, name in enumerate(names):
        files[name] = blob(sizes[i % len(sizes)], seed * 100 + i)
    for i in range(12):
        files[f"many/f{i:02d}"] = blob(rng.randrange(1, 20_000), seed * 100 + 50 + i)
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(rng.choice([0o644, 0o600, 0o755, 0o640]))
        t = 1_600_000_000 + rng.randrange(10**6)
        os.utime(p, (t, t))
    (root / "empty").mkdir()
    return files


def folders(files: dict[str, bytes], prefix: str, extra: tuple[str, ...] = ()) -> set[str]:
    """The ``dir/`` markers a copy of ``files`` under ``prefix`` creates (one per folder)."""
    out = {prefix}
    for name in [*files, *extra]:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add(prefix + "/".join(parts[:i]) + "/")
    return out


# --- cp, tar, rsync ---------------------------------------------------------------------------


@on(*EVERY)
def test_cp_r_in_and_out(store: Bucket, mount: Mount, tmp_path: Path):
    b = store
    files = make_tree(tmp_path / "src")
    total = sum(len(d) for d in files.values())
    m = mount(b)
    run("cp", "-r", tmp_path / "src", m.path / "t")
    run("diff", "-r", tmp_path / "src", m.path / "t")  # from the staged files
    sync(m)
    keys = stored(b, "t/")
    assert {k for k in keys if not k.endswith("/")} == {f"t/{n}" for n in files}
    assert {k for k in keys if k.endswith("/")} == folders(files, "t/", ("empty/x",))
    for name, data in files.items():
        assert b.get(f"t/{name}") == data, name
    s = m.stats()
    assert s["upload_bytes"] == total and s["uploads_failed"] == 0 and s["conflicts"] == 0
    if b.proxy is not None:
        sent = requests(b)
        assert not [r for r in sent if is_copy(r)]
        assert sum(r.bytes_in for r in sent if is_upload(r)) <= total + 64 * 1024 * len(files)
    # `cp -p` keeps mtimes and modes in the same mount
    run("cp", "-rp", tmp_path / "src", m.path / "p")
    for name in files:
        src, dst = (tmp_path / "src" / name).stat(), (m.path / "p" / name).stat()
        assert int(dst.st_mtime) == int(src.st_mtime) and dst.st_mode == src.st_mode, name
    m2 = remount(m, mount, b, tmp_path / "cache2")
    run("cp", "-r", m2.path / "t", tmp_path / "out")
    run("diff", "-r", tmp_path / "src", tmp_path / "out")
    assert m2.stats()["upload_bytes"] == 0


def make_tar(path: Path, files: dict[str, bytes], base_mtime: int) -> dict[str, tuple[int, int]]:
    """A tar of ``files`` (owned by us, as tar then restores owners) with folders; returns
    name -> (mtime, mode) of every member."""
    meta: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "w") as tar:
        dirs = sorted({n.rsplit("/", k)[0] for n in files for k in range(1, n.count("/") + 1)})
        for i, d in enumerate(dirs):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, base_mtime - 1000 - i
            ti.uid, ti.gid = os.getuid(), os.getgid()
            tar.addfile(ti)
            meta[d] = (ti.mtime, ti.mode)
        for i, (name, data) in enumerate(sorted(files.items())):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), base_mtime + 7 * i
            ti.mode = (0o644, 0o600, 0o755, 0o640, 0o400)[i % 5]
            ti.uid, ti.gid = os.getuid(), os.getgid()
            tar.addfile(ti, io.BytesIO(data))
            meta[name] = (ti.mtime, ti.mode)
    return meta


@on(*EVERY)
def test_tar_x_keeps_bytes_mtimes_and_modes(store: Bucket, mount: Mount, tmp_path: Path):
    b = store
    files = {f"src/m{i // 8}/f{i:03d}.py": blob(1 + i * 977, i) for i in range(24)}
    files["README"] = b"read me\n"
    files["big/blob.bin"] = blob(2 * MiB + 3, 99)
    meta = make_tar(tmp_path / "a.tar", files, 1_650_000_000)
    m = mount(b)
    (m.path / "x").mkdir()
    run("tar", "xf", tmp_path / "a.tar", "-C", m.path / "x")
    sync(m)
    for name, data in files.items():
        assert b.get(f"x/{name}") == data, name
        mtime, mode = stored_attrs(b, f"x/{name}")
        assert mtime == meta[name][0] and mode == meta[name][1], name
    assert {k for k in stored(b, "x/") if not k.endswith("/")} == {f"x/{n}" for n in files}
    m2 = remount(m, mount, b, tmp_path / "cache2")
    if b.kind in ("local", "gcs", "azure"):
        # tar itself compares every member's bytes, size, mode and mtime
        run("tar", "--compare", "-f", tmp_path / "a.tar", "-C", m2.path / "x")
    else:  # S3 listings carry no metadata: a fresh cache shows LastModified (see rsync's)
        (tmp_path / "ref").mkdir()
        run("tar", "xf", tmp_path / "a.tar", "-C", tmp_path / "ref")
        run("diff", "-r", tmp_path / "ref", m2.path / "x")


def rsync_stats(out: str) -> int:
    """Regular files transferred, from ``rsync --stats``."""
    for line in out.splitlines():
        if line.startswith("Number of regular files transferred:"):
            return int(line.split(":")[1].replace(",", ""))
    raise AssertionError(out)


@on(*EVERY)
@needs("rsync")
def test_rsync_a_twice_transfers_nothing_the_second_time(store: Bucket, mount: Mount,
                                                        tmp_path: Path):
    b = store
    files = make_tree(tmp_path / "src", seed=3)
    m = mount(b)
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m.path / "r")) == \
        len(files)
    run("diff", "-r", tmp_path / "src", m.path / "r")
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m.path / "r")) == 0
    sync(m)
    for name, data in files.items():
        assert b.get(f"r/{name}") == data, name
    # rsync writes `.NAME.XXXXXX` and renames it: the pending upload is retargeted, no copy
    assert {k for k in stored(b, "r/") if not k.endswith("/")} == {f"r/{n}" for n in files}
    # (the folders' attributes rsync sets are copies of their markers onto themselves)
    assert not [r for r in requests(b) if is_copy(r) and not r.path.endswith("/")]
    assert m.stats()["uploads_done"] == len(files)
    # one changed file: exactly one transferred
    (tmp_path / "src/d1/x").write_bytes(b"changed")
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m.path / "r")) == 1
    sync(m)
    assert b.get("r/d1/x") == b"changed"


@on("local", "gcs", "azure")
@needs("rsync")
def test_rsync_a_after_a_remount_transfers_nothing(store: Bucket, mount: Mount, tmp_path: Path):
    """The mtimes and modes rsync set come back from the store's metadata (listings carry it
    on GCS and Azure; a local bucket keeps them on its files)."""
    b = store
    files = make_tree(tmp_path / "src", seed=4)
    m = mount(b)
    run("rsync", "-a", f"{tmp_path}/src/", m.path / "r")
    sync(m)
    m2 = remount(m, mount, b, tmp_path / "cache2")
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m2.path / "r")) == 0
    assert m2.stats()["uploads_done"] == 0
    assert len(files) > 10


@on("s3", "seaweed")
@needs("rsync")
def test_rsync_a_after_a_remount_on_the_same_cache_on_s3(store: Bucket, mount: Mount,
                                                         tmp_path: Path):
    """S3 listings carry no metadata, but the mount remembers the mtimes and modes it wrote
    (per version, in its cache directory): a remount on the same cache transfers nothing."""
    b = store
    files = make_tree(tmp_path / "src", seed=6)
    m = mount(b, cache_dir=tmp_path / "c")
    run("rsync", "-a", f"{tmp_path}/src/", m.path / "r")
    sync(m)
    m2 = remount(m, mount, b, tmp_path / "c")
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m2.path / "r")) == 0
    assert m2.stats()["uploads_done"] == 0 and len(files) > 10


@on("s3", "seaweed")
@needs("rsync")
def test_rsync_a_after_a_remount_on_a_fresh_cache_on_s3(store: Bucket, mount: Mount,
                                                        tmp_path: Path):
    """S3 listings carry no metadata: the first stat of each file fetches it (one request per
    file, see docs/posix.md), so rsync sees the mtimes and modes it set and sends nothing."""
    b = store
    files = make_tree(tmp_path / "src", seed=5)
    m = mount(b)
    run("rsync", "-a", f"{tmp_path}/src/", m.path / "r")
    sync(m)
    m2 = remount(m, mount, b, tmp_path / "cache2")
    assert b.proxy is not None
    b.proxy.reset()
    assert rsync_stats(run("rsync", "-a", "--stats", f"{tmp_path}/src/", m2.path / "r")) == 0
    assert m2.stats()["uploads_done"] == 0
    # at most one request per file for its metadata (small ones: the link probe's GET)
    assert len([r for r in requests(b) if is_file_head(r) or is_object_get(r)]) <= len(files)


@on("local")
def test_shell_redirection_uploads_the_file_once(store: Bucket, mount: Mount):
    """``exec > FILE`` (like ``cmd > FILE``) opens the file, dup2s it to stdout and closes the
    original: a FLUSH before the first write. That flush must not upload the file while the
    program keeps writing (stalling it, and sending a prefix the store replaces at once)."""
    m = mount(store)
    run("bash", "-c", 'exec > "$1"; printf a; sleep 2.5; printf b', "sh", m.path / "out.txt")
    sync(m)
    assert store.get("out.txt") == b"ab"
    s = m.stats()
    assert s["uploads_done"] == 1 and s["upload_bytes"] == 2


# --- git, sqlite3 -----------------------------------------------------------------------------


def git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


@on(*EVERY)
@needs("git")
def test_git_status_is_clean_after_a_remount_on_a_fresh_cache(store: Bucket, mount: Mount,
                                                              tmp_path: Path):
    """A clone holds executables and links; a second mount on an empty cache shows their
    modes (S3: fetched on the first stat, as listings lack them), so git sees no change."""
    b = store
    env = git_env(tmp_path)
    src = tmp_path / "repo"
    run("git", "init", "-q", "-b", "main", src, env=env)
    (src / "bin").mkdir()
    (src / "bin" / "tool").write_text("#!/bin/sh\n" + "echo hello\n" * 1000)  # > 4 KiB
    (src / "bin" / "tool").chmod(0o755)
    (src / "bin" / "tiny").write_text("#!/bin/sh\ntrue\n")
    (src / "bin" / "tiny").chmod(0o755)
    (src / "big.dat").write_bytes(blob(1_500_000, 7))  # above the 1 MiB GET probe: a HEAD
    (src / "README").write_text("read me\n" * 1000)
    os.symlink("bin/tool", src / "tool-link")
    run("git", "-C", src, "add", "-A", env=env)
    run("git", "-C", src, "commit", "-q", "-m", "one", env=env)
    m = mount(b)
    run("git", "clone", "-q", f"file://{src}", m.path / "clone", env=env)
    assert run("git", "-C", m.path / "clone", "status", "--porcelain", env=env) == ""
    sync(m)
    m2 = remount(m, mount, b, tmp_path / "cache2")
    clone = m2.path / "clone"
    assert run("git", "-C", clone, "status", "--porcelain", env=env) == ""
    assert stat.S_IMODE(os.stat(clone / "bin" / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(clone / "README").st_mode) == 0o644
    assert os.readlink(clone / "tool-link") == "bin/tool"
    run("git", "-C", clone, "fsck", "--full", "--strict", env=env)


@on("local", "s3")
@needs("git")
def test_git_clone_then_fsck_here_and_after_a_remount(store: Bucket, mount: Mount,
                                                      tmp_path: Path):
    b = store
    env = git_env(tmp_path)
    src = tmp_path / "repo"
    run("git", "init", "-q", "-b", "main", src, env=env)
    for i in range(4):
        (src / "pkg").mkdir(exist_ok=True)
        (src / "pkg" / f"mod{i}.py").write_text(f"x = {i}\n" * (i + 1) * 100)
        (src / "data.bin").write_bytes(blob(50_000 + i, i))
        (src / "README").write_text(f"version {i}\n")
        run("git", "-C", src, "add", "-A", env=env)
        run("git", "-C", src, "commit", "-q", "-m", f"commit {i}", env=env)
    m = mount(b)
    run("git", "clone", "-q", f"file://{src}", m.path / "clone", env=env)
    run("git", "-C", m.path / "clone", "fsck", "--full", "--strict", env=env)
    assert run("git", "-C", m.path / "clone", "status", "--porcelain", env=env) == ""
    # a commit made in the mount
    (m.path / "clone/new.txt").write_text("new\n")
    run("git", "-C", m.path / "clone", "add", "new.txt", env=env)
    run("git", "-C", m.path / "clone", "commit", "-q", "-m", "in the mount", env=env)
    sync(m)
    assert b.get("clone/new.txt") == b"new\n"
    assert not [k for k in stored(b, "clone/") if k.endswith(".lock")]
    m2 = remount(m, mount, b, tmp_path / "cache2")
    run("git", "-C", m2.path / "clone", "fsck", "--full", "--strict", env=env)
    assert run("git", "-C", m2.path / "clone", "status", "--porcelain", env=env) == ""
    log = run("git", "-C", m2.path / "clone", "log", "--format=%s", env=env).split("\n")
    assert log[:2] == ["in the mount", "commit 3"] and len([x for x in log if x]) == 5


SQL_SCHEMA = """
pragma page_size = 4096;
pragma cache_size = 20;
create table t(id integer primary key, name text, n integer, payload blob);
create index t_n on t(n);
"""


def sqlite_script(transactions: int, rows: int, seed: int) -> tuple[str, int, int]:
    """SQL of ``transactions`` transactions of ``rows`` inserts (plus some updates and
    deletes); returns the script, the row count and the sum of ``n`` it leaves."""
    rng = random.Random(seed)
    lines, live, next_id = [], {}, 1
    for _ in range(transactions):
        lines.append("begin;")
        for _ in range(rows):
            n = rng.randrange(10**6)
            lines.append(f"insert into t(id, name, n, payload) values ({next_id}, "
                         f"'row {next_id}', {n}, randomblob({rng.randrange(10, 400)}));")
            live[next_id] = n
            next_id += 1
        for victim in rng.sample(sorted(live), 5):
            del live[victim]
            lines.append(f"delete from t where id = {victim};")
        upd = rng.choice(sorted(live))
        live[upd] += 1
        lines.append(f"update t set n = n + 1 where id = {upd};")
        lines.append("commit;")
    return "\n".join(lines) + "\n", len(live), sum(live.values())


@on("local", "s3")
@needs("sqlite3")
def test_sqlite3_thousands_of_inserts_then_integrity_check_after_a_remount(
        store: Bucket, mount: Mount, tmp_path: Path):
    b = store
    script, count, total = sqlite_script(12, 400, 7)
    m = mount(b)
    (m.path / "db").mkdir()
    db = m.path / "db/test.sqlite"
    run("sqlite3", db, input=SQL_SCHEMA + script)
    expected = f"ok\n{count}|{total}\n"
    check = "pragma integrity_check; select count(*), sum(n) from t;"
    assert run("sqlite3", db, check) == expected
    sync(m)
    assert set(stored(b, "db/")) == {"db/", "db/test.sqlite"}  # the journal is gone
    m2 = remount(m, mount, b, tmp_path / "cache2")
    assert run("sqlite3", m2.path / "db/test.sqlite", check) == expected
    data = b.get("db/test.sqlite")
    assert data is not None and data.startswith(b"SQLite format 3\x00")
    assert m2.stats()["upload_bytes"] == 0  # reading wrote nothing
    assert count > 4000


@on("local", "s3")
@needs("sqlite3")
def test_sqlite3_in_wal_mode_through_its_shared_memory_map(store: Bucket, mount: Mount,
                                                            tmp_path: Path):
    """WAL mode maps ``DB-shm`` shared and writable (its pages reach the daemon as writes) and
    keeps ``DB-wal`` beside the database; both go at the last close (checkpointed)."""
    b = store
    script, count, total = sqlite_script(6, 300, 11)
    m = mount(b)
    db = m.path / "wal.sqlite"
    assert run("sqlite3", db, "pragma journal_mode=wal;") == "wal\n"
    run("sqlite3", db, input=SQL_SCHEMA + script)
    expected = f"ok\n{count}|{total}\n"
    check = "pragma integrity_check; select count(*), sum(n) from t;"
    assert run("sqlite3", db, check) == expected
    sync(m)
    assert {k for k in stored(b) if not k.endswith("/")} == {"wal.sqlite"}
    m2 = remount(m, mount, b, tmp_path / "cache2")
    assert run("sqlite3", m2.path / "wal.sqlite", "pragma journal_mode;") == "wal\n"
    assert run("sqlite3", m2.path / "wal.sqlite", check) == expected


# --- dd of 2 GiB --------------------------------------------------------------------------------


def pattern_blocks(n: int) -> Iterator[bytes]:
    """``n`` MiB of reproducible bytes, one MiB at a time (each block distinct)."""
    base = bytearray(blob(MiB, 2024))
    for i in range(n):
        base[:8] = i.to_bytes(8, "little")
        yield bytes(base)


GEN = textwrap.dedent("""
    import random, sys
    base = bytearray(random.Random(2024).randbytes(1 << 20))
    out = sys.stdout.buffer
    for i in range(int(sys.argv[1])):
        base[:8] = i.to_bytes(8, "little")
        out.write(base)
""")


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("store", ["local", pytest.param("seaweed", marks=pytest.mark.skipif(
    not os.environ.get("FUSEFS_TEST_BIG_S3"), reason="75 s: set FUSEFS_TEST_BIG_S3=1"))],
    indirect=True)
def test_dd_2gib_with_flat_daemon_memory(store: Bucket, mount: Mount, tmp_path: Path):
    if os.environ.get("FUSEFS_TEST_SKIP_BIG"):
        pytest.skip("FUSEFS_TEST_SKIP_BIG is set")
    free = shutil.disk_usage(tmp_path).free
    if free < 6 * GiB:
        pytest.skip(f"needs 6 GiB free for staging, cache and bucket copies; {free >> 20} MiB")
    b = store
    n = 2048
    m = mount(b)
    assert m.proc is not None
    gen = subprocess.Popen([sys.executable, "-c", GEN, str(n)], stdout=subprocess.PIPE)
    try:
        subprocess.run(["dd", f"of={m.path / 'big.bin'}", "bs=1M", "iflag=fullblock",
                        "status=none"], stdin=gen.stdout, check=True, timeout=600)
    finally:
        assert gen.stdout is not None
        gen.stdout.close()
        gen.wait()
    sync(m)
    peak = vm_hwm(m.proc.pid)
    print(f"dd 2 GiB: daemon peak RSS {peak / MiB:.0f} MiB")
    expected = hashlib.sha256()
    for block in pattern_blocks(n):
        expected.update(block)
    assert (m.path / "big.bin").stat().st_size == n * MiB
    got = hashlib.sha256()
    if b.kind == "local":
        with open(local_root(b) / "big.bin", "rb") as f:  # what the store holds, streamed
            while chunk := f.read(4 * MiB):
                got.update(chunk)
    else:
        body = b.extra["client"].get_object(Bucket=b.extra["name"], Key="big.bin")["Body"]
        for chunk in body.iter_chunks(4 * MiB):
            got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()
    s = m.stats()
    assert s["upload_bytes"] == n * MiB and s["uploads_failed"] == 0
    assert peak <= 256 * MiB, f"daemon peak RSS {peak >> 20} MiB"


@on("s3")
def test_a_server_slow_to_answer_uploads_is_waited_for(store: Bucket, mount: Mount):
    """Every part of an upload answered only after 3 s, longer than the 2 s
    stall timeout of a GET: a server storing a part takes that long when busy (SeaweedFS did,
    and every part of a 2 GiB file failed all its attempts). One request per part, no retry."""
    b = store
    assert b.proxy is not None
    data = blob(11 * MiB, 12)
    m = mount(b, "--upload-part-size", "5M")
    (m.path / "slow.bin").write_bytes(data)
    b.proxy.slow(lambda method, path: method == "PUT" and "partNumber=" in path, 3.0)
    try:
        sync(m)
    finally:
        b.proxy.slow(None, 0)
    assert b.get("slow.bin") == data
    parts = [r for r in requests(b) if r.method == "PUT" and "partNumber" in r.query]
    assert sorted(r.query["partNumber"] for r in parts) == ["1", "2", "3"]
    assert m.stats()["uploads_failed"] == 0


# --- fsx-style random exerciser ----------------------------------------------------------------


class Fsx:
    """Random writes, truncates and reads of one file, checked against an in-memory model;
    close/reopen (sometimes with ``O_TRUNC`` or ``O_APPEND``) and ``fusefs sync`` between."""

    def __init__(self, m: MountProc, name: str, seed: int, max_size: int) -> None:
        self.m, self.name, self.max = m, name, max_size
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.fd = -1
        self.ops = 0
        self.log: list[str] = []

    @property
    def path(self) -> Path:
        return self.m.path / self.name

    def open(self, flags: int = 0) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        if flags & os.O_TRUNC:
            del self.model[:]

    def close(self) -> None:
        os.close(self.fd)
        self.fd = -1

    def check_all(self) -> None:
        assert self.path.stat().st_size == len(self.model), self.log[-5:]
        with open(self.path, "rb") as f:
            data = f.read()
        assert data == bytes(self.model), (self.log[-5:], first_diff(data, self.model))

    def step(self) -> None:
        rng, size = self.rng, len(self.model)
        op = rng.choices(["write", "read", "truncate", "append", "reopen", "fsync", "sync"],
                         [40, 30, 10, 5, 10, 4, 1])[0]
        self.ops += 1
        if op == "write":
            off = rng.randrange(0, min(self.max, size + 200_000))
            n = min(rng.choice([1, 100, 4096, 70_000, 300_000]), self.max - off)
            data = rng.randbytes(max(n, 1))
            os.pwrite(self.fd, data, off)
            if off > size:
                self.model += bytes(off - size)
            self.model[off:off + len(data)] = data
            self.log.append(f"write {off} {len(data)}")
        elif op == "read":
            off = rng.randrange(0, size + 10) if size else 0
            n = rng.choice([1, 4096, 100_000, 1_000_000])
            got = os.pread(self.fd, n, off)
            assert got == bytes(self.model[off:off + n]), (self.log[-5:], f"read {off} {n}")
        elif op == "truncate":
            new = rng.randrange(0, self.max)
            os.ftruncate(self.fd, new)
            if new < size:
                del self.model[new:]
            else:
                self.model += bytes(new - size)
            self.log.append(f"truncate {new}")
        elif op == "append":
            self.close()
            data = rng.randbytes(rng.randrange(1, 5000))
            with open(self.path, "ab") as f:
                f.write(data)
            self.model += data
            self.open()
            self.log.append(f"append {len(data)}")
        elif op == "reopen":
            self.close()
            self.check_all()
            trunc = rng.random() < 0.1
            self.open(os.O_TRUNC if trunc else 0)
            self.log.append(f"reopen trunc={trunc}")
        elif op == "fsync":  # uploaded now: later changes go on top of the new object
            os.fsync(self.fd)
            self.log.append("fsync")
        else:
            self.close()
            sync(self.m)
            self.open()
            self.log.append("sync")


def first_diff(a: bytes, b: bytes | bytearray) -> tuple[int, int, int]:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i, len(a), len(b)
    return min(len(a), len(b)), len(a), len(b)


@pytest.mark.parametrize(("store", "max_size", "steps", "args"), [
    ("local", 3 * MiB, 250, ()),
    ("s3", 3 * MiB // 2, 150, ()),
    ("seaweed", 12 * MiB, 120, ("--upload-part-size", "5M")),  # multipart uploads
], indirect=["store"])
def test_fsx_random_writes_truncates_and_reads(store: Bucket, mount: Mount, tmp_path: Path,
                                               max_size: int, steps: int,
                                               args: tuple[str, ...]):
    b = store
    common = ("--block-size", "64K", *args)
    m = mount(b, *common)
    fsx = Fsx(m, "fsx.bin", seed=11, max_size=max_size)
    fsx.open()
    for _ in range(steps):
        fsx.step()
    fsx.close()
    fsx.check_all()
    sync(m)
    assert b.get("fsx.bin") == bytes(fsx.model)
    m2 = remount(m, mount, b, tmp_path / "cache2", *common)
    fsx.m = m2
    fsx.check_all()
    fsx.open()
    for _ in range(steps // 2):
        fsx.step()
    fsx.close()
    sync(m2)
    assert b.get("fsx.bin") == bytes(fsx.model)
    fsx.check_all()
    assert m2.stats()["uploads_failed"] == 0


@on("local")
def test_reopen_truncate_and_chmod_while_an_uploaded_file_leaves_staging(store: Bucket,
                                                                         mount: Mount):
    """The last close of an uploaded file retires its staged copy (block cache seeding and
    removal in worker threads): an open(O_TRUNC), truncate or chmod arriving meanwhile must
    work on a live file, never on the closed (or reused) descriptor (was EIO/EBADF about once
    in 200 rounds)."""
    m = mount(store)
    rng = random.Random(5)
    for i in range(200):
        p = m.path / f"r{i % 3}"
        data = rng.randbytes(200_000 + i)
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, data, 0)
        os.fsync(fd)  # uploaded: the close below retires the staged file
        os.close(fd)
        fd = os.open(p, os.O_RDWR | os.O_TRUNC)
        os.pwrite(fd, data[:1000], 0)
        os.close(fd)
        os.truncate(p, 500)
        os.chmod(p, 0o600)
        assert p.read_bytes() == data[:500], i
    sync(m)
    assert "Traceback" not in m.log_text()
    assert [store.get(f"r{i}") is not None for i in range(3)] == [True] * 3


# --- editors, mv, rm -rf ----------------------------------------------------------------------


@on(*EVERY)
@needs("vim")
def test_editor_saves(store: Bucket, mount: Mount):
    """Write a temp file and rename it over the original (atomic save, ``sed -i``), and vim's
    way: rename the original to a backup, write the new file, delete the backup."""
    b = store
    b.put("doc.txt", b"version 1\n")
    b.put("notes/vim.txt", b"old line\nsecond\n")
    b.put("notes/sed.txt", b"alpha beta\n")
    m = mount(b)
    doc = m.path / "doc.txt"
    assert doc.read_bytes() == b"version 1\n"
    tmp = m.path / ".doc.txt.tmp1234"
    with open(tmp, "wb") as f:
        f.write(b"version 2\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, doc)
    assert doc.read_bytes() == b"version 2\n"
    before = len(requests(b))
    # vim renames the file to vim.txt~, writes and fsyncs the new one, fchmods it to the old
    # mode, deletes the backup ('backupskip' would skip the backup under /tmp)
    run("vim", "-u", "NONE", "-i", "NONE", "-N", "-n", "-Es", "-c",
        "set backupcopy=no writebackup nobackup backupskip=", "-c", "%s/old/new/", "-c", "wq",
        m.path / "notes/vim.txt")
    vim_uploads = [r for r in requests(b)[before:] if is_upload(r)]
    assert (m.path / "notes/vim.txt").read_bytes() == b"new line\nsecond\n"
    run("sed", "-i", "s/beta/gamma/", m.path / "notes/sed.txt")
    assert (m.path / "notes/sed.txt").read_bytes() == b"alpha gamma\n"
    sync(m)
    assert b.get("doc.txt") == b"version 2\n"
    assert b.get("notes/vim.txt") == b"new line\nsecond\n"
    assert b.get("notes/sed.txt") == b"alpha gamma\n"
    assert {k for k in stored(b) if not k.endswith("/")} == \
        {"doc.txt", "notes/vim.txt", "notes/sed.txt"}
    assert sorted(os.listdir(m.path / "notes")) == ["sed.txt", "vim.txt"]
    if b.proxy is not None:
        # server-side copies: the fsynced (so uploaded) temp file's rename and vim's backup;
        # sed's temp file, renamed before its upload, is retargeted
        copies = [r.path for r in requests(b) if is_copy(r)]
        assert len(copies) == 2, copies
        assert len(vim_uploads) == 1, [r.path for r in vim_uploads]  # fchmod: same mode


@on(*EVERY)
def test_mv_within_into_and_out_of_the_mount_and_rm_rf(store: Bucket, mount: Mount,
                                                        tmp_path: Path):
    b = store
    for i in range(5):
        b.put(f"tree/sub{i % 2}/f{i}", b"stored %d" % i)
    b.put("one.txt", b"one")
    m = mount(b)
    # within: a stored file, a folder, a just-written file
    run("mv", m.path / "one.txt", m.path / "tree/uno.txt")
    run("mv", m.path / "tree/sub0", m.path / "moved")
    (m.path / "fresh.txt").write_bytes(b"fresh")
    run("mv", m.path / "fresh.txt", m.path / "moved/fresh.txt")
    # in, from another file system: copy + delete
    outside = tmp_path / "outside"
    files = make_tree(outside / "in", seed=8)
    run("mv", outside / "in", m.path / "in")
    assert not (outside / "in").exists()
    (outside / "single").write_bytes(b"single")
    run("mv", outside / "single", m.path / "single")
    # out
    run("mv", m.path / "tree/sub1", outside / "sub1")
    run("mv", m.path / "single", outside / "single")
    assert sorted(os.listdir(outside / "sub1")) == ["f1", "f3"]
    assert (outside / "sub1/f3").read_bytes() == b"stored 3"
    assert (outside / "single").read_bytes() == b"single"
    sync(m)
    for name, data in files.items():
        assert b.get(f"in/{name}") == data
    assert b.get("tree/uno.txt") == b"one" and b.get("one.txt") is None
    assert b.get("moved/f0") == b"stored 0" and b.get("moved/fresh.txt") == b"fresh"
    assert b.get("fresh.txt") is None and b.get("single") is None
    assert not {k for k in stored(b, "tree/")} - {"tree/", "tree/uno.txt"}
    # rm -rf: a tree of stored objects, markers and files still staged
    (m.path / "in/d1/staged.txt").write_bytes(b"not uploaded yet")
    run("rm", "-rf", m.path / "in", m.path / "moved")
    assert stored(b, "in/") == {} and stored(b, "moved/") == {}
    assert not (m.path / "in").exists() and not (m.path / "moved").exists()
    sync(m)
    assert stored(b, "in/") == {} and stored(b, "moved/") == {}
    assert m.stats()["uploads_pending"] == 0 and m.stats()["uploads_failed"] == 0
    m2 = remount(m, mount, b, tmp_path / "cache2")
    assert sorted(os.listdir(m2.path)) == ["tree"]


# --- a server that fails for a while ----------------------------------------------------------


@on("s3", "gcs", "azure")
def test_cp_r_while_the_server_fails_uploads_for_a_while(store: Bucket, mount: Mount,
                                                         tmp_path: Path):
    """Errors, resets and cut-short answers on a share of uploads while `cp -r` runs: retried,
    nothing lost, nothing reported to cp (close is write-back)."""
    b = store
    assert b.proxy is not None
    files = make_tree(tmp_path / "src", seed=9)
    m = mount(b)
    b.proxy.faults(0.3, ["503", "500", "reset"], predicate=lambda r: r.method in ("PUT", "POST"),
                   seed=3)
    try:
        run("cp", "-r", tmp_path / "src", m.path / "t")
    finally:
        faults = sum(b.proxy.fault_counts().values())
        b.proxy.faults(0)
    sync(m)
    assert faults > 0
    for name, data in files.items():
        assert b.get(f"t/{name}") == data, name
    s = m.stats()
    assert s["uploads_failed"] == 0 and s["uploads_pending"] == 0 and s["conflicts"] == 0
    assert not [k for k in stored(b) if ".conflict-" in k]
