"""Workload Manager client: create and delete sessions (spec §6.2)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

import requests

from agentcube.auth import AuthProvider
from agentcube.exceptions import HTTPSessionError

SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
log = logging.getLogger(__name__)


def _sa_token() -> Optional[str]:
    try:
        with open(SA_TOKEN_PATH, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


class ControlPlaneClient:
    """Creates and deletes Code Interpreter sessions at the Workload Manager."""

    def __init__(
        self,
        workload_manager_url: Optional[str] = None,
        auth: Optional[AuthProvider] = None,
        timeout: float = 120,
        connect_timeout: float = 5.0,
    ):
        self.base_url = (workload_manager_url or os.getenv("WORKLOAD_MANAGER_URL") or "").rstrip("/")
        if not self.base_url:
            raise ValueError(
                "Workload Manager URL must be provided via 'workload_manager_url' or the "
                "WORKLOAD_MANAGER_URL environment variable."
            )
        self.auth = auth
        self.timeout = (connect_timeout, timeout)
        self.session = requests.Session()
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
        payload = {"name": name, "namespace": namespace, "ttl": ttl, "metadata": metadata or {}}
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
        session_id = resp.json().get("sessionId")
        if not session_id:
            raise ValueError(f"Workload Manager answered without a sessionId: {resp.text}")
        return session_id

    def delete_session(self, session_id: str) -> bool:
        """``DELETE /v1/code-interpreter/sessions/{id}``. Never raises: 2xx and 404 are success."""
        try:
            resp = self.session.delete(
                f"{self.base_url}/v1/code-interpreter/sessions/{session_id}",
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
