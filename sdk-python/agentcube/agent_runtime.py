"""``AgentRuntimeClient``: talk to an agent through the Router (upstream-compatible API)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from agentcube.auth import AuthProvider, resolve_auth
from agentcube.clients.agent_runtime_data_plane import AgentRuntimeDataPlaneClient
from agentcube.exceptions import SessionNotFoundError


class AgentRuntimeClient:
    """A session with an Agent Runtime. Without ``session_id`` one is bootstrapped through the
    Router. Sessions are reclaimed by idle timeout (there is no delete call, as upstream)."""

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
    ):
        self.agent_name = agent_name
        self.namespace = namespace
        self._dp = AgentRuntimeDataPlaneClient(
            agent_name,
            namespace=namespace,
            router_url=router_url,
            auth=resolve_auth(auth, auth_token),
            timeout=timeout,
            connect_timeout=connect_timeout,
        )
        self.session_id: Optional[str] = session_id or self._dp.bootstrap_session_id()
        self._gone: Optional[str] = None

    def invoke(self, payload: Dict[str, Any], timeout: Optional[float] = None, path: str = "") -> Any:
        """POSTs ``payload`` as JSON to the agent (at ``path`` under the invocation root). Raises
        :class:`SessionNotFoundError` when the session is gone, and from then on (the id is
        forgotten; no new session is made behind the caller's back)."""
        if self.session_id is None:
            raise SessionNotFoundError(f"session {self._gone} no longer exists: create a new AgentRuntimeClient")
        try:
            return self._dp.invoke(self.session_id, payload, timeout=timeout, path=path)
        except SessionNotFoundError:
            self._gone, self.session_id = self.session_id, None
            raise

    def close(self) -> None:
        self._dp.close()

    def __enter__(self) -> "AgentRuntimeClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
