"""Issue 18: no privilege through the mount, no trust in what another user controls, no bucket
key that reaches outside the mount. Real mounts, real servers; another uid where it matters."""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, make_azure_bucket, make_gcs_bucket, make_local_bucket

from fusefs.testing.servers import free_port

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as another uid needs root")


def as_user(uid: int, cwd: Path, *cmd: str, timeout: float = 30
            ) -> subprocess.CompletedProcess[str]:
    """``cmd`` as ``uid`` with ``cwd`` as its working directory (entered as root first: the
    mounts live below pytest's 0700 tmp directory)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ctl(mp: Path, *words: str) -> dict[str, Any]:
    with open(mp / ".fusefs", "r+b", buffering=0) as f:
        f.write((" ".join(words) + "\n").encode())
        return json.loads(os.pread(f.fileno(), 1 << 20, 0))  # type: ignore[no-any-return]


def fusefs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], env=env,
                          capture_output=True, text=True, timeout=60)


# --- 1. setuid/setgid/sticky never stored; 6. metadata modes capped ---------------------------


def test_no_setuid_bits_are_stored_through_the_mount(bucket: Bucket, mount, tmp_path) -> None:
    m = mount(bucket)
    fd = os.open(m.path / "made.sh", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o6755)
    os.write(fd, b"#!/bin/sh\n")
    os.close(fd)
    (m.path / "chmodded.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(m.path / "chmodded.sh", 0o4755)
    for name in ("made.sh", "chmodded.sh"):
        assert os.stat(m.path / name).st_mode & 0o7777 == 0o755
    assert ctl(m.path, "sync")["failed"] == []
    os.chmod(m.path / "made.sh", 0o1755)  # an uploaded file: a metadata update
    assert os.stat(m.path / "made.sh").st_mode & 0o7777 == 0o755
    m.stop()
    for name in ("made.sh", "chmodded.sh"):
        assert _stored_mode(bucket, name) == 0o755, name


def _stored_mode(b: Bucket, key: str) -> int | None:
    """The permission bits the store keeps for ``key`` (metadata, or the local file's)."""
    from fusefs.backends.attrs import MODE

    if b.kind == "local":
        return os.stat(Path(b.source[len("file://"):]) / key).st_mode & 0o7777
    client, name = b.extra["client"], b.extra["name"]
    if b.kind == "s3":
        meta = client.head_object(Bucket=name, Key=key)["Metadata"]
    elif b.kind == "gcs":
        blob = client.bucket(name).get_blob(key)
        meta = blob.metadata or {}
    else:
        meta = client.get_blob_client(key).get_blob_properties().metadata
    return int(meta[MODE], 8) & 0o7777 if MODE in meta else None


@needs_root
def test_another_uid_cannot_plant_a_setuid_root_file(tmp_path: Path, mount) -> None:
    bucket = make_local_bucket(tmp_path / "objects")
    m = mount(bucket, "--allow-other", "--uid", str(NOBODY), "--gid", str(NOBODY))
    r = as_user(NOBODY, m.path, "sh", "-c", "cp /usr/bin/id myid && chmod 4755 myid")
    assert r.returncode == 0, r.stderr
    assert ctl(m.path, "sync")["failed"] == []
    st = os.stat(tmp_path / "objects/myid")
    assert st.st_uid == 0 and st.st_mode & 0o7000 == 0  # root's file, but never setuid


def test_metadata_modes_are_capped_by_the_mount(gcs_server: Any, mount, tmp_path) -> None:
    bucket = make_gcs_bucket(gcs_server)  # GCS listings carry metadata
    gcs = bucket.extra["client"].bucket(bucket.extra["name"])
    for key, mode in (("rw", "0100666"), ("suid", "0104755"), ("x", "0100750")):
        blob = gcs.blob(key)
        blob.metadata = {"mode": mode}
        blob.upload_from_string(b"x")
    m = mount(bucket)
    shown = {k: os.stat(m.path / k).st_mode & 0o7777 for k in ("rw", "suid", "x")}
    assert shown == {"rw": 0o644, "suid": 0o755, "x": 0o750}
    m2 = mount(bucket, "--file-mode", "0664", "--dir-mode", "0775",
               cache_dir=tmp_path / "c2")
    # an explicit --file-mode is what files show (metadata is not used)
    assert os.stat(m2.path / "rw").st_mode & 0o7777 == 0o664


def test_local_source_modes_are_capped(tmp_path: Path, mount) -> None:
    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("open.txt", b"x")
    bucket.put("suid", b"x")
    os.chmod(tmp_path / "objects/open.txt", 0o666)
    os.chmod(tmp_path / "objects/suid", 0o4755)
    m = mount(bucket)
    assert os.stat(m.path / "open.txt").st_mode & 0o7777 == 0o644
    assert os.stat(m.path / "suid").st_mode & 0o7777 == 0o755


# --- 2. the cache directory and the journal are not trusted blindly ---------------------------


@needs_root
@pytest.mark.parametrize("how", ["other-owner", "group-writable", "staging-other-owner"])
def test_a_cache_directory_others_control_is_refused(tmp_path: Path, how: str) -> None:
    bucket = make_local_bucket(tmp_path / "objects")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if how == "other-owner":
        os.chown(cache, NOBODY, NOBODY)
    elif how == "group-writable":
        os.chmod(cache, 0o770)
    else:
        (cache / ".staging").mkdir(mode=0o700)
        os.chown(cache / ".staging", NOBODY, NOBODY)
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = fusefs("mount", bucket.source, str(mp), "--cache-dir", str(cache), env=bucket.env)
    if r.returncode == 0:  # mounted (the defect): never leave it behind
        subprocess.run(["fusermount3", "-u", str(mp)], timeout=30)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to trust it" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    with open("/proc/mounts") as f:
        assert str(mp) not in f.read()


def _staging_dir(cache: Path) -> Path:
    dirs = [d for d in (cache / ".staging").iterdir() if d.is_dir()]
    assert len(dirs) == 1
    return dirs[0]


def _plant(journal: Path, **rec: Any) -> None:
    row = {"id": uuid.uuid4().hex, "size": 0, "mtime": time.time(), "mode": None,
           "base_key": "", "base_version": "", "base_size": 0, "base_mtime": 0.0,
           "base_limit": 0, "dirty": [], "expect": None,
           "state": "pending", "error": "", "created": time.time(), **rec}
    db = sqlite3.connect(journal)
    db.execute("INSERT INTO staged (id, record) VALUES (?, ?)", (row["id"], json.dumps(row)))
    db.commit()
    db.close()


def test_journal_rows_are_checked_before_use(tmp_path: Path, mount) -> None:
    bucket = make_local_bucket(tmp_path / "objects")
    bucket.put("victim.txt", b"keep me")
    cache = tmp_path / "cache"
    m = mount(bucket, cache_dir=cache)
    (m.path / "first.txt").write_bytes(b"one")
    assert ctl(m.path, "sync")["failed"] == []
    m.stop()
    staging = _staging_dir(cache)
    secret = tmp_path / "rootonly/secret.data"
    secret.parent.mkdir(mode=0o700)
    secret.write_bytes(b"root's secret")
    rel = os.path.relpath(secret, staging)[: -len(".data")]
    assert rel.startswith("../")
    journal = staging / "journal.db"
    _plant(journal, id=rel, key="stolen.txt", size=len(b"root's secret"))
    ok_id = uuid.uuid4().hex
    (staging / f"{ok_id}.data").write_bytes(b"overwritten")
    _plant(journal, id=ok_id, key="pub/../victim.txt", size=len(b"overwritten"))
    m2 = mount(bucket, cache_dir=cache)
    failed = ctl(m2.path, "sync")["failed"]
    assert not (tmp_path / "objects/stolen.txt").exists()
    assert secret.read_bytes() == b"root's secret"
    assert (tmp_path / "objects/victim.txt").read_bytes() == b"keep me"
    assert failed == []  # the rows were dropped, not tried
    assert "a row is ignored and dropped" in m2.log_text()


# --- 3. keys with dot segments; 11. trailing-slash objects with content ----------------------


def _sas_env(b: Bucket) -> dict[str, str]:
    """The mount's environment with a container SAS token instead of the account key."""
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    az = b.extra["server"].server
    sas = generate_container_sas(
        az.account, b.extra["name"], account_key=az.key,
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True,
                                           add=True, create=True),
        expiry=datetime.now(UTC) + timedelta(hours=1))
    url = f"{b.proxy.url}/{az.account}" if b.proxy else az.endpoint_url
    return {**b.env, "AZURE_STORAGE_CONNECTION_STRING":
            f"BlobEndpoint={url};SharedAccessSignature={sas}"}


