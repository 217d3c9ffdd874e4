"""``agentcube-mcp``: an MCP server giving a model a Code Interpreter sandbox (extra ``mcp``).

Upstream's tools with their names and arguments (``run_code``, ``execute_command``,
``write_file``, ``list_files``, ``upload_file``, ``download_file``, ``stop_session``; each takes an
optional ``session_id``), plus ``run_cell`` (a persistent Python context: variables survive between
calls, plots come back as images) and ``start_process`` / ``process_output`` / ``stop_process``.
One sandbox session per MCP client — over stdio the server's one client, over HTTP each MCP
session (see :func:`mcp_session`) — created on first use and stopped by ``stop_session``, when
the MCP session is gone, or when the server exits, unless a call names another ``session_id``.
Errors carry the sandbox's own text (a ``NameError`` reaches the model as such). Runs on mcp 1.x
(``FastMCP``) and 2.x (``MCPServer``).

Run: ``agentcube-mcp`` (stdio) or ``agentcube-mcp --http --port 8765`` (streamable HTTP), with
``WORKLOAD_MANAGER_URL`` / ``ROUTER_URL`` (and ``AGENTCUBE_AUTH_TOKEN``) set as for the SDK.

``upload_file`` and ``download_file`` move files between the sandbox and this machine: only under
``--files-dir DIR`` (``AGENTCUBE_MCP_FILES_DIR``), and off without it. The model picks their
local paths, and it reads what sandbox code prints: left open (as upstream's are), a prompt
written by sandbox code could have it copy ``~/.ssh`` into the sandbox or a script over
``~/.bashrc``.

Over HTTP, ``--token`` (``AGENTCUBE_MCP_TOKEN``) makes every request need ``Authorization: Bearer
<token>``; on an address other than loopback one is required, and generated (and printed) when
not given, as ``agentcube up`` does: anyone reaching the port would otherwise drive sandboxes with
this server's credentials.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hmac
import ipaddress
import json
import os
import secrets
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar, Union

# mcp 1.x's FastMCP settings hold a forward reference that pydantic-settings warns about at every
# start (harmless, and all an operator would see before the server's own lines).
warnings.filterwarnings("ignore", message=r"Field 'lifespan' has an incomplete definition")

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

# mcp 2 renamed FastMCP to MCPServer and took the HTTP address out of its constructor (into
# ``run``); everything used here is otherwise the same in both majors, and both are supported.
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

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.contexts import Context
from agentcube.exceptions import AgentCubeError, CommandExecutionError

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
    it (as upstream's tools without ``session_reuse``)."""
    if mcp_ctx is None:
        return None
    session = mcp_ctx.session
    return getattr(session, "_connection", session) if MCP_MAJOR >= 2 else session


class Sandboxes:
    """Each MCP session's own sandbox (lazy), and any others named by ``session_id``. Over stdio
    (``per_session`` false) the server has one client, which has one sandbox whatever its protocol
    says about sessions."""

    def __init__(self, name: str, namespace: str, per_session: bool = True):
        self.name, self.namespace, self.per_session = name, namespace, per_session
        self.own: Dict[int, CodeInterpreterClient] = {}
        self.attached: Dict[str, CodeInterpreterClient] = {}
        self.contexts: Dict[str, Context] = {}

    def get(self, mcp_ctx: Optional[Ctx], session_id: Optional[str]) -> CodeInterpreterClient:
        if session_id:
            for c in self.own.values():
                if c.session_id == session_id:
                    return c
            if session_id not in self.attached:
                self.attached[session_id] = CodeInterpreterClient(self.name, self.namespace, session_id=session_id)
            return self.attached[session_id]
        session = mcp_session(mcp_ctx) if self.per_session else None
        key = id(session)
        client = self.own.get(key)
        if client is None or client.session_id is None:
            client = CodeInterpreterClient(self.name, self.namespace)
            self.own[key] = client
            if session is not None:
                # The MCP session is gone (HTTP session ended or timed out): so is its sandbox.
                at_end = getattr(session, "exit_stack", None)  # mcp 2's connection
                if at_end is not None:
                    at_end.callback(self._release, key)
                else:
                    weakref.finalize(session, self._release, key)
        return client

    def _release(self, key: int) -> None:
        client = self.own.pop(key, None)
        if client is not None:
            client.stop()

    def context(self, client: CodeInterpreterClient) -> Context:
        sid = str(client.session_id)
        if sid not in self.contexts:
            self.contexts[sid] = client.create_context("python")
        return self.contexts[sid]

    def stop(self, mcp_ctx: Optional[Ctx], session_id: Optional[str]) -> str:
        key = id(mcp_session(mcp_ctx) if self.per_session else None)
        if not session_id and key not in self.own:
            return "no session to stop"
        client = self.get(mcp_ctx, session_id)
        sid = client.session_id
        client.stop()
        self.contexts.pop(str(sid), None)
        self.own = {k: c for k, c in self.own.items() if c is not client}
        self.attached.pop(str(sid), None)
        return f"session {sid} stopped"

    def stop_all(self) -> None:
        for c in list(self.own.values()):
            c.stop()
        self.own.clear()


