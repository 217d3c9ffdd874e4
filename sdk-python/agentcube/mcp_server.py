"""``agentcube-mcp``: an MCP server giving a model a Code Interpreter sandbox (extra ``mcp``).

Upstream's tools with their names and arguments (``run_code``, ``execute_command``,
``write_file``, ``list_files``, ``upload_file``, ``download_file``, ``stop_session``; each takes an
optional ``session_id``), plus ``run_cell`` (a persistent Python context: variables survive between
calls, plots come back as images) and ``start_process`` / ``process_output`` / ``stop_process``,
which take ``session_id`` (and, where they may make a sandbox, ``session_reuse``) and answer JSON
with the ``session_id``, as upstream's tools do.
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
import hmac
import ipaddress
import json
import os
import secrets
import sys
from typing import Annotated, Any, Callable, Dict, List, Optional

from pydantic import Field

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.exceptions import CommandExecutionError
from agentcube.mcp_compat import (
    MCP_MAJOR,
    AccessToken,
    AuthSettings,
    Content,
    Ctx,
    Image,
    Server,
    Tool,
    reported,
)
from agentcube.mcp_sandboxes import LocalFiles, Outcome, Sandboxes

# Tool parameters, with upstream's names and what a model reads about them.
SessionId = Annotated[
    Optional[str],
    Field(description="session_id from an earlier answer, to go on in that sandbox; omit for this client's own."),
]
Reuse = Annotated[
    bool,
    Field(description="Keep this sandbox after this MCP session ends, to name it by session_id later "
                      "(stop_session when done)."),
]
Timeout = Annotated[Optional[float], Field(description="Run timeout (seconds).")]
Language = Annotated[str, Field(description="Language (python, bash).")]
Code = Annotated[str, Field(description="Code or script to run.")]
RemotePath = Annotated[str, Field(description="Path in the sandbox's workspace (e.g. data/input.txt).")]
LocalPath = Annotated[str, Field(description="Path on the machine running this MCP server, under its files "
                                             "directory (relative to it).")]
ProcessId = Annotated[str, Field(description="process_id from start_process's answer.")]
Command = Annotated[str, Field(description="Shell command (sh -c).")]

#: run_cell's timeout when a call gives none (seconds).
CELL_TIMEOUT = 300.0

INSTRUCTIONS = (
    "AgentCube sandbox. Your calls share one sandbox; every answer carries its session_id. run_code "
    "is a new process each time (only files persist); run_cell keeps Python state. To come back to a "
    "sandbox from another MCP session, pass session_reuse=true and later its session_id. If a "
    "session_id has expired, a new sandbox is made once and the answer says so (its files are lost). "
    "stop_session when done."
)


def as_text(outcome: Outcome) -> str:
    """An answer as the text the server sends for a tool that returns a dict (JSON, indented)."""
    return json.dumps(outcome, indent=2)


def _checked(result: Dict[str, Any], what: str) -> str:
    if result["exit_code"] != 0:
        raise RuntimeError(f"{what} failed with exit code {result['exit_code']}:\n{result['stderr']}{result['stdout']}")
    return str(result["stdout"])


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
    ttl: int = 3600,
    auth_token: Optional[str] = None,
) -> Server:
    """The server, for stdio or (``http``) streamable HTTP; ``files_dir``: see
    :class:`LocalFiles`; ``host``, ``port`` and ``token`` for HTTP (with a token every request
    must carry it); ``ttl`` and ``auth_token`` for the sessions it makes (see
    :class:`CodeInterpreterClient`)."""
    local = LocalFiles(files_dir)
    boxes = Sandboxes(name, namespace, per_session=http, ttl=ttl, auth_token=auth_token)
    atexit.register(boxes.stop_all)
    options: Dict[str, Any] = {} if MCP_MAJOR >= 2 else {"host": host, "port": port}
    if token:
        url = f"http://{host}:{port}"
        options["token_verifier"] = StaticToken(token)
        options["auth"] = AuthSettings(issuer_url=url, resource_server_url=f"{url}/mcp")  # type: ignore[arg-type]
    mcp = Server("agentcube", instructions=INSTRUCTIONS, **options)

    def tool(structured_output: Optional[bool] = None) -> Callable[[Tool], Tool]:
        return lambda fn: mcp.tool(structured_output=structured_output)(reported(fn))

    @tool(structured_output=False)
    def run_code(ctx: Ctx, language: Language, code: Code, session_id: SessionId = None,
                 session_reuse: Reuse = False, timeout_seconds: Timeout = None) -> Outcome:
        """Runs Python or bash code in a fresh process in the sandbox (only files carry over between
        calls; run_cell keeps variables). Answers its stdout as ``output``; a failure carries the
        program's stderr."""

        def op(c: CodeInterpreterClient) -> Outcome:
            try:
                return {"output": c.run_code(language, code, timeout=timeout_seconds)}
            except CommandExecutionError as e:
                raise RuntimeError(f"exit code {e.exit_code}:\n{e.stderr}") from e

        return boxes.call(ctx, session_id, session_reuse, op)

    @tool(structured_output=False)
    def run_cell(ctx: Ctx, code: Code, session_id: SessionId = None, session_reuse: Reuse = False,
                 timeout_seconds: Timeout = None) -> List[Content]:
        """Runs Python code in the session's persistent interpreter: variables, imports and
        definitions survive between calls. Answers output and the last expression's value as
        ``output``, and any matplotlib figures as images."""
        images: List[Content] = []

        def op(c: CodeInterpreterClient) -> Outcome:
            ex = c.run_cell(code, context=boxes.context(c), timeout=timeout_seconds or CELL_TIMEOUT)
            images.clear()
            text = ex.stdout + ex.stderr
            for r in ex.results:
                if r.png:
                    images.append(Image(data=r.png, format="png"))
                elif r.text is not None:
                    text += ("" if not text or text.endswith("\n") else "\n") + r.text
            if ex.error is not None:
                raise RuntimeError(f"{ex.error.name}: {ex.error.value}\n{text}")
            return {"output": text}

        return [as_text(boxes.call(ctx, session_id, session_reuse, op)), *images]

    @tool(structured_output=False)
    def execute_command(ctx: Ctx, command: Command,
                        session_id: SessionId = None, session_reuse: Reuse = False,
                        timeout_seconds: Timeout = None) -> Outcome:
        """Runs a shell command (through sh -c) in the sandbox; answers its stdout as ``output``."""

        def op(c: CodeInterpreterClient) -> Outcome:
            result = c.execute_command_result(["sh", "-c", command], timeout=timeout_seconds)
            return {"output": _checked(result, command)}

        return boxes.call(ctx, session_id, session_reuse, op)

    @tool(structured_output=False)
    def write_file(ctx: Ctx, content: Annotated[str, Field(description="File text.")], remote_path: RemotePath,
                   session_id: SessionId = None, session_reuse: Reuse = False) -> Outcome:
        """Writes text to a file in the sandbox's workspace."""

        def op(c: CodeInterpreterClient) -> Outcome:
            c.write_file(content, remote_path)
            return {"remote_path": remote_path, "status": "ok"}

        return boxes.call(ctx, session_id, session_reuse, op)

    @tool(structured_output=False)
    def list_files(ctx: Ctx, path: Annotated[str, Field(description="Directory to list.")] = ".",
                   session_id: SessionId = None, session_reuse: Reuse = False) -> Outcome:
        """Lists a directory of the sandbox (``entries``: name, size, mode, modified)."""
        return boxes.call(ctx, session_id, session_reuse, lambda c: {"path": path, "entries": c.list_files(path)})

    @tool(structured_output=False)
    def upload_file(ctx: Ctx, local_path: LocalPath, remote_path: RemotePath, session_id: SessionId = None,
                    session_reuse: Reuse = False) -> Outcome:
        """Copies a file of the MCP server's files directory (a path relative to it) into the
        sandbox."""
        source = local.readable(local_path)

        def op(c: CodeInterpreterClient) -> Outcome:
            c.upload_file(source, remote_path)
            return {"local_path": local_path, "remote_path": remote_path, "status": "ok"}

        return boxes.call(ctx, session_id, session_reuse, op)

    @tool(structured_output=False)
    def download_file(ctx: Ctx, remote_path: RemotePath, local_path: LocalPath, session_id: SessionId = None,
                      session_reuse: Reuse = False) -> Outcome:
        """Copies a file of the sandbox into the MCP server's files directory (a path relative
        to it)."""
        target = local.writable(local_path)

        def op(c: CodeInterpreterClient) -> Outcome:
            c.download_file(remote_path, target)
            return {"remote_path": remote_path, "local_path": local_path, "status": "ok",
                    "bytes": os.path.getsize(target)}

        return boxes.call(ctx, session_id, session_reuse, op)

    @tool(structured_output=False)
    def start_process(ctx: Ctx, command: Command,
                      session_id: SessionId = None, session_reuse: Reuse = False) -> Outcome:
        """Starts a long-running command (sh -c) in the background; answers its ``process_id``
        (pass it, and the ``session_id``, to process_output and stop_process)."""
        return boxes.call(ctx, session_id, session_reuse,
                          lambda c: {"process_id": c.start_process(["sh", "-c", command]).id})

    @tool(structured_output=False)
    def process_output(ctx: Ctx, process_id: ProcessId, session_id: SessionId = None) -> Outcome:
        """A background process's ``output`` so far and its ``exit_code`` (null while it runs)."""
        c = boxes.get(ctx, session_id)
        p = c.attach_process(process_id)
        output = "".join(ch.data for ch in p.output(since=0))
        return {"session_id": c.session_id, "process_id": process_id, "output": output,
                "exit_code": p.exit_code}

    @tool(structured_output=False)
    def stop_process(ctx: Ctx, process_id: ProcessId, session_id: SessionId = None) -> Outcome:
        """Stops a background process (SIGTERM to its process group)."""
        c = boxes.get(ctx, session_id)
        c.attach_process(process_id).signal("TERM")
        return {"session_id": c.session_id, "process_id": process_id, "status": "stopped"}

    @tool(structured_output=False)
    def kill_all_processes(ctx: Ctx, session_id: SessionId = None) -> Outcome:
        """Ends every process in the sandbox but its server: what commands left running (servers,
        a runaway loop, a fork bomb). Use it when commands fail because the sandbox is at its
        process limit; files, and the session, stay."""
        c = boxes.get(ctx, session_id)
        return {"session_id": c.session_id, "killed": c.kill_all_processes()}

    @tool(structured_output=False)
    def stop_session(ctx: Ctx, session_id: SessionId = None) -> Outcome:
        """Deletes the sandbox (this client's own, or the one named)."""
        return boxes.stop(ctx, session_id)

    return mcp


