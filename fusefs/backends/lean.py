"""GETs sent straight on a requests session's urllib3 pool, without requests itself.

requests spends about half of a small GET's client CPU on work the backends do not need per
request: environment and proxy lookups, request preparation, hooks, cookies. :class:`SessionPool`
finds the connection pool a :class:`requests.Session` would use for a URL (its connections, TLS
settings, pool size) once, and sends GETs on it. It is usable only where the session would do
nothing more than that: a plain ``HTTPAdapter`` (no mTLS) and no proxy for the URL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ..errors import FusefsError, TransientError
from .verify import refuse_whole


@dataclass(slots=True)
class Answer:
    """A GET's answer, its body read whole."""

    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class SessionPool:
    """The urllib3 pool ``session`` would send requests to ``url``'s origin on; ``usable`` is
    False where the session would do more (a proxy, mTLS, a custom adapter)."""

    def __init__(self, session: Any, url: str, timeout: tuple[float, float]) -> None:
        self.usable = False
        self._timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        adapter = session.get_adapter(url)
        if type(adapter) is not HTTPAdapter or getattr(session, "is_mtls", False):
            return
        proxies = dict(session.proxies or {})
        verify = session.verify
        if session.trust_env:  # what requests' merge_environment_settings would add
            proxies.update(requests.utils.get_environ_proxies(url))
            if verify is True:
                verify = (os.environ.get("REQUESTS_CA_BUNDLE")
                          or os.environ.get("CURL_CA_BUNDLE") or True)  # fmt: skip
        if requests.utils.select_proxy(url, proxies):
            return
        self._pools = adapter.poolmanager
        self._host, self._pool_kwargs = adapter.build_connection_pool_key_attributes(
            requests.Request("GET", url).prepare(), verify, session.cert
        )
        self.usable = True

    def get(
        self,
        what: str,
        target: str,
        headers: Mapping[str, str],
        length: int,
        map_error: Callable[[BaseException, str], FusefsError],
        leave: frozenset[int] = frozenset(),
    ) -> Answer | None:
        """GET ``target`` (path and query) for ``length`` bytes: the answer, or None for a
        status in ``leave`` (the body drained, the connection kept). Connection trouble, a
        stall or a body cut short raise ``map_error``'s error (a TransientError); a 200 with
        far more than ``length`` bytes is refused unread (see :func:`.verify.refuse_whole`)."""
        try:
            pool = self._pools.connection_from_host(**self._host, pool_kwargs=self._pool_kwargs)
            resp = pool.urlopen("GET", target, headers=dict(headers), retries=Retry(False),
                                redirect=False, assert_same_host=False, preload_content=False,
                                decode_content=False, timeout=self._timeout)  # fmt: skip
        except Exception as exc:
            raise map_error(exc, what) from exc
        status = resp.status
        answer_headers = {k.lower(): v for k, v in resp.headers.items()}
        try:
            if status in leave:
                resp.drain_conn()
                return None
            refuse_whole(what, status, answer_headers, length)
            body: bytes = resp.read()
        except TransientError:
            resp.close()
            raise
        except Exception as exc:
            resp.close()  # the connection is in an unknown state: never reuse it
            raise map_error(exc, what) from exc
        finally:
            resp.release_conn()
        return Answer(status, answer_headers, body)
