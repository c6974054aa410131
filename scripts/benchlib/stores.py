"""The object stores the benchmark can run on, each with its own SDK for the baselines.

``s3``: ``rclone serve s3`` (or moto) and boto3; ``gcs``: fake-gcs-server and
google-cloud-storage; ``azure``: Azurite and azure-storage-blob. Each :class:`Store` starts its
server over the run's data (the buckets are the data directory's sub-folders), builds an SDK
client for a URL (the server's, or a proxy's in front of it) and tells fusefs how to mount a
bucket at a URL. The SDK clients get a connection pool for 16 threads, as boto3 does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .model import READERS, MiB
from .util import run_threads

#: the ranged GETs of the SDK baselines that download the big object
CHUNK = 8 * MiB


class Client:
    """The SDK operations the baselines use, the same for every store."""

    def get(self, bucket: str, key: str, rng: tuple[int, int] | None = None) -> int:
        """GET an object (or ``(start, length)`` of it) and read the body; its length."""
        raise NotImplementedError

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a flat, paged listing)."""
        raise NotImplementedError

    def head(self, bucket: str, key: str) -> None:
        raise NotImplementedError

    def download(self, bucket: str, key: str, size: int, dest: Path) -> None:
        """The whole object into ``dest``: ranged GETs of 8 MiB by 16 threads."""
        with open(dest, "wb") as f:
            f.truncate(size)

            def part(start: int) -> int:
                data = self._range(bucket, key, start, min(CHUNK, size - start))
                os.pwrite(f.fileno(), data, start)
                return len(data)

            run_threads(part, list(range(0, size, CHUNK)), READERS)

    def _range(self, bucket: str, key: str, start: int, length: int) -> bytes:
        raise NotImplementedError

    def upload(self, bucket: str, key: str, path: Path) -> None:
        raise NotImplementedError

    def create_bucket(self, bucket: str) -> None:
        raise NotImplementedError


class Store:
    """One kind of object store: its server, its SDK, and how fusefs mounts it."""

    name = ""
    sdk = ""
    #: how the SDK baseline of the big-object rows downloads it
    download = ""
    #: how the SDK baseline of the listing rows lists the bucket
    listing = ""

    def server(self, b: Any) -> contextlib.AbstractContextManager[str]:
        """Start the server over ``b.data``; set ``b.direct_url``; yield its version."""
        raise NotImplementedError

    def client(self, url: str) -> Client:
        raise NotImplementedError

    def mount_spec(self, bucket: str, url: str) -> tuple[str, list[str], dict[str, str]]:
        """(source, extra ``fusefs mount`` arguments, environment) to mount ``bucket`` at
        ``url``."""
        raise NotImplementedError


