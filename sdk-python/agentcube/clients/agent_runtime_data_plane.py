"""Router data-plane client for Agent Runtime sessions (spec §6.3)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional
from urllib.parse import urljoin

import requests

from agentcube.auth import AuthProvider
from agentcube.clients.errors import raise_for_response

SESSION_HEADER = "x-agentcube-session-id"


class AgentRuntimeDataPlaneClient:
    """Bootstraps and invokes an Agent Runtime session through the Router."""

    def __init__(
        self,
        agent_name: str,
        namespace: str = "default",
        router_url: Optional[str] = None,
        auth: Optional[AuthProvider] = None,
        timeout: float = 120,
        connect_timeout: float = 5.0,
    ):
        base = router_url or os.getenv("ROUTER_URL")
        if not base:
            raise ValueError("Router URL must be provided via 'router_url' or the ROUTER_URL environment variable.")
        self.base_url = urljoin(base, f"/v1/namespaces/{namespace}/agent-runtimes/{agent_name}/invocations/")
        self.auth = auth
        self.timeout = (connect_timeout, timeout)
        self.session = requests.Session()

    def _headers(self, session_id: Optional[str] = None) -> Dict[str, str]:
        h: Dict[str, str] = {}
        if session_id:
            h[SESSION_HEADER] = session_id
        if self.auth:
            h["Authorization"] = f"Bearer {self.auth.get_token()}"
        return h

    def bootstrap_session_id(self) -> str:
        """``GET`` the invocation root without a session: the Router creates one and returns its
        id in the header, even when the agent itself answers with an error."""
        resp = self.session.get(self.base_url, headers=self._headers(), timeout=self.timeout)
        session_id = resp.headers.get(SESSION_HEADER)
        if session_id:
            return session_id
        raise_for_response(resp, None)
        raise ValueError("the Router did not return a session id")

    def invoke(self, session_id: str, payload: Dict[str, Any], timeout: Optional[float] = None, path: str = "") -> Any:
        url = urljoin(self.base_url, path.lstrip("/"))
        headers = self._headers(session_id)
        headers["Content-Type"] = "application/json"
        t = (self.timeout[0], timeout) if timeout is not None else self.timeout
        resp = self.session.post(url, json=payload, headers=headers, timeout=t)
        raise_for_response(resp, session_id)
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def close(self) -> None:
        self.session.close()
