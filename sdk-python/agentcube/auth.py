"""Authentication providers: anything with ``get_token() -> str``.

- :class:`TokenAuth`: a fixed bearer token (``AGENTCUBE_AUTH_TOKEN`` when nothing else is given:
  the token ``agentcube up`` prints when it listens beyond loopback).
- :class:`ServiceAccountAuth`: an OAuth2 ``client_credentials`` grant at an OIDC issuer's token
  endpoint, cached until shortly before it expires (upstream SDK main's provider, for a Router
  started with ``--jwt-issuer-url``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Dict, Optional, Protocol, runtime_checkable

import requests

TOKEN_ENV = "AGENTCUBE_AUTH_TOKEN"


@runtime_checkable
class AuthProvider(Protocol):
    """Supplies a bearer token for each request."""

    def get_token(self) -> str: ...


class TokenAuth:
    """A fixed bearer token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token must not be empty")
        self._token = token

    def get_token(self) -> str:
        return self._token


class ServiceAccountAuth:
    """OAuth2 client credentials: ``POST token_url`` with ``grant_type=client_credentials``,
    ``client_id``, ``client_secret`` and ``scope`` (and ``audience`` when given), form-encoded.
    The access token is reused until ``max(expires_in - 30, expires_in // 2)`` seconds after it
    was issued (``expires_in`` defaults to 3600); thread-safe."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: Optional[str] = None,
        audience: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 10.0,
    ):
        if not (token_url and client_id and client_secret):
            raise ValueError("token_url, client_id and client_secret are required")
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.audience = audience
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._until = 0.0

    def get_token(self) -> str:
        with self._lock:
            if self._token is not None and time.monotonic() < self._until:
                return self._token
            form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self._secret}
            if self.scope:
                form["scope"] = self.scope
            if self.audience:
                form["audience"] = self.audience
            resp = requests.post(self.token_url, data=form, headers=self.headers, timeout=self.timeout)
            if not resp.ok:
                raise requests.HTTPError(
                    f"token request to {self.token_url} failed: HTTP {resp.status_code}: {resp.text[:200]}",
                    response=resp,
                )
            body = resp.json()
            token = str(body.get("access_token") or "")
            if not token:
                raise ValueError(f"{self.token_url} answered without an access_token")
            expires_in = int(body.get("expires_in") or 3600)
            self._token = token
            self._until = time.monotonic() + max(expires_in - 30, expires_in // 2)
            return token


def resolve_auth(auth: Optional[AuthProvider], auth_token: Optional[str]) -> Optional[AuthProvider]:
    """``auth`` wins over ``auth_token``, which wins over ``AGENTCUBE_AUTH_TOKEN``; none of them
    means no Authorization header (the Workload Manager client then sends the pod's
    service-account token when there is one)."""
    if auth is not None:
        return auth
    token = auth_token or os.getenv(TOKEN_ENV)
    if token:
        return TokenAuth(token)
    return None
