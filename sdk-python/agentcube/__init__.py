"""AgentCube Python SDK: sandboxes for AI agents.

API-compatible with upstream ``agentcube-sdk``: ``CodeInterpreterClient`` and
``AgentRuntimeClient``, configured by ``WORKLOAD_MANAGER_URL`` and ``ROUTER_URL``.
"""

from agentcube.agent_runtime import AgentRuntimeClient
from agentcube.auth import AuthProvider, ServiceAccountAuth, TokenAuth
from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.contexts import Context, Execution, ExecutionError, Result
from agentcube.processes import OutputChunk, Process
from agentcube.exceptions import (
    AgentCubeError,
    CommandExecutionError,
    DataPlaneError,
    SessionError,
    SessionNotFoundError,
)

__all__ = [
    "AgentCubeError",
    "AgentRuntimeClient",
    "AuthProvider",
    "CodeInterpreterClient",
    "CommandExecutionError",
    "Context",
    "Execution",
    "ExecutionError",
    "Result",
    "DataPlaneError",
    "OutputChunk",
    "Process",
    "SessionError",
    "ServiceAccountAuth",
    "SessionNotFoundError",
    "TokenAuth",
]