def env(*names: str) -> Optional[str]:
    """The first of these variables that is set and not empty."""
    return next((v for v in map(os.getenv, names) if v), None)


def main() -> None:
    # Upstream's server (integrations/code-interpreter-mcp) reads CODE_INTERPRETER_NAME,
    # CODE_INTERPRETER_SESSION_TTL, API_TOKEN, MCP_TRANSPORT, MCP_HOST and MCP_PORT: an MCP client
    # configured for it runs this one unchanged.
    ap = argparse.ArgumentParser(prog="agentcube-mcp", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--name", default=env("AGENTCUBE_CODE_INTERPRETER", "CODE_INTERPRETER_NAME") or "my-interpreter")
    ap.add_argument("--namespace", default=env("AGENTCUBE_NAMESPACE") or "default")
    ap.add_argument("--ttl", type=int, default=int(env("CODE_INTERPRETER_SESSION_TTL") or 3600),
                    help="the sessions' time to live in seconds (CODE_INTERPRETER_SESSION_TTL)")
    ap.add_argument("--transport", choices=["stdio", "streamable-http"], default=env("MCP_TRANSPORT") or "stdio",
                    help="stdio (default) or streamable-http (MCP_TRANSPORT)")
    ap.add_argument("--http", action="store_true", help="the same as --transport streamable-http")
    ap.add_argument("--host", default=env("MCP_HOST") or "127.0.0.1")
    ap.add_argument("--port", type=int, default=int(env("MCP_PORT") or 8765))
    ap.add_argument(
        "--files-dir",
        default=env("AGENTCUBE_MCP_FILES_DIR"),
        help="the only directory upload_file and download_file may use (off without it)",
    )
    ap.add_argument(
        "--token",
        default=env("AGENTCUBE_MCP_TOKEN"),
        help="HTTP: the bearer token every request needs (generated off loopback when not given)",
    )
    a = ap.parse_args()
    http = a.http or a.transport == "streamable-http"
    token = a.token
    if http and not token and not is_loopback(a.host):
        token = secrets.token_hex(32)  # never starts with "-", which a command line would take for a flag
        print(
            f"agentcube-mcp: {a.host} is not loopback: clients must send "
            f"Authorization: Bearer {token}  (or set AGENTCUBE_MCP_TOKEN)",
            file=sys.stderr,
        )
    # The SDK reads AGENTCUBE_AUTH_TOKEN itself; upstream's API_TOKEN names the same thing.
    sessions_token = None if env("AGENTCUBE_AUTH_TOKEN") else env("API_TOKEN", "AGENTCUBE_API_TOKEN")
    server = build(a.name, a.namespace, a.files_dir, http, a.host, a.port, token if http else None, a.ttl,
                   sessions_token)
    if not http:
        server.run(transport="stdio")
    elif MCP_MAJOR >= 2:
        # Both majors guard a loopback address against DNS rebinding (only loopback Host headers pass).
        server.run(transport="streamable-http", host=a.host, port=a.port)
    else:
        server.run(transport="streamable-http")  # the address was given to the constructor


if __name__ == "__main__":
    main()