def test_folder_rename_never_reaches_outside_the_prefix(azure_server: Any, mount) -> None:
    b = make_azure_bucket(azure_server)
    b.env = _sas_env(b)
    b.put("trail/", b"precious")
    b.put("pfx/a/keep.txt", b"keep")
    # the SDK itself would send that key's URL without its dot segments: put it raw
    import requests

    az = b.extra["server"].server
    sas = b.env["AZURE_STORAGE_CONNECTION_STRING"].rpartition("SharedAccessSignature=")[2]
    r = requests.put(f"{az.endpoint_url}/{b.extra['name']}/pfx/a/%2E%2E/%2E%2E/trail/?{sas}",
                     headers={"x-ms-blob-type": "BlockBlob", "x-ms-version": "2021-08-06"},
                     data=b"", timeout=30)
    assert r.status_code == 201, r.text
    assert "pfx/a/../../trail/" in [x.name for x in b.extra["client"].list_blobs()]
    m = mount(b, source=f"{b.source}/pfx")
    os.rename(m.path / "a", m.path / "z")
    assert (m.path / "z/keep.txt").read_bytes() == b"keep"
    assert b.get("trail/") == b"precious"
    assert b.get("pfx/z/keep.txt") == b"keep"


def test_folder_rename_keeps_trailing_slash_objects_with_content(s3_bucket: Bucket,
                                                                  mount) -> None:
    s3_bucket.put("d/", b"")
    s3_bucket.put("d/sub/", b"content some tools keep here")
    s3_bucket.put("d/f.txt", b"f")
    m = mount(s3_bucket)
    os.rename(m.path / "d", m.path / "e")
    assert s3_bucket.get("e/sub/") == b"content some tools keep here"
    assert s3_bucket.get("e/f.txt") == b"f"
    assert s3_bucket.get("d/sub/") is None


