"""Object-store backends and the one function that builds a store from a source URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..config import Settings
from ..errors import UserError
from .base import ListPage, ObjectInfo, ObjectStore, PrefixedStore

__all__ = ["ListPage", "ObjectInfo", "ObjectStore", "PrefixedStore", "open_store", "parse_source"]


def parse_source(source: str) -> tuple[str, str, str]:
    """``s3://bucket/prefix`` -> (scheme, bucket-or-path, prefix). Raises UserError.

    Schemes: ``s3``, ``gs`` (or ``gcs``), ``az`` (or ``azure``), ``file``.
    """
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"{source}: use file:///absolute/path")
        if not parts.path.startswith("/"):
            raise UserError(f"{source}: use file:///absolute/path")
        return "file", parts.path, ""
    if scheme in ("s3", "gs", "gcs", "az", "azure"):
        if not parts.netloc:
            what = "CONTAINER" if scheme in ("az", "azure") else "BUCKET"
            raise UserError(f"{source}: missing {what.lower()} name ({scheme}://{what}[/PREFIX])")
        canonical = {"gcs": "gs", "azure": "az"}.get(scheme, scheme)
        return canonical, parts.netloc, parts.path.strip("/")
    raise UserError(
        f"{source}: unsupported source "
        "(use s3://BUCKET, gs://BUCKET, az://CONTAINER or file:///DIR)"
    )


def open_store(source: str, settings: Settings) -> ObjectStore:
    """Build the store for ``source`` with the settings' endpoint, region and credentials."""
    scheme, where, prefix = parse_source(source)
    store: ObjectStore
    if scheme == "file":
        from .local import LocalStore

        store = LocalStore(where)
    elif scheme == "s3":
        from .s3 import S3Store

        store = S3Store(
            where,
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            profile=settings.profile,
            max_connections=settings.store_connections,
            stall_timeout=settings.stall_timeout,
            part_size=settings.upload_part_size,
            parts=settings.upload_parts,
        )
    elif scheme == "az":
        from .azure import AzureStore

        store = AzureStore(
            where, endpoint_url=settings.endpoint_url, max_connections=settings.store_connections,
            part_size=settings.upload_part_size, parts=settings.upload_parts,
        )
    else:
        from .gcs import GCSStore

        store = GCSStore(
            where,
            project=settings.project,
            max_connections=settings.store_connections,
            stall_timeout=settings.stall_timeout,
            part_size=settings.upload_part_size,
            parts=settings.upload_parts,
        )
    return PrefixedStore(store, prefix)  # also for no prefix: it refuses unclean keys