def upload_tree(client: Client, root: Path) -> None:
    """For servers that do not serve a directory: create the buckets, PUT every file."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for bucket in sorted({p.relative_to(root).parts[0] for p in files}):
        client.create_bucket(bucket)

    def put(p: Path) -> int:
        bucket, *rest = p.relative_to(root).parts
        client.upload(bucket, "/".join(rest), p)
        return 1

    run_threads(put, sorted(files, key=lambda p: -p.stat().st_size))


# --------------------------------------------------------------------------------- S3


class S3Client(Client):
    def __init__(self, url: str) -> None:
        from fusefs.testing import servers

        self.c = servers.s3_client(url, max_pool_connections=64)

    def get(self, bucket: str, key: str, rng: tuple[int, int] | None = None) -> int:
        kw = {"Range": f"bytes={rng[0]}-{rng[0] + rng[1] - 1}"} if rng else {}
        body = self.c.get_object(Bucket=bucket, Key=key, **kw)["Body"]
        try:
            return len(body.read())
        finally:
            body.close()

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def head(self, bucket: str, key: str) -> None:
        self.c.head_object(Bucket=bucket, Key=key)

    def download(self, bucket: str, key: str, size: int, dest: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=CHUNK, multipart_chunksize=CHUNK,
                             max_concurrency=READERS)  # fmt: skip
        with open(dest, "wb") as f:
            self.c.download_fileobj(bucket, key, f, Config=cfg)

    def upload(self, bucket: str, key: str, path: Path) -> None:
        self.c.upload_file(str(path), bucket, key)

    def create_bucket(self, bucket: str) -> None:
        self.c.create_bucket(Bucket=bucket)


class S3(Store):
    name, sdk = "s3", "boto3"
    download = "boto3 download_fileobj, 16 x 8 MiB ranged GETs"
    listing = "boto3 paginated list_objects_v2"

    def __init__(self, server: str = "rclone") -> None:
        self.server_kind = server

    @contextlib.contextmanager
    def server(self, b: Any) -> Iterator[str]:
        from fusefs.testing import servers

        from .report import version_of

        if self.server_kind == "rclone":
            with servers.rclone_s3(b.data) as srv:
                b.direct_url = srv.endpoint_url
                yield version_of([str(servers.rclone_available()), "version"]) or "rclone"
        else:
            with servers.moto_s3() as srv:
                b.direct_url = srv.endpoint_url
                upload_tree(self.client(srv.endpoint_url), b.data)
                import moto

                yield f"moto {moto.__version__}"

    def client(self, url: str) -> Client:
        return S3Client(url)

    def mount_spec(self, bucket: str, url: str) -> tuple[str, list[str], dict[str, str]]:
        return f"s3://{bucket}", ["--endpoint-url", url], {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


# --------------------------------------------------------------------------------- GCS


class GCSClient(Client):
    def __init__(self, url: str) -> None:
        from fusefs.backends.gcs import _size_pool
        from fusefs.testing import servers

        self.c = servers.gcs_client(url)
        _size_pool(self.c, 64)
        self._buckets: dict[str, Any] = {}

    def _bucket(self, name: str) -> Any:
        b = self._buckets.get(name)
        if b is None:
            b = self._buckets[name] = self.c.bucket(name)
        return b

    def get(self, bucket: str, key: str, rng: tuple[int, int] | None = None) -> int:
        blob = self._bucket(bucket).blob(key)
        if rng:
            return len(blob.download_as_bytes(start=rng[0], end=rng[0] + rng[1] - 1))
        return len(blob.download_as_bytes())

    def _range(self, bucket: str, key: str, start: int, length: int) -> bytes:
        data: bytes = self._bucket(bucket).blob(key).download_as_bytes(
            start=start, end=start + length - 1
        )
        return data

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        # pages of 1,000 as on GCS (fake-gcs-server sends everything in one page otherwise)
        return [b.name for b in self.c.list_blobs(bucket, prefix=prefix or None, page_size=1000)]

    def head(self, bucket: str, key: str) -> None:
        self._bucket(bucket).blob(key).reload()

    def upload(self, bucket: str, key: str, path: Path) -> None:
        self._bucket(bucket).blob(key).upload_from_filename(str(path))

    def create_bucket(self, bucket: str) -> None:
        self.c.create_bucket(bucket)


def go_module_version(binary: Path) -> str:
    """The main module's version recorded in a Go binary's build info (``go version -m``)."""
    import mmap
    import re

    with open(binary, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        found = re.search(rb"\nmod\t[^\t]+\t(v[^\t\n]+)", m)  # type: ignore[call-overload]
        return found.group(1).decode() if found else ""


class GCS(Store):
    name, sdk = "gcs", "google-cloud-storage"
    download = "google-cloud-storage download_as_bytes of 8 MiB ranges, 16 threads"
    listing = "google-cloud-storage list_blobs (pages of 1,000)"

    @contextlib.contextmanager
    def server(self, b: Any) -> Iterator[str]:
        from fusefs.testing import servers


        # in memory: the filesystem backend reads every object's metadata from disk for each
        # listing (~20 ms a delimited listing of 4,000 objects, against 2 ms in memory)
        with servers.fake_gcs(b.work / "fake-gcs", backend="memory", data_dir=b.data) as srv:
            b.direct_url = srv.url
            yield f"fake-gcs-server {go_module_version(servers.fake_gcs_binary())}".strip()

    def client(self, url: str) -> Client:
        return GCSClient(url)

    def mount_spec(self, bucket: str, url: str) -> tuple[str, list[str], dict[str, str]]:
        return f"gs://{bucket}", ["--project", "fusefs"], {"STORAGE_EMULATOR_HOST": url}


# --------------------------------------------------------------------------------- Azure


def _connection_string(url: str) -> str:
    """The Azurite account's connection string for the server (or proxy) at ``url``."""
    from fusefs.testing import servers

    return servers.Azurite(f"{url}/{servers.AZURITE_ACCOUNT}").connection_string()


