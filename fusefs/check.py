"""``fusefs check SOURCE``: what the credentials may do on a store, before anything is mounted.

It lists, reads one object, and (unless read-only) writes, overwrites and deletes a probe object
``.fusefs-check-<random>`` at the root of the source. The probe is removed whatever happens:
a refused step, an error, or Ctrl-C (SIGINT is ignored while it is being removed). One line per
permission, or one JSON document; exit 0 only when what the mode needs is allowed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .backends import ObjectStore, open_store
from .backends.base import ObjectInfo
from .config import human_size, load_settings
from .errors import AccessDenied, FusefsError, NotFound, TransientError, UserError

PERMISSIONS = ("list", "read", "write", "overwrite", "delete")
READ_ONLY_NEEDS = ("list", "read")
PROBE_PREFIX = ".fusefs-check-"
#: A listing walks down at most this many folders looking for an object to read.
_MAX_DESCENT = 4
#: Markers of refused credentials (rather than a refused operation) in the stores' messages.
_BAD_CREDENTIALS = (
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "AuthenticationFailed", "failed to authenticate", "InvalidAuthenticationInfo",
    "credentials", "authentication failed", ": 401 ",
)  # fmt: skip


@dataclass
class Result:
    """One permission: ``allowed``, ``refused`` or ``skipped``, why, and the store's words."""

    permission: str
    status: str
    reason: str | None = None
    message: str | None = None

    def line(self) -> str:
        text = f"{self.permission:<10} {self.status}"
        if self.reason:
            text += f" ({self.reason})"
        if self.message:
            text += f": {self.message}"
        return text


