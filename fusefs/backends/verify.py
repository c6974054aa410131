"""Checks on a GET's answer before its bytes are used: the right range, whole, and intact.

A server (or a middlebox) may answer a ranged GET with the whole object (200), with a body of
the wrong length, or with bytes that differ from the stored object. Each is caught here and
raised as :class:`~fusefs.errors.TransientError`, so the retry loop asks again; bytes are never
served short or shifted. Where the whole object is in hand and the store gave a checksum for it
(an MD5 ETag on S3, ``x-goog-hash`` on GCS), the bytes are checked against it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
from collections.abc import Mapping

import google_crc32c

from ..errors import TransientError

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_SSE_C = "x-amz-server-side-encryption-customer-algorithm"


def take_range(
    what: str, status: int, content_range: str | None, body: bytes, start: int, length: int
) -> tuple[bytes, bytes | None]:
    """Bytes ``[start, start+length)`` from a 200/206 answer, and the whole object's bytes when
    the answer carried all of them (for a checksum), else None.

    A 206 must start at ``start`` and hold ``min(length, total - start)`` bytes; so must a 200
    with a ``Content-Range`` (rclone answers ranges so); a 200 without one is the whole object,
    sliced here. Anything else raises TransientError.
    """
    if status == 200 and not content_range:
        return body[start : start + length], body
    m = _CONTENT_RANGE.match(content_range or "")
    if status not in (200, 206) or m is None:
        raise TransientError(f"{what}: unexpected answer {status} ({content_range!r})")
    first, last = int(m.group(1)), int(m.group(2))
    total = int(m.group(3)) if m.group(3) != "*" else None
    expected = min(length, total - start) if total is not None else last - first + 1
    if first != start or last - first + 1 != expected or expected > length:
        raise TransientError(
            f"{what}: asked for {length} bytes at {start}, the server sent {content_range}"
        )
    if len(body) != expected:
        raise TransientError(f"{what}: body of {len(body)} bytes, {expected} expected")
    whole = body if first == 0 and total is not None and last + 1 == total else None
    return body, whole


def object_total(status: int, content_range: str | None, body: bytes) -> int | None:
    """The object's size according to an accepted answer."""
    if status == 200 and not content_range:
        return len(body)
    m = _CONTENT_RANGE.match(content_range or "")
    return int(m.group(3)) if m is not None and m.group(3) != "*" else None


class Md5Etag:
    """Checks whole-object bodies against an S3 ETag that is the MD5 of the bytes.

    Only plain ETags (32 hex digits) of objects not encrypted with KMS or a customer key are
    MD5s on AWS; multipart ETags carry a ``-N`` suffix. Some S3-compatible servers use other
    32-hex ETags: until one body has matched its ETag (which confirms the store's ETags are
    MD5s), the same bytes received twice for one ETag without a match mean they are not, and
    the check is turned off (one warning). Once confirmed, a mismatch is always a retry.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.confirmed = False
        self._lock = threading.Lock()
        self._mismatch: dict[tuple[str, str], str] = {}

    def verify(self, what: str, etag: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise TransientError if ``body`` is not what ``etag`` says (when it says anything)."""
        if not self.enabled or not _MD5_ETAG.fullmatch(etag):
            return
        sse = headers.get("x-amz-server-side-encryption", "")
        if sse.startswith("aws:kms") or _SSE_C in headers:
            return  # the ETag of such an object is not the MD5 of its bytes
        digest = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if digest == etag:
            self.confirmed = True
            return
        with self._lock:
            if not self.confirmed and self._mismatch.get((what, etag)) == digest:
                self.enabled = False
                log.warning("this store's ETags are not MD5 digests (%s): whole-object GETs are "
                            "no longer checked against them", what)
                return
            if len(self._mismatch) > 1000:
                self._mismatch.clear()
            self._mismatch[(what, etag)] = digest
        raise TransientError(f"{what}: the body's MD5 does not match its ETag (damaged in transit)")


def verify_goog_hash(what: str, header: str | None, body: bytes) -> None:
    """Check a whole object's bytes against GCS's ``x-goog-hash`` (crc32c, else md5)."""
    if not header:
        return
    hashes = dict(
        part.strip().split("=", 1) for part in header.split(",") if "=" in part
    )
    if "crc32c" in hashes:
        want = base64.b64decode(hashes["crc32c"])
        got = google_crc32c.value(body).to_bytes(4, "big")
        kind = "CRC32C"
    elif "md5" in hashes:
        want = base64.b64decode(hashes["md5"])
        got = hashlib.md5(body, usedforsecurity=False).digest()
        kind = "MD5"
    else:
        return
    if got != want:
        raise TransientError(f"{what}: the body's {kind} does not match the store's")
