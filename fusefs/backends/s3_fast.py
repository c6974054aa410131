"""The fast request path of the S3 store: ranged GETs and small PutObjects signed here
(:class:`SigV4`) and sent through boto3's own connection pools, without boto3's per-request
machinery. :class:`FastPath` says when it cannot answer (None) and the store asks boto3.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import EMPTY_SHA256_HASH, _host_from_url
from urllib3.util.retry import Retry

from ..errors import StaleVersion, TransientError
from .s3_common import etag_version, is_weak, map_s3_error
from .verify import refuse_whole

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FastAnswer:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class SigV4:
    """AWS Signature Version 4 of a request without a query (the ranged GET and the PutObject
    of :class:`FastPath`), to the same rules as botocore's ``S3SigV4Auth`` (an unnormalised
    path; the payload hash of the body, or ``UNSIGNED-PAYLOAD``), at a fraction of its cost:
    botocore rebuilds its header map several times per request (about 15% of a cold small
    file's CPU). The signing key is derived once a day. Checked against botocore's signer in
    the tests."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._key: tuple[str, str, bytes] | None = None  # (date, secret, signing key)

    def _signing_key(self, date: str, secret: str) -> bytes:
        k = self._key
        if k is None or k[0] != date or k[1] != secret:
            key = ("AWS4" + secret).encode()
            for part in (date, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = k = (date, secret, key)
        return k[2]

    def sign(self, creds: Any, host: str, path: str, headers: dict[str, str],
             amz_date: str | None = None, *, method: str = "GET",
             payload_hash: str = EMPTY_SHA256_HASH) -> dict[str, str]:
        """``headers`` (lower-case names) plus the date, payload hash, token and authorization
        headers for ``METHOD path`` on ``host``; every header given is signed."""
        amz_date = amz_date or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        date = amz_date[:8]
        headers = {**headers, "host": host, "x-amz-date": amz_date,
                   "x-amz-content-sha256": payload_hash}
        if creds.token:
            headers["x-amz-security-token"] = creds.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join([
            method, path, "", *(f"{n}:{' '.join(headers[n].split())}" for n in names), "",
            signed, payload_hash])
        scope = f"{date}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        sig = hmac.new(self._signing_key(date, creds.secret_key), to_sign.encode(),
                       hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        del headers["host"]  # urllib3 sends the pool's own, which is the same
        return headers


class FastPath:
    """Ranged GETs and small PutObjects without boto3's per-request machinery (endpoint rules,
    events, parsing, header maps: most of a small request's CPU): signed by :class:`SigV4` and
    sent through the clients' own urllib3 pool managers (their pools, TLS, proxy settings and
    timeouts: the reading client's for GETs, the writing client's for PUTs), as botocore's own
    HTTP session does, to the bucket URL that boto3 itself used for the first listing.

    An answer is returned as it came; the caller decides. An error answer this path does not
    handle (a 3xx, 400, 403, 404) is repeated through boto3, which maps it exactly and follows
    redirects; if boto3 then succeeds where this path was refused (a signature or redirect it
    does not handle), the path is turned off for the rest of the mount. That decision is made
    per request, from that request's own answer: no state is shared between threads but
    ``enabled``, which only ever goes from True to False.
    """

    def __init__(self, client: Any, listers: list[Any], credentials: Any,
                 writer: Any = None) -> None:
        self._signer = SigV4(client.meta.region_name or "us-east-1")
        self._credentials = credentials
        self._http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        self._write_http = getattr(getattr(writer, "_endpoint", None), "http_session", None)
        self._base: str | None = None
        self._host = ""
        self.enabled = credentials is not None and self._http is not None
        if self.enabled:
            for lister in listers:
                lister.meta.events.register("before-send.s3.ListObjectsV2", self._learn_base)

    def _learn_base(self, request: Any, **_: Any) -> None:
        if self._base is None:
            parts = urlsplit(request.url)  # .../bucket?list-type=2 or https://bucket.host/?...
            self._host = _host_from_url(request.url)
            self._base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"

    def _send(self, http: Any, what: str, method: str, url: str, headers: dict[str, str],
              body: bytes | None = None, payload_hash: str = EMPTY_SHA256_HASH) -> Any:
        """Sign and send one request; the urllib3 response, its body unread."""
        try:
            headers = self._signer.sign(self._credentials.get_frozen_credentials(),
                                        self._host, urlsplit(url).path, headers,
                                        method=method, payload_hash=payload_hash)
            # what botocore's URLLib3Session.send does, without its request/response objects
            proxy_url = http._proxy_config.proxy_url_for(url)
            pool = http._get_connection_manager(url, proxy_url).connection_from_url(url)
            http._setup_ssl_cert(pool, url, http._verify)
            return pool.urlopen(
                method, http._get_request_target(url, proxy_url), body=body, headers=headers,
                retries=Retry(False), assert_same_host=False, preload_content=False,
                decode_content=False, enforce_content_length=False)
        except Exception as exc:
            raise map_s3_error(exc, what) from exc

    @staticmethod
    def _read(what: str, resp: Any, check: Callable[[], None] | None = None) -> bytes:
        """The body of ``resp`` (after ``check()``); the connection goes back to the pool only
        if the body was read whole."""
        try:
            if check is not None:
                check()
            body: bytes = resp.read()
        except TransientError:
            resp.close()
            raise
        except Exception as exc:
            resp.close()  # the connection is in an unknown state: never reuse it
            raise map_s3_error(exc, what) from exc
        finally:
            resp.release_conn()
        return body

    def get(self, what: str, key: str, start: int, length: int, version: str) -> FastAnswer | None:
        """The server's answer to one ranged GET (None: no listing seen yet, ask boto3).
        Connection trouble, a stall or a body cut short raise TransientError."""
        base = self._base
        if base is None:
            return None
        headers = {"range": f"bytes={start}-{start + length - 1}"}
        if version and not is_weak(version):
            headers["if-match"] = f'"{version}"'
        resp = self._send(self._http, what, "GET", base + quote(key, safe="/~"), headers)
        status = resp.status
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        etag = etag_version(answer_headers.get("etag", ""))
        if status in (200, 206) and etag and version and not is_weak(version) and etag != version:
            resp.close()  # body unread: the connection cannot be reused
            resp.release_conn()  # (the pool reconnects its slot)
            raise StaleVersion(f"{what}: changed (ETag {etag} != {version})")
        body = self._read(what, resp, lambda: refuse_whole(what, status, answer_headers, length))
        return FastAnswer(status, answer_headers, body)

    def put(self, what: str, key: str, body: bytes, md5: bytes, meta: Mapping[str, str],
            cond: Mapping[str, str]) -> FastAnswer | None:
        """The server's answer to one PutObject of ``body`` (its MD5 digest ``md5``, sent as
        Content-MD5 so that the server checks what arrived), with user metadata ``meta`` and
        boto3-style conditions ``cond`` (IfMatch, IfNoneMatch). None: ask boto3."""
        base = self._base
        if base is None or self._write_http is None:
            return None
        headers = {"content-md5": base64.b64encode(md5).decode()}
        for name, value in meta.items():
            headers[f"x-amz-meta-{name.lower()}"] = value
        for name, value in cond.items():
            headers[{"IfMatch": "if-match", "IfNoneMatch": "if-none-match"}[name]] = value
        # botocore's rule: over TLS with a Content-MD5 the payload is not hashed again
        payload = "UNSIGNED-PAYLOAD" if base.startswith("https:") else \
            hashlib.sha256(body).hexdigest()
        resp = self._send(self._write_http, what, "PUT", base + quote(key, safe="/~"), headers,
                          body, payload)
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        return FastAnswer(resp.status, answer_headers, self._read(what, resp))

    def refused_but_boto3_worked(self) -> None:
        """A request this path was refused worked through boto3: stop using this path."""
        if self.enabled:
            log.info("fast request path off for this mount: the server refused it, boto3 not")
            self.enabled = False
