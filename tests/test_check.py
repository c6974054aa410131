"""``fusefs check``: one line per permission, refusals with the store's reason, the probe object
always removed (also on Ctrl-C), ``--json`` and exit codes. Real servers, no mocks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Bucket, _base_env, make_local_bucket

from fusefs.testing.servers import AZURITE_KEY, free_port

PERMISSIONS = ["list", "read", "write", "overwrite", "delete"]

pytestmark = pytest.mark.timeout(180)


def check(b: Bucket, *args: str, source: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusefs", "check", source or b.source, *b.args, *args],
        capture_output=True, text=True, env=env or b.env, timeout=120,
    )


def keys(b: Bucket, root: Path | None = None) -> list[str]:
    """Every key in the bucket, through its own SDK (or the directory)."""
    if b.kind == "s3":
        r = b.extra["client"].list_objects_v2(Bucket=b.extra["name"])
        return [o["Key"] for o in r.get("Contents", [])]
    if b.kind == "gcs":
        return [x.name for x in b.extra["client"].list_blobs(b.extra["name"])]
    if b.kind == "azure":
        return list(b.extra["client"].list_blob_names())
    assert root is not None
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def lines(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``permission -> rest of its line``; exactly one line per permission, no traceback."""
    out = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in out] == PERMISSIONS, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return {line.split()[0]: line.split(None, 1)[1] for line in out}


def local_root(b: Bucket) -> Path:
    return Path(b.source.removeprefix("file://"))


def test_everything_allowed_and_probe_removed(bucket: Bucket) -> None:
    bucket.put("data/one.txt", b"hello")
    r = check(bucket)
    assert r.returncode == 0, r.stdout + r.stderr
    got = lines(r)
    assert all(v.startswith("allowed") for v in got.values()), got
    assert "data/one.txt" in got["read"]
    assert ".fusefs-check-" in got["write"]
    root = local_root(bucket) if bucket.kind == "local" else None
    assert keys(bucket, root) == ["data/one.txt"]  # the probe is gone