class AzureClient(Client):
    def __init__(self, url: str) -> None:
        import requests
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient
        from requests.adapters import HTTPAdapter

        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.c = BlobServiceClient.from_connection_string(
            _connection_string(url),
            transport=RequestsTransport(session=session, session_owner=False),
        )
        self._containers: dict[str, Any] = {}

    def _container(self, name: str) -> Any:
        c = self._containers.get(name)
        if c is None:
            c = self._containers[name] = self.c.get_container_client(name)
        return c

    def get(self, bucket: str, key: str, rng: tuple[int, int] | None = None) -> int:
        kw = {"offset": rng[0], "length": rng[1]} if rng else {}
        return len(self._container(bucket).download_blob(key, **kw).readall())

    def _range(self, bucket: str, key: str, start: int, length: int) -> bytes:
        data: bytes = self._container(bucket).download_blob(
            key, offset=start, length=length
        ).readall()
        return data

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        return list(self._container(bucket).list_blob_names(name_starts_with=prefix or None))

    def head(self, bucket: str, key: str) -> None:
        self._container(bucket).get_blob_client(key).get_blob_properties()

    def upload(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as f:
            self._container(bucket).upload_blob(key, f, overwrite=True, max_concurrency=4)

    def create_bucket(self, bucket: str) -> None:
        self._container(bucket).create_container()


class Azure(Store):
    name, sdk = "azure", "azure-storage-blob"
    download = "azure-storage-blob download_blob(offset, length) of 8 MiB ranges, 16 threads"
    listing = "azure-storage-blob list_blob_names (pages of 5,000)"

    @contextlib.contextmanager
    def server(self, b: Any) -> Iterator[str]:
        from fusefs.testing import servers

        from .report import version_of

        binary = servers.azurite_binary()
        with servers.azurite(in_memory=False) as srv:
            b.direct_url = srv.endpoint_url.rsplit("/", 1)[0]  # the account is in the path
            upload_tree(self.client(b.direct_url), b.data)
            yield f"Azurite {version_of([str(binary), '--version']) or ''}".strip()

    def client(self, url: str) -> Client:
        return AzureClient(url)

    def mount_spec(self, bucket: str, url: str) -> tuple[str, list[str], dict[str, str]]:
        return f"az://{bucket}", [], {"AZURE_STORAGE_CONNECTION_STRING": _connection_string(url)}


def make_store(name: str, server: str = "rclone") -> Store:
    return {"s3": lambda: S3(server), "gcs": GCS, "azure": Azure}[name]()


def unavailable(name: str) -> str | None:
    """Why a store's server cannot run here, or None."""
    from fusefs.testing import servers

    if name == "s3":
        return None
    if name == "gcs":
        try:
            servers.fake_gcs_binary()
        except (ImportError, RuntimeError) as exc:
            return f"fake-gcs-server is not installed ({exc})"
        return None
    if servers.azurite_binary() is None:
        return "Azurite is not installed (scripts/setup.sh installs it)"
    return None
