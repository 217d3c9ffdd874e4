"""What ``agentcube-mcp`` needs of the ``mcp`` package, under either major: mcp 2 renamed
``FastMCP`` to ``MCPServer``, took the HTTP address out of its constructor (into ``run``), hides
an exception's text unless it is a ``ToolError``, and makes its ``ServerSession`` per request."""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

# mcp 1.x's FastMCP settings hold a forward reference that pydantic-settings warns about at every
# start (harmless, and all an operator would see before the server's own lines).
warnings.filterwarnings("ignore", message=r"Field 'lifespan' has an incomplete definition")

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

try:
    from mcp.server.mcpserver import Context as McpContext
    from mcp.server.mcpserver import Image
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.server.mcpserver.exceptions import ToolError

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import Context as McpContext  # type: ignore[attr-defined,no-redef]
    from mcp.server.fastmcp import FastMCP as Server  # type: ignore[attr-defined,no-redef]
    from mcp.server.fastmcp import Image  # type: ignore[attr-defined,no-redef]
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[import-not-found,no-redef]

    MCP_MAJOR = 1

from agentcube.exceptions import AgentCubeError

__all__ = [
    "MCP_MAJOR",
    "AccessToken",
    "AuthSettings",
    "Content",
    "Ctx",
    "Image",
    "McpContext",
    "Server",
    "Tool",
    "ToolError",
    "mcp_session",
    "reported",
]

Content = Union[str, Image]
#: The MCP request context the server passes to tools (not part of their schemas); its type
#: parameters differ between the majors, and the server finds it by its class alone.
if TYPE_CHECKING:
    Ctx = McpContext[Any, Any]
else:
    Ctx = McpContext


Tool = TypeVar("Tool", bound=Callable[..., Any])


def reported(tool: Tool) -> Tool:
    """``tool`` with the failures a model should read — the sandbox's own text, an SDK or HTTP
    error, a refused local path — raised as the server's ``ToolError``, whose text reaches the
    client. mcp 2 sends any other exception as ``Error executing tool <name>`` alone; mcp 1 sent
    every text, which is what a model needs to fix its code."""

    @functools.wraps(tool)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return tool(*args, **kwargs)
        except (AgentCubeError, OSError, RuntimeError, ValueError) as e:
            raise ToolError(str(e)) from e

    return call  # type: ignore[return-value]


def mcp_session(mcp_ctx: Optional[Ctx]) -> Any:
    """The object that lives as long as an HTTP client's MCP session: mcp 1's ``ServerSession``;
    mcp 2 makes one per request, and there the session is its connection (one per HTTP session
    id, once the client has done the ``initialize`` handshake, as MCP clients do). A client on the
    2026-07-28 protocol skips the handshake and has a connection per request: each of its calls
    without a ``session_id`` gets a sandbox of its own, stopped when the connection closes after
    it unless ``session_reuse`` keeps it (as upstream's tools)."""
    if mcp_ctx is None:
        return None
    session = mcp_ctx.session
    return getattr(session, "_connection", session) if MCP_MAJOR >= 2 else session