# --- 4. the control name ------------------------------------------------------------------------


@pytest.mark.parametrize("sub", [False, True])
def test_an_object_named_like_the_control_file_is_never_shown(s3_bucket: Bucket, mount,
                                                             sub: bool) -> None:
    pre = "sub/" if sub else ""
    s3_bucket.put(pre + ".fusefs", b'{"forged": true}')
    s3_bucket.put(pre + "f.txt", b"f")
    m = mount(s3_bucket, source=s3_bucket.source + ("/sub" if sub else ""))
    r = subprocess.run(["ls", "-la", str(m.path)], capture_output=True, text=True)
    assert r.returncode == 0 and ".fusefs" not in r.stdout
    assert ".fusefs" not in os.listdir(m.path)
    for _ in range(2):
        data = json.loads((m.path / ".fusefs").read_bytes())
        assert "forged" not in data and "hits" in data
    assert ctl(m.path, "clear")["cleared"] == "cache"
    assert s3_bucket.get(pre + ".fusefs") == b'{"forged": true}'
    r = subprocess.run([sys.executable, "-m", "fusefs", "stats", str(m.path)],
                       capture_output=True, text=True, env=s3_bucket.env)
    assert r.returncode == 0 and "Traceback" not in r.stderr


# --- 5. credentials in --endpoint-url ------------------------------------------------------------


def test_endpoint_credentials_are_never_shown_or_stored(s3_bucket: Bucket, mount,
                                                        tmp_path: Path) -> None:
    assert s3_bucket.proxy is not None
    secret = "s3cr3tPassw0rd"
    url = s3_bucket.proxy.url.replace("http://", f"http://user:{secret}@")
    s3_bucket.args = ["--endpoint-url", url]
    s3_bucket.put("f.txt", b"data")
    cache = tmp_path / "cache"
    m = mount(s3_bucket, cache_dir=cache)
    assert (m.path / "f.txt").read_bytes() == b"data"
    stats = (m.path / ".fusefs").read_text()
    r = fusefs("check", s3_bucket.source, "--endpoint-url", url, "--json", env=s3_bucket.env)
    assert r.returncode == 0, r.stderr
    store = json.loads(r.stdout)["store"]
    m.stop()
    assert secret not in m.log_text() and "user:" not in m.log_text()
    assert secret not in stats
    assert secret not in store and "127.0.0.1" in store
    for f in cache.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


