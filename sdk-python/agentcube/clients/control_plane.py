"""Workload Manager client: create, read and delete sessions (spec §6.2; reads as upstream PR #331)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional
from urllib.parse import quote

import requests

from agentcube.auth import AuthProvider, resolve_auth
from agentcube.clients.http import pooled_session
from agentcube.exceptions import HTTPSessionError, HTTPSessionNotFoundError

SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
KINDS = ("code-interpreter", "agent-runtime")
log = logging.getLogger(__name__)


def _sa_token() -> Optional[str]:
    try:
        with open(SA_TOKEN_PATH, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def _session_url(base_url: str, kind: str, session_id: str) -> str:
    """``{base}/v1/{kind}/sessions/{id}`` with the id as one path segment: an id is a caller's
    (a model's, through the MCP server) and ``../../{other kind}/sessions/{id}`` would otherwise
    be read or deleted as the other kind (HTTP clients resolve dot segments), ``?`` would read
    the list."""
    return f"{base_url}/v1/{_kind(kind)}/sessions/{quote(session_id, safe='')}"


class ControlPlaneClient:
    """Creates, reads and deletes sessions at the Workload Manager. Takes upstream's arguments, in
    upstream's order (``workload_manager_url, auth_token, timeout, connect_timeout,
    pool_connections, pool_maxsize``), or an :class:`AuthProvider` as ``auth``."""

    def __init__(
        self,
        workload_manager_url: Optional[str] = None,
        auth_token: Optional[str] = None,
        timeout: float = 120,
        connect_timeout: float = 5.0,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        *,
        auth: Optional[AuthProvider] = None,
    ):
        self.base_url = (workload_manager_url or os.getenv("WORKLOAD_MANAGER_URL") or "").rstrip("/")
        if not self.base_url:
            raise ValueError(
                "Workload Manager URL must be provided via 'workload_manager_url' or the "
                "WORKLOAD_MANAGER_URL environment variable."
            )
        self.auth = resolve_auth(auth, auth_token)
        self.timeout = (connect_timeout, timeout)
        self.session = pooled_session(pool_connections, pool_maxsize)
        self.session.headers["Content-Type"] = "application/json"

    def _headers(self) -> Dict[str, str]:
        token = self.auth.get_token() if self.auth else _sa_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def create_session(
        self,
        name: str = "my-interpreter",
        namespace: str = "default",
        metadata: Optional[Dict[str, Any]] = None,
        ttl: int = 3600,
    ) -> str:
        """``POST /v1/code-interpreter``; returns the new session id once the sandbox answers."""
        payload: Dict[str, Any] = {"name": name, "namespace": namespace, "ttl": ttl, "metadata": metadata or {}}
        resp = self.session.post(
            f"{self.base_url}/v1/code-interpreter", json=payload, headers=self._headers(), timeout=self.timeout
        )
        if not resp.ok:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            try:
                resp.raise_for_status()
            except requests.HTTPError as e:
                raise HTTPSessionError(
                    f"cannot create a session for CodeInterpreter {namespace}/{name}: "
                    f"HTTP {resp.status_code}: {message}",
                    resp.status_code,
                    resp,
                ) from e
        session_id = str(resp.json().get("sessionId") or "")
        if not session_id:
            raise ValueError(f"Workload Manager answered without a sessionId: {resp.text}")
        return session_id

    def _raise(self, resp: requests.Response, what: str) -> None:
        """Raises the SDK's error for a failed answer: :class:`SessionNotFoundError` for 404."""
        try:
            message = resp.json().get("message", resp.text)
        except ValueError:
            message = resp.text
        cls = HTTPSessionNotFoundError if resp.status_code == 404 else HTTPSessionError
        raise cls(f"{what}: HTTP {resp.status_code}: {message}", resp.status_code, resp)

    def get_session(self, session_id: str, kind: str = "code-interpreter") -> Dict[str, Any]:
        """``GET /v1/{kind}/sessions/{id}``: the session's record (``sessionId``, ``status``,
        ``createdAt``, ``expiresAt``, ``entryPoints``, ...). Raises :class:`SessionNotFoundError`
        when it does not exist or is of the other kind."""
        resp = self.session.get(
            _session_url(self.base_url, kind, session_id), headers=self._headers(), timeout=self.timeout
        )
        if not resp.ok:
            self._raise(resp, f"cannot read session {session_id}")
        record: Dict[str, Any] = resp.json()
        return record

    def list_sessions(self, kind: str = "code-interpreter", page_size: int = 100) -> List[Dict[str, Any]]:
        """``GET /v1/{kind}/sessions``: every live session of that kind the caller may see
        (following the pages). Needs an authenticated caller: a Workload Manager without caller
        authentication answers 403, raised as :class:`SessionError`."""
        out: List[Dict[str, Any]] = []
        params: Dict[str, Any] = {"limit": page_size}
        while True:
            resp = self.session.get(
                f"{self.base_url}/v1/{_kind(kind)}/sessions",
                params=params,
                headers=self._headers(),
                timeout=self.timeout,
            )
            if not resp.ok:
                self._raise(resp, f"cannot list {kind} sessions")
            page = resp.json()
            out.extend(page.get("sessions") or [])
            if not page.get("continue"):
                return out
            params["continue"] = page["continue"]

    def delete_session(self, session_id: str, kind: str = "code-interpreter") -> bool:
        """``DELETE /v1/{kind}/sessions/{id}``. Never raises: 2xx and 404 are success."""
        try:
            resp = self.session.delete(
                _session_url(self.base_url, kind, session_id),
                headers=self._headers(),
                timeout=self.timeout,
            )
        except requests.RequestException as e:
            log.warning("deleting session %s failed: %s", session_id, e)
            return False
        if resp.status_code == 404 or resp.ok:
            return True
        log.warning("deleting session %s failed: HTTP %s %s", session_id, resp.status_code, resp.text)
        return False

    def close(self) -> None:
        self.session.close()