def _checked(result: Dict[str, Any], what: str) -> str:
    if result["exit_code"] != 0:
        raise RuntimeError(f"{what} failed with exit code {result['exit_code']}:\n{result['stderr']}{result['stdout']}")
    return str(result["stdout"])


class LocalFiles:
    """Where ``upload_file`` and ``download_file`` may read and write on this machine: under
    ``root`` only (relative paths are taken from it; symlinks are resolved before the check), or
    nowhere when ``root`` is ``None``."""

    def __init__(self, root: Optional[str]):
        self.root = os.path.realpath(root) if root else None

    def _inside(self, path: str) -> bool:
        assert self.root is not None
        return path == self.root or path.startswith(self.root + os.sep)

    def _joined(self, local_path: str) -> str:
        if self.root is None:
            raise PermissionError(
                "upload_file and download_file are off: start agentcube-mcp with --files-dir DIR "
                "(or AGENTCUBE_MCP_FILES_DIR) to let them use files under DIR on this machine"
            )
        return os.path.join(self.root, local_path)

    def readable(self, local_path: str) -> str:
        """The file to upload: ``local_path`` with every symlink resolved, inside the root."""
        real = os.path.realpath(self._joined(local_path))
        if not self._inside(real):
            raise PermissionError(f"{local_path!r} is outside the files directory {self.root}")
        return real

    def writable(self, local_path: str) -> str:
        """Where to download: inside the root once its directory's symlinks are resolved, and
        not itself a symlink (which would be followed out)."""
        joined = self._joined(local_path)
        parent, leaf = os.path.split(joined)
        real = os.path.join(os.path.realpath(parent), leaf)
        if leaf in ("", ".", "..") or not self._inside(real) or real == self.root:
            raise PermissionError(f"{local_path!r} is outside the files directory {self.root}")
        if os.path.islink(real):
            raise PermissionError(f"{local_path!r} is a symlink; not written through")
        return real