def test_empty_bucket_reads_the_probe_back(bucket: Bucket) -> None:
    if bucket.kind == "local":
        local_root(bucket).mkdir(parents=True, exist_ok=True)
    r = check(bucket, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["mode"] == "read-write"
    assert list(doc["permissions"]) == PERMISSIONS
    assert {p["status"] for p in doc["permissions"].values()} == {"allowed"}
    assert ".fusefs-check-" in doc["permissions"]["read"]["message"]
    root = local_root(bucket) if bucket.kind == "local" else None
    assert keys(bucket, root) == []


def test_read_only_writes_nothing(s3_bucket: Bucket) -> None:
    s3_bucket.put("k.bin", b"12345")
    assert s3_bucket.proxy is not None
    s3_bucket.proxy.reset()
    r = check(s3_bucket, "--read-only", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    perms = doc["permissions"]
    assert perms["list"] == {"status": "allowed", "reason": None, "message": None}
    assert perms["read"]["status"] == "allowed" and "k.bin" in perms["read"]["message"]
    for name in ("write", "overwrite", "delete"):
        assert perms[name] == {"status": "skipped", "reason": None, "message": "--read-only"}
    assert doc["source"] == s3_bucket.source and "testing" not in r.stdout
    methods = {req.method for req in s3_bucket.proxy.requests()}
    assert methods <= {"GET", "HEAD"}, methods


def test_missing_buckets_are_refused(s3_bucket: Bucket, gcs_server: Any,
                                     azure_server: Any) -> None:
    from conftest import make_azure_bucket, make_gcs_bucket

    for b in (s3_bucket, make_gcs_bucket(gcs_server), make_azure_bucket(azure_server)):
        scheme = b.source.split("://")[0]
        r = check(b, source=f"{scheme}://no-such-bucket-xyz")
        assert r.returncode == 1, r.stdout
        got = lines(r)
        assert got["list"].startswith("refused (no such bucket)"), got
        assert "no-such-bucket-xyz" in got["list"]
        assert got["write"].startswith("refused (no such bucket)"), got
        assert got["delete"] == "skipped: needs write"
        r = check(b, "--read-only", source=f"{scheme}://no-such-bucket-xyz")
        assert r.returncode == 1 and lines(r)["list"].startswith("refused (no such bucket)")


def test_wrong_azure_key_is_bad_credentials(azure_server: Any) -> None:
    from conftest import make_azure_bucket

    b = make_azure_bucket(azure_server)
    b.put("x.txt", b"x")
    env = {**b.env}
    env["AZURE_STORAGE_CONNECTION_STRING"] = env["AZURE_STORAGE_CONNECTION_STRING"].replace(
        AZURITE_KEY, "d3Jvbmcta2V5")
    r = check(b, "--json", env=env)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert doc["permissions"]["list"]["status"] == "refused"
    assert doc["permissions"]["list"]["reason"] == "bad credentials"
    assert doc["permissions"]["write"]["reason"] == "bad credentials"
    assert "d3Jvbmcta2V5" not in r.stdout + r.stderr
    assert keys(b) == ["x.txt"]


def test_unreachable_endpoint(s3_bucket: Bucket) -> None:
    port = free_port()  # nothing listens there
    env = {**s3_bucket.env}
    r = subprocess.run(
        [sys.executable, "-m", "fusefs", "check", "s3://bkt", "--endpoint-url",
         f"http://127.0.0.1:{port}"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    got = lines(r)
    assert got["list"].startswith("refused (unreachable endpoint)"), got
    assert got["write"] == "skipped: the endpoint is unreachable"
    assert r.stderr == ""


def test_read_only_directory_refuses_writes(tmp_path: Path) -> None:
    """An immutable directory (chattr +i: even root may not write there) may be read only."""
    b = make_local_bucket(tmp_path / "objects")
    b.put("f.txt", b"data")
    root = local_root(b)
    if subprocess.run(["chattr", "+i", str(root)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        r = check(b)
        assert r.returncode == 1, r.stdout + r.stderr
        got = lines(r)
        assert got["list"] == "allowed" and got["read"].startswith("allowed: f.txt")
        assert got["write"].startswith("refused (access denied)"), got
        assert r.stderr == ""  # the probe was never written: nothing to warn about
        r = check(b, "--read-only")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        subprocess.run(["chattr", "-i", str(root)], check=True)
    assert sorted(p.name for p in root.iterdir()) == ["f.txt"]


def test_ctrl_c_removes_the_probe(s3_bucket: Bucket) -> None:
    """Interrupted while reading the probe back (an empty bucket): the probe is deleted."""
    proxy = s3_bucket.proxy
    assert proxy is not None
    proxy.slow(lambda method, path: method == "GET" and ".fusefs-check-" in path, 8.0)
    # the held GET outlasts the signal: with the default stall timeout (2 s) a loaded machine
    # could see the read time out and the check end on its own before the signal arrived
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusefs", "check", s3_bucket.source, *s3_bucket.args],
        env={**s3_bucket.env, "FUSEFS_STALL_TIMEOUT": "60"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # a test run started in the background (`scripts/test.sh &`) inherits SIGINT ignored,
        # and so would the check: Ctrl-C as a terminal sends it must reach the check
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not any(r.method == "GET" and ".fusefs-check-" in r.path
                      for r in proxy.requests()):
            assert time.monotonic() < deadline and proc.poll() is None, "no GET of the probe"
            time.sleep(0.05)
        assert keys(s3_bucket) and keys(s3_bucket)[0].startswith(".fusefs-check-")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.slow(None, 0.0)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "fusefs: check interrupted (no probe object left behind)"
    assert keys(s3_bucket) == []


def test_bad_source_is_one_line(tmp_path: Path) -> None:
    b = make_local_bucket(tmp_path / "objects")
    r = check(b, source="ftp://x/y", env=_base_env())
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip()] and r.stderr.startswith("fusefs: ftp://x/y")
