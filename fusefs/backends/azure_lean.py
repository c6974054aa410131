"""The lean request path of the Azure store: the account's pooled requests session, and ranged
GETs signed here (:class:`~.azure_auth.SharedKey`, or a SAS token in the URL) and sent on that
session's urllib3 pool without the SDK's pipeline. :meth:`LeanBlobGet.get` returns None when
the pipeline must ask instead; statuses in :data:`SDK_STATUSES` are answered by the SDK.
"""

from __future__ import annotations

import logging
import os
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ..errors import FusefsError
from .azure_auth import SharedKey
from .azure_common import map_azure_error
from .lean import Answer, SessionPool

log = logging.getLogger(__name__)


def account_session(url: str, max_connections: int) -> requests.Session:
    """A requests session for one account: a pooled connection per worker (the SDK's own
    session keeps 10), and the environment's proxy and CA settings resolved once, here, for
    this URL (requests would otherwise re-read the whole environment, and ~/.netrc, on every
    request: a tenth of a small GET's CPU)."""
    session = requests.Session()
    session.trust_env = False
    session.proxies = dict(requests.utils.get_environ_proxies(url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    # retries are the pipeline's (ExponentialRetry); urllib3 must not retry underneath it
    adapter = HTTPAdapter(
        pool_connections=4,
        pool_maxsize=max_connections,
        max_retries=Retry(total=False, redirect=False, raise_on_status=False),
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


#: statuses of a lean GET that the SDK answers (and maps) instead; others (5xx, 408, 429, a
#: connection failure) go to the pipeline, whose retry policy tries again
SDK_STATUSES = frozenset({301, 302, 303, 307, 308, 400, 401, 403, 404, 409, 412})


class LeanBlobGet:
    """Ranged GETs without the pipeline and requests (policies, request and response objects,
    requests' per-request work: about half of a small GET's CPU): signed by :class:`SharedKey`
    (or a SAS token in the URL) and sent on the transport session's urllib3 pool
    (:class:`.lean.SessionPool`). Not used with token credentials or a proxy.

    An answer this path does not take is asked again through the pipeline or the SDK, which map
    it exactly; if the SDK then succeeds where this path was refused, it is turned off for the
    rest of the mount. ``enabled`` only ever goes from True to False; ``sent`` counts requests.
    """

    def __init__(self, session: requests.Session, url: str, credential: Any) -> None:
        self.sent = 0
        self._pool = SessionPool(session, url, (10.0, 60.0))
        self._signer = (SharedKey(credential["account_name"], credential["account_key"])
                        if isinstance(credential, dict) else None)  # fmt: skip
        self.enabled = self._pool.usable and (self._signer is not None or isinstance(
            credential, str))

    def get(self, what: str, url: str, headers: dict[str, str], length: int) -> Answer | None:
        """The answer (None: connection trouble or a huge 200; the pipeline retries it)."""
        self.sent += 1
        parts = urlsplit(url)
        headers = {**headers, "x-ms-date": formatdate(usegmt=True)}
        if self._signer is not None:
            headers["Authorization"] = self._signer.sign(parts.path, headers)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            return self._pool.get(what, target, headers, length, map_azure_error)
        except FusefsError as exc:
            log.debug("lean GET of %s failed (%s); using the pipeline", what, exc.message)
            return None

    def refused_but_sdk_worked(self) -> None:
        if self.enabled:
            log.info("lean Azure GET path off for this mount: the service refused it, the SDK not")
            self.enabled = False
