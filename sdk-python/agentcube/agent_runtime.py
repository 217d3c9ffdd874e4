"""``AgentRuntimeClient``: talk to an agent through the Router (upstream-compatible API)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from agentcube.auth import AuthProvider, resolve_auth
from agentcube.clients.agent_runtime_data_plane import AgentRuntimeDataPlaneClient
from agentcube.clients.control_plane import ControlPlaneClient
from agentcube.clients.errors import raise_for_response
from agentcube.exceptions import SessionNotFoundError


class AgentRuntimeClient:
    """A session with an Agent Runtime. Without ``session_id`` one is bootstrapped through the
    Router. :meth:`stop` deletes it at the Workload Manager (upstream PR #426); otherwise it is
    reclaimed by its idle timeout."""

    def __init__(
        self,
        agent_name: str,
        namespace: str = "default",
        router_url: Optional[str] = None,
        verbose: bool = False,
        session_id: Optional[str] = None,
        timeout: int = 120,
        connect_timeout: float = 5.0,
        auth_token: Optional[str] = None,
        auth: Optional[AuthProvider] = None,
        workload_manager_url: Optional[str] = None,
    ):
        self.agent_name = agent_name
        self.namespace = namespace
        self._auth = resolve_auth(auth, auth_token)
        self._wm_url = workload_manager_url
        self._dp = AgentRuntimeDataPlaneClient(
            router_url, namespace, agent_name, timeout=timeout, connect_timeout=connect_timeout, auth=self._auth
        )
        self.session_id: Optional[str] = session_id or self._dp.bootstrap_session_id()
        self._gone: Optional[str] = None

    def invoke(self, payload: Dict[str, Any], timeout: Optional[float] = None, path: str = "") -> Any:
        """POSTs ``payload`` as JSON to the agent (at ``path`` under the invocation root). Raises
        :class:`SessionNotFoundError` when the session is gone, and from then on (the id is
        forgotten; no new session is made behind the caller's back)."""
        if self.session_id is None:
            raise SessionNotFoundError(f"session {self._gone} no longer exists: create a new AgentRuntimeClient")
        resp = self._dp.invoke(self.session_id, payload, timeout=timeout, path=path)
        try:
            raise_for_response(resp, self.session_id)
        except SessionNotFoundError:
            self._gone, self.session_id = self.session_id, None
            raise
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def stop(self) -> bool:
        """Deletes the session at the Workload Manager (``workload_manager_url`` or
        ``WORKLOAD_MANAGER_URL``; ValueError when neither is set) and closes the client. Returns
        whether the session is gone (deleted now, or already); never raises for HTTP errors."""
        gone = True
        if self.session_id is not None:
            cp = ControlPlaneClient(self._wm_url, auth=self._auth)
            try:
                gone = cp.delete_session(self.session_id, kind="agent-runtime")
            finally:
                cp.close()
            if gone:
                self._gone, self.session_id = self.session_id, None
        self.close()
        return gone

    def close(self) -> None:
        self._dp.close()

    def __enter__(self) -> "AgentRuntimeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