# --- 7. folder modes ------------------------------------------------------------------------------


def test_folder_modes_are_never_a_silent_success(local_bucket: Bucket, mount) -> None:
    """A folder's mode is kept (issue 20: it read back as --dir-mode before) and reads back as
    set, within the cap: group/other bits that --dir-mode does not grant and setuid/setgid are
    never shown, whoever set them (a bucket cannot widen what the mount grants)."""
    m = mount(local_bucket)
    d = m.path / "d"
    os.mkdir(d, 0o700)
    assert os.stat(d).st_mode & 0o7777 == 0o700
    os.chmod(d, 0o750)
    assert os.stat(d).st_mode & 0o7777 == 0o750
    os.chmod(d, 0o6777)
    assert os.stat(d).st_mode & 0o7777 == 0o755


# --- 8. statistics for other users ------------------------------------------------------------


@needs_root
def test_other_users_see_counters_only(s3_bucket: Bucket, mount) -> None:
    s3_bucket.put("hidden-dir/secret-name.bin", b"x" * 1000)
    m = mount(s3_bucket, "--allow-other", "--dir-mode", "0711", "--file-mode", "0600")
    ctl(m.path, "prefetch", "hidden-dir")
    ctl(m.path, "hint-open", "stream-id-42")
    ctl(m.path, "hint", "stream-id-42", "hidden-dir/secret-name.bin")
    own = json.dumps(json.loads((m.path / ".fusefs").read_bytes()))
    assert "hidden-dir" in own and "stream-id-42" in own
    assert as_user(NOBODY, m.path, "ls", "hidden-dir").returncode != 0
    r = as_user(NOBODY, m.path, "cat", ".fusefs")
    assert r.returncode == 0, r.stderr
    theirs = json.loads(r.stdout)
    assert "hidden-dir" not in r.stdout and "stream-id-42" not in r.stdout
    assert isinstance(theirs["fetches"], int) and isinstance(theirs["hits"], int)
    assert "prefetch_requests" not in theirs
    r = as_user(NOBODY, m.path, sys.executable, "-m", "fusefs", "stats", "/proc/self/cwd")
    assert r.returncode == 0 and "hits / misses" in r.stdout, r.stderr


# --- 9. keys in log lines ---------------------------------------------------------------------


def test_object_keys_cannot_forge_log_lines(local_bucket: Bucket, mount) -> None:
    forged = "2099-01-01 00:00:00,000 CRITICAL fusefs.mount: FORGED"
    m = mount(local_bucket)
    (m.path / f"x\n{forged}").write_bytes(b"x")
    assert ctl(m.path, "sync")["failed"] == []
    m.stop()
    text = m.log_text()
    assert "FORGED" in text  # logged, escaped
    assert not any(line.startswith("2099") for line in text.splitlines())


# --- 10. the metrics endpoint --------------------------------------------------------------------


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_metrics_endpoint_is_bounded(local_bucket: Bucket, mount) -> None:
    port = free_port()
    m = mount(local_bucket, "--metrics", f"127.0.0.1:{port}")
    assert m.proc is not None
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert ei.value.code == 404
    base = _threads(m.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    try:
        time.sleep(1)
        assert _threads(m.proc.pid) <= base + 10
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 15
    while True:  # served again once the idle connections are gone
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                assert r.status == 200
                break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and time.monotonic() < deadline
            time.sleep(0.2)
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:  # an idle connection is closed by the server after its timeout
        assert s.recv(1) == b""
    finally:
        s.close()


# --- also: xattrs, autofs ------------------------------------------------------------------------


def test_extended_attributes_answer_as_a_filesystem_without_them(local_bucket: Bucket,
                                                                  mount) -> None:
    local_bucket.put("f.txt", b"f")
    m = mount(local_bucket)
    f = m.path / "f.txt"
    assert os.listxattr(f) == []
    with pytest.raises(OSError) as ei:
        os.getxattr(f, "user.x")
    assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.x", b"1")
    assert ei.value.errno == errno.ENOTSUP
    r = subprocess.run(["getfattr", "-d", str(f)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
