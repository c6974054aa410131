"""Azure credentials: from the environment in the documented order
(:func:`resolve_credentials`), and the Shared Key signature of the store's lean ranged GET
(:class:`SharedKey`). Keys, SAS tokens and connection strings never reach a log line, an error
message or a URL shown (:func:`redact_account_url`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any
from urllib.parse import urlsplit

from ..errors import AccessDenied, UserError

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT"
KEY_ENV = "AZURE_STORAGE_KEY"
SAS_ENV = "AZURE_STORAGE_SAS_TOKEN"


def parse_connection_string(text: str) -> dict[str, str]:
    """``Key=Value;...`` -> dict (values may contain ``=``, as base64 keys do)."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def redact_account_url(url: str) -> str:
    """An account URL without query string or user info (a SAS token must not leak)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}" + (
        parts.path.rstrip("/")
    )


def resolve_credentials(
    endpoint_url: str | None, env: dict[str, str] | None = None
) -> tuple[str, Any, str]:
    """(account URL, credential, what it is) from the environment, in the documented order.

    Raises AccessDenied (one line, no secret) when nothing usable is found.
    """
    env = dict(os.environ) if env is None else env
    conn = env.get(CONNECTION_STRING_ENV, "").strip()
    account = env.get(ACCOUNT_ENV, "").strip()
    if conn:
        cs = parse_connection_string(conn)
        name = cs.get("AccountName", "")
        if cs.get("UseDevelopmentStorage", "").lower() == "true":
            name = name or "devstoreaccount1"
            cs.setdefault("BlobEndpoint", f"http://127.0.0.1:10000/{name}")
        url = endpoint_url or cs.get("BlobEndpoint") or (
            f"{cs.get('DefaultEndpointsProtocol', 'https')}://{name}.blob."
            f"{cs.get('EndpointSuffix', 'core.windows.net')}"
        )
        if cs.get("AccountKey") and name:
            return url, {"account_name": name, "account_key": cs["AccountKey"]}, "account key"
        if cs.get("SharedAccessSignature"):
            return url, cs["SharedAccessSignature"], "SAS token"
        raise AccessDenied(
            f"{CONNECTION_STRING_ENV} has neither AccountName+AccountKey nor SharedAccessSignature"
        )
    if account or endpoint_url:
        url = endpoint_url or f"https://{account}.blob.core.windows.net"
        if account and env.get(KEY_ENV, "").strip():
            return url, {"account_name": account, "account_key": env[KEY_ENV].strip()}, "key"
        if env.get(SAS_ENV, "").strip():
            return url, env[SAS_ENV].strip().lstrip("?"), "SAS token"
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise AccessDenied(
            f"no Azure credentials: set {CONNECTION_STRING_ENV}, or {ACCOUNT_ENV} with "
            f"{KEY_ENV} or {SAS_ENV}, or install azure-identity (pip install "
            "'fusefs[azure-identity]') for Entra ID sign-in"
        ) from None
    if not (account or endpoint_url):
        raise UserError(f"az://: set {ACCOUNT_ENV} (or --endpoint-url) to name the account")
    url = endpoint_url or f"https://{account}.blob.core.windows.net"
    return url, DefaultAzureCredential(), "DefaultAzureCredential"


class SharedKey:
    """Shared Key authorization of a blob GET without a body or query (the ranged GET of
    :class:`.azure_lean.LeanBlobGet`), to the rules of the SDK's ``SharedKeyCredentialPolicy``, at a
    fraction of its cost. Checked against the SDK's signer in the tests."""

    def __init__(self, account: str, key: str) -> None:
        self.account = account
        self._key = base64.b64decode(key)

    def sign(self, path: str, headers: dict[str, str]) -> str:
        """The ``Authorization`` value for ``GET path`` with ``headers`` (``If-Match`` and the
        ``x-ms-*`` headers; names as sent)."""
        lower = {k.lower(): v for k, v in headers.items()}
        # content-encoding ... if-unmodified-since, and the SDK's "byte_range" (never set)
        standard = [""] * 7 + [lower.get("if-match", "")] + [""] * 3
        ms = "".join(f"{k}:{v}\n" for k, v in sorted(lower.items()) if k.startswith("x-ms-"))
        to_sign = "GET\n" + "\n".join(standard) + "\n" + ms + f"/{self.account}{path}"
        sig = hmac.new(self._key, to_sign.encode(), hashlib.sha256).digest()
        return f"SharedKey {self.account}:{base64.b64encode(sig).decode()}"
