#!/usr/bin/env python3
"""CPU per small GET and PUT (and per listed object) of each fusefs store, next to its own SDK.

In one process, one thread, no mount: ``store.get_range`` of whole 100 KiB objects through
:class:`~fusefs.backends.s3.S3Store` (rclone serve s3), :class:`~fusefs.backends.gcs.GCSStore`
(fake-gcs-server) and :class:`~fusefs.backends.azure.AzureStore` (Azurite), each against the
plain SDK GET of the same objects (boto3 ``get_object``, google-cloud-storage
``download_as_bytes``, azure-storage-blob ``download_blob().readall()``). The figure is
``time.process_time()`` per call: the client's CPU, which other processes on the machine disturb
far less than wall time (the servers run in other processes and are not counted). PUTs are
``store.put_file`` of a staged 100 KiB file (what an upload of a closed file sends); on S3 also
with the fast path off (boto3's ``put_object``)::

    python scripts/get_cpu.py [--objects 300] [--rounds 3] [--stores s3,gcs,azure]

Each figure is the best of ``--rounds`` passes over the objects (each object read once a pass).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SIZE = 100 * 1024
BUCKET = "cpu"


def per_call_us(fn: Callable[[str], Any], keys: list[str], rounds: int) -> float:
    """Best over ``rounds`` of the CPU microseconds per ``fn(key)``."""
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for k in keys:
            fn(k)
        best = min(best, (time.process_time() - t) / len(keys) * 1e6)
    return best


def list_us(store: Any, prefix: str, rounds: int) -> float:
    """CPU microseconds per listed object of a whole (paged) listing of ``prefix``."""
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        n = sum(len(p.objects) for p in store.list(prefix))
        best = min(best, (time.process_time() - t) / max(n, 1) * 1e6)
    return best


def measure(name: str, store: Any, sdk_get: Callable[[str], Any], keys: list[str],
            rounds: int) -> dict[str, float]:
    versions = {}
    for page in store.list("d/"):
        versions.update({o.key: o.version for o in page.objects})
    for k in keys[:20]:  # warm: connections, credentials, the S3 fast path's base URL
        store.get_range(k, 0, SIZE, versions[k])
        sdk_get(k)
    out = {
        "fusefs_get_us": per_call_us(lambda k: store.get_range(k, 0, SIZE, versions[k]), keys,
                                     rounds),
        "sdk_get_us": per_call_us(sdk_get, keys, rounds),
        "fusefs_list_us_per_object": list_us(store, "d/", rounds),
    }
    out["fusefs_put_us"] = put_us(store, keys, rounds)
    fast = getattr(store, "_fast", None)
    if fast is not None:  # S3: the same PUTs through boto3
        fast.enabled = False
        out["fusefs_put_boto3_us"] = put_us(store, keys, rounds)
    print(f"{name:6} fusefs GET {out['fusefs_get_us']:7.0f} us  SDK GET {out['sdk_get_us']:7.0f} us"
          f"  listing {out['fusefs_list_us_per_object']:5.1f} us/object"
          f"  fusefs PUT {out['fusefs_put_us']:7.0f} us" +
          (f" (through boto3 {out['fusefs_put_boto3_us']:.0f} us)" if fast else ""), flush=True)
    return out


def put_us(store: Any, keys: list[str], rounds: int) -> float:
    """CPU microseconds per ``store.put_file`` of a staged 100 KiB file under ``p/``."""
    from fusefs.backends.base import Upload

    with tempfile.NamedTemporaryFile(prefix="get-cpu-put-") as f:
        f.write(os.urandom(SIZE))
        f.flush()
        upload = Upload(f.name, SIZE)
        return per_call_us(lambda k: store.put_file("p/" + k, upload), keys, rounds)


@contextlib.contextmanager
def s3(root: Path, keys: list[str]) -> Iterator[tuple[Any, Callable[[str], Any]]]:
    from fusefs.backends.s3 import S3Store
    from fusefs.testing import servers

    for k in keys:
        p = root / BUCKET / k
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(SIZE))
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    with servers.rclone_s3(root) as srv:
        store = S3Store(BUCKET, endpoint_url=srv.endpoint_url)
        client = servers.s3_client(srv.endpoint_url)

        def get(k: str) -> int:
            return len(client.get_object(Bucket=BUCKET, Key=k)["Body"].read())

        yield store, get


@contextlib.contextmanager
def gcs(root: Path, keys: list[str]) -> Iterator[tuple[Any, Callable[[str], Any]]]:
    from fusefs.backends.gcs import EMULATOR_ENV, GCSStore
    from fusefs.testing import servers

    with servers.fake_gcs(root) as srv:
        client = servers.gcs_client(srv.url)
        bucket = client.create_bucket(BUCKET)
        for k in keys:
            bucket.blob(k).upload_from_string(os.urandom(SIZE))
        os.environ[EMULATOR_ENV] = srv.url
        store = GCSStore(BUCKET, project="fusefs")

        def get(k: str) -> int:
            return len(bucket.blob(k).download_as_bytes())

        yield store, get


@contextlib.contextmanager
def azure(root: Path, keys: list[str]) -> Iterator[tuple[Any, Callable[[str], Any]]]:
    from fusefs.backends.azure import AzureStore
    from fusefs.testing import servers

    with servers.azurite() as srv:
        client = servers.azure_container_client(srv, BUCKET)
        client.create_container()
        for k in keys:
            client.upload_blob(k, os.urandom(SIZE))
        store = AzureStore(BUCKET, env={"AZURE_STORAGE_CONNECTION_STRING":
                                        srv.connection_string()})

        def get(k: str) -> int:
            return len(client.download_blob(k).readall())

        yield store, get


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stores", default="s3,gcs,azure")
    args = p.parse_args()
    keys = [f"d/f{i:05d}.bin" for i in range(args.objects)]
    makers = {"s3": s3, "gcs": gcs, "azure": azure}
    for name in args.stores.split(","):
        with tempfile.TemporaryDirectory(prefix=f"get-cpu-{name}-") as tmp, \
                makers[name](Path(tmp), keys) as (store, sdk_get):
            measure(name, store, sdk_get, keys, args.rounds)
            store.close() if hasattr(store, "close") else None
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
