"""Router data-plane client for Agent Runtime sessions (spec §6.3)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional
from urllib.parse import urljoin

import requests

from agentcube.auth import AuthProvider
from agentcube.clients.errors import raise_for_response
from agentcube.clients.http import pooled_session

SESSION_HEADER = "x-agentcube-session-id"


class AgentRuntimeDataPlaneClient:
    """Bootstraps and invokes an Agent Runtime session through the Router. Takes upstream's
    arguments, in upstream's order (``router_url, namespace, agent_name, timeout,
    connect_timeout, pool_connections, pool_maxsize``; ``router_url`` ``None``: ``ROUTER_URL``);
    :meth:`invoke` answers the ``requests.Response``, as upstream's."""

    SESSION_HEADER = SESSION_HEADER

    def __init__(
        self,
        router_url: Optional[str],
        namespace: str,
        agent_name: str,
        timeout: float = 120,
        connect_timeout: float = 5.0,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        *,
        auth: Optional[AuthProvider] = None,
    ):
        base = router_url or os.getenv("ROUTER_URL")
        if not base:
            raise ValueError("Router URL must be provided via 'router_url' or the ROUTER_URL environment variable.")
        self.router_url, self.namespace, self.agent_name = base, namespace, agent_name
        self.base_url = urljoin(base, f"/v1/namespaces/{namespace}/agent-runtimes/{agent_name}/invocations/")
        self.auth = auth
        self.timeout = (connect_timeout, timeout)
        self.session = pooled_session(pool_connections, pool_maxsize)

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

    def invoke(
        self, session_id: str, payload: Dict[str, Any], timeout: Optional[float] = None, path: str = ""
    ) -> requests.Response:
        """POSTs ``payload`` as JSON (at ``path`` under the invocation root); the answer as it
        came, errors included (:func:`raise_for_response` classifies them)."""
        url = urljoin(self.base_url, path.lstrip("/"))
        headers = self._headers(session_id)
        headers["Content-Type"] = "application/json"
        t = (self.timeout[0], timeout) if timeout is not None else self.timeout
        return self.session.post(url, json=payload, headers=headers, timeout=t)

    def close(self) -> None:
        self.session.close()