class StaticToken:
    """The one bearer token HTTP clients must send (compared in constant time)."""

    def __init__(self, token: str):
        self.token = token

    async def verify_token(self, token: str) -> Optional[AccessToken]:
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return AccessToken(token=token, client_id="agentcube-mcp", scopes=[])
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(
    name: str = "my-interpreter",
    namespace: str = "default",
    files_dir: Optional[str] = None,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: Optional[str] = None,
) -> Server:
    """The server, for stdio or (``http``) streamable HTTP; ``files_dir``: see
    :class:`LocalFiles`; ``host``, ``port`` and ``token`` for HTTP (with a token every request
    must carry it)."""
    local = LocalFiles(files_dir)
    boxes = Sandboxes(name, namespace, per_session=http)
    atexit.register(boxes.stop_all)
    options: Dict[str, Any] = {} if MCP_MAJOR >= 2 else {"host": host, "port": port}
    if token:
        url = f"http://{host}:{port}"
        options["token_verifier"] = StaticToken(token)
        options["auth"] = AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp")  # type: ignore[arg-type]
    mcp = Server("agentcube", **options)

    def tool(structured_output: Optional[bool] = None) -> Callable[[Tool], Tool]:
        return lambda fn: mcp.tool(structured_output=structured_output)(reported(fn))

    @tool()
    def run_code(ctx: Ctx, language: str, code: str, session_id: Optional[str] = None) -> str:
        """Runs Python or bash code in a fresh process in the sandbox (nothing carries over between
        calls; use run_cell for that). Returns stdout; errors carry the program's stderr."""
        c = boxes.get(ctx, session_id)
        try:
            return c.run_code(language, code)
        except CommandExecutionError as e:
            raise RuntimeError(f"exit code {e.exit_code}:\n{e.stderr}") from e

    @tool(structured_output=False)
    def run_cell(ctx: Ctx, code: str, session_id: Optional[str] = None) -> List[Content]:
        """Runs Python code in the session's persistent interpreter: variables, imports and
        definitions survive between calls. Returns output, the last expression's value, and any
        matplotlib figures as images."""
        c = boxes.get(ctx, session_id)
        ex = c.run_cell(code, context=boxes.context(c), timeout=300)
        out: List[Content] = []
        text = ex.stdout + ex.stderr
        for r in ex.results:
            if r.png:
                out.append(Image(data=r.png, format="png"))
            elif r.text is not None:
                text += ("" if not text or text.endswith("\n") else "\n") + r.text
        if ex.error is not None:
            raise RuntimeError(f"{ex.error.name}: {ex.error.value}\n{text}")
        return [text or "(no output)"] + out

    @tool()
    def execute_command(ctx: Ctx, command: str, session_id: Optional[str] = None) -> str:
        """Runs a shell command (through sh -c) in the sandbox; returns stdout."""
        c = boxes.get(ctx, session_id)
        return _checked(c.execute_command_result(["sh", "-c", command]), command)

    @tool()
    def write_file(ctx: Ctx, path: str, content: str, session_id: Optional[str] = None) -> str:
        """Writes text to a file in the sandbox's workspace."""
        boxes.get(ctx, session_id).write_file(content, path)
        return f"wrote {len(content.encode())} bytes to {path}"

    @tool()
    def list_files(ctx: Ctx, path: str = ".", session_id: Optional[str] = None) -> str:
        """Lists a directory of the sandbox (JSON: name, size, mode, modified)."""
        return json.dumps(boxes.get(ctx, session_id).list_files(path))

    @tool()
    def upload_file(ctx: Ctx, local_path: str, remote_path: str, session_id: Optional[str] = None) -> str:
        """Copies a file of the MCP server's files directory (a path relative to it) into the
        sandbox."""
        boxes.get(ctx, session_id).upload_file(local.readable(local_path), remote_path)
        return f"uploaded {local_path} to {remote_path}"

    @tool()
    def download_file(ctx: Ctx, remote_path: str, local_path: str, session_id: Optional[str] = None) -> str:
        """Copies a file of the sandbox into the MCP server's files directory (a path relative
        to it)."""
        target = local.writable(local_path)
        boxes.get(ctx, session_id).download_file(remote_path, target)
        return f"downloaded {remote_path} to {local_path} ({os.path.getsize(target)} bytes)"

    @tool()
    def start_process(ctx: Ctx, command: str, session_id: Optional[str] = None) -> str:
        """Starts a long-running command (sh -c) in the background; returns its process id."""
        p = boxes.get(ctx, session_id).start_process(["sh", "-c", command])
        return p.id

    @tool()
    def process_output(ctx: Ctx, process_id: str, session_id: Optional[str] = None) -> str:
        """The output of a background process so far (and its exit code once it ended)."""
        p = boxes.get(ctx, session_id).attach_process(process_id)
        text = "".join(ch.data for ch in p.output(since=0))
        if p.exit_code is not None:
            text += f"\n[exit code {p.exit_code}]"
        return text or "(no output yet)"

    @tool()
    def stop_process(ctx: Ctx, process_id: str, session_id: Optional[str] = None) -> str:
        """Stops a background process (SIGTERM to its process group)."""
        boxes.get(ctx, session_id).attach_process(process_id).signal("TERM")
        return f"process {process_id} stopped"

    @tool()
    def stop_session(ctx: Ctx, session_id: Optional[str] = None) -> str:
        """Deletes the sandbox (this server's own, or the one named)."""
        return boxes.stop(ctx, session_id)

    return mcp


def main() -> None:
    ap = argparse.ArgumentParser(prog="agentcube-mcp", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--name", default=os.getenv("AGENTCUBE_CODE_INTERPRETER", "my-interpreter"))
    ap.add_argument("--namespace", default=os.getenv("AGENTCUBE_NAMESPACE", "default"))
    ap.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument(
        "--files-dir",
        default=os.getenv("AGENTCUBE_MCP_FILES_DIR") or None,
        help="the only directory upload_file and download_file may use (off without it)",
    )
    ap.add_argument(
        "--token",
        default=os.getenv("AGENTCUBE_MCP_TOKEN") or None,
        help="HTTP: the bearer token every request needs (generated off loopback when not given)",
    )
    a = ap.parse_args()
    token = a.token
    if a.http and not token and not is_loopback(a.host):
        token = secrets.token_urlsafe(32)
        print(
            f"agentcube-mcp: {a.host} is not loopback: clients must send "
            f"Authorization: Bearer {token}  (or set AGENTCUBE_MCP_TOKEN)",
            file=sys.stderr,
        )
    server = build(a.name, a.namespace, a.files_dir, a.http, a.host, a.port, token if a.http else None)
    if not a.http:
        server.run(transport="stdio")
    elif MCP_MAJOR >= 2:
        # Both majors guard a loopback address against DNS rebinding (only loopback Host headers pass).
        server.run(transport="streamable-http", host=a.host, port=a.port)
    else:
        server.run(transport="streamable-http")  # the address was given to the constructor


if __name__ == "__main__":
    main()
