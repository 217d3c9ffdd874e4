"""Low-level HTTP clients (control plane = Workload Manager, data plane = Router), exported and
called as upstream's ``agentcube.clients`` are."""

from agentcube.clients.agent_runtime_data_plane import AgentRuntimeDataPlaneClient
from agentcube.clients.code_interpreter_data_plane import CodeInterpreterDataPlaneClient
from agentcube.clients.control_plane import ControlPlaneClient

__all__ = [
    "ControlPlaneClient",
    "CodeInterpreterDataPlaneClient",
    "AgentRuntimeDataPlaneClient",
]