def reason(exc: BaseException, *, bucket_level: bool) -> str:
    """The kind of refusal: access denied, no such bucket, bad credentials, unreachable..."""
    msg = getattr(exc, "message", "") or str(exc)
    if isinstance(exc, NotFound):
        return "no such bucket" if bucket_level else "not found"
    if isinstance(exc, AccessDenied):
        if any(marker in f"{msg} " for marker in _BAD_CREDENTIALS):
            return "bad credentials"
        return "access denied"
    if isinstance(exc, TransientError) and "cannot reach" in msg:
        return "unreachable endpoint"
    if isinstance(exc, UserError):
        return "bad input"
    return "error"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(getattr(exc, "message", "") or exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _find_object(store: ObjectStore) -> ObjectInfo | None:
    """An object to read: the first one of the root listing, else of its first folders."""
    prefix = ""
    for _ in range(_MAX_DESCENT):
        page = next(iter(store.list(prefix, max_keys=100)), None)
        if page is None:
            return None
        name = lambda o: o.key.rsplit("/", 1)[-1]  # noqa: E731
        objects = [o for o in page.objects if not name(o).startswith(PROBE_PREFIX)]
        if objects:
            return max(objects, key=lambda o: o.size > 0)  # prefer one with bytes
        if not page.prefixes:
            return None
        prefix = page.prefixes[0]
    return None


def _read(store: ObjectStore, info: ObjectInfo) -> str:
    data = store.get_range(info.key, 0, max(1, min(info.size, 4096)), info.version)
    return f"{info.key} ({human_size(len(data))} of {human_size(info.size)})"


def run_checks(
    store: ObjectStore, *, read_only: bool, probe_key: str | None = None
) -> list[Result]:
    """Try each permission in order; the probe object never outlives this call."""
    results: dict[str, Result] = {}
    probe = probe_key or PROBE_PREFIX + secrets.token_hex(8)

    def attempt(name: str, fn: Callable[[], str | None], *, bucket_level: bool = True) -> bool:
        try:
            note = fn()
        except FusefsError as exc:
            results[name] = Result(name, "refused", reason(exc, bucket_level=bucket_level),
                                   _one_line(exc))
            return False
        results[name] = Result(name, "allowed", None, note or None)
        return True

    found: list[ObjectInfo | None] = [None]

    def do_list() -> str:
        store.check()  # a missing bucket (or directory) is not an empty one
        found[0] = _find_object(store)
        return "" if found[0] is not None else "the bucket is empty"

    listed = attempt("list", do_list)
    target = found[0]
    if target is not None:
        attempt("read", lambda: _read(store, target), bucket_level=False)
    unreachable = not listed and results["list"].reason == "unreachable endpoint"
    if read_only or unreachable:
        for name in ("write", "overwrite", "delete"):
            why = "--read-only" if read_only else "the endpoint is unreachable"
            results[name] = Result(name, "skipped", None, why)
    else:
        written: list[ObjectInfo] = []
        try:
            if attempt("write", lambda: _put(store, probe, b"fusefs check\n", written)):
                attempt("overwrite", lambda: _put(store, probe, b"fusefs check 2\n", written))
                if "read" not in results:  # an empty bucket: read the probe back
                    attempt("read", lambda: _read(store, written[-1]), bucket_level=False)
                attempt("delete", lambda: _delete(store, probe))
            else:
                for name in ("overwrite", "delete"):
                    results[name] = Result(name, "skipped", None, "needs write")
        finally:
            _remove_probe(store, probe, warn=bool(written))
    if "read" not in results:
        why = "the listing was refused" if not listed else "no object to read"
        results["read"] = Result("read", "skipped", None, why)
    return [results[name] for name in PERMISSIONS]


def _put(store: ObjectStore, key: str, data: bytes, written: list[ObjectInfo]) -> str:
    written.append(store.put(key, data))
    return key


def _delete(store: ObjectStore, key: str) -> str:
    store.delete(key)
    try:
        store.head(key)
    except NotFound:
        return key
    except FusefsError:
        return key  # deleted; the check of it could not be made
    raise FusefsError(f"{key}: still there after delete")


def _remove_probe(store: ObjectStore, key: str, *, warn: bool) -> None:
    """Delete the probe (absent is fine), with Ctrl-C held off until it is done. A failure is
    reported (``warn``) when the probe was written; after a refused write it is expected."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to hold off
        previous = None
    try:
        store.delete(key)
    except FusefsError as exc:
        if warn:
            print(f"fusefs: could not remove the probe object {key}: {_one_line(exc)}",
                  file=sys.stderr)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def needed_ok(results: list[Result], read_only: bool) -> bool:
    """What the mode needs is allowed (a read with nothing to read is not a refusal)."""
    needs = READ_ONLY_NEEDS if read_only else PERMISSIONS
    return all(r.status != "refused" for r in results if r.permission in needs) and all(
        r.status == "allowed" for r in results if r.permission in needs and r.permission != "read"
    )


def add_parser(sub: Any) -> None:
    c = sub.add_parser(
        "check", help="show what the credentials may do on SOURCE (list, read, write, delete)"
    )
    c.add_argument("source", help="s3://BUCKET[/PREFIX], gs://..., az://..., file:///DIR")
    c.add_argument("--endpoint-url", dest="endpoint_url", metavar="URL",
                   help="S3-compatible endpoint, or Azure account URL")
    c.add_argument("--region")
    c.add_argument("--profile")
    c.add_argument("--project", metavar="GCP_PROJECT")
    c.add_argument("--read-only", action="store_true",
                   help="only list and read: write nothing")
    c.add_argument("--json", action="store_true", help="print one JSON document")


def cmd_check(args: argparse.Namespace) -> int:
    cli = {k: getattr(args, k) for k in ("endpoint_url", "region", "profile", "project")}
    settings = load_settings(cli)
    mode = "read-only" if args.read_only else "read-write"
    source_id: str | None = None
    try:
        store = open_store(args.source, settings)
        source_id = store.source_id
    except UserError:
        raise
    except FusefsError as exc:  # no credentials at all, an SDK that cannot start...
        why = reason(exc, bucket_level=True)
        results = [Result(p, "refused", why, _one_line(exc)) for p in PERMISSIONS]
        if args.read_only:
            results[2:] = [Result(p, "skipped", None, "--read-only") for p in PERMISSIONS[2:]]
    else:
        try:
            results = run_checks(store, read_only=args.read_only)
        except KeyboardInterrupt:
            print("fusefs: check interrupted (no probe object left behind)", file=sys.stderr)
            return 130
    ok = needed_ok(results, args.read_only)
    if args.json:
        doc = {
            "source": args.source,
            "store": source_id,
            "mode": mode,
            "ok": ok,
            "permissions": {r.permission: {k: v for k, v in asdict(r).items()
                                           if k != "permission"} for r in results},
        }
        print(json.dumps(doc, indent=2))
    else:
        for r in results:
            print(r.line())
    return 0 if ok else 1
