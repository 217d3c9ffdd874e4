"""``agentcube-mcp``: an MCP server giving a model a Code Interpreter sandbox (extra ``mcp``).

Upstream's tools with their names and arguments (``run_code``, ``execute_command``,
``write_file``, ``list_files``, ``upload_file``, ``download_file``, ``stop_session``; each takes an
optional ``session_id``), plus ``run_cell`` (a persistent Python context: variables survive between
calls, plots come back as images) and ``start_process`` / ``process_output`` / ``stop_process``.
One sandbox session per server (created on first use, stopped with ``stop_session`` or when the
server exits) unless a call names another ``session_id``. Errors carry the sandbox's own text (a
``NameError`` reaches the model as such).

Run: ``agentcube-mcp`` (stdio) or ``agentcube-mcp --http --port 8765`` (streamable HTTP), with
``WORKLOAD_MANAGER_URL`` / ``ROUTER_URL`` (and ``AGENTCUBE_AUTH_TOKEN``) set as for the SDK.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
from typing import Any, Dict, List, Optional, Union

from mcp.server.fastmcp import FastMCP, Image

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.contexts import Context
from agentcube.exceptions import CommandExecutionError

Content = Union[str, Image]


class Sandboxes:
    """The server's sessions: its own (lazy) and any others named by ``session_id``."""

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self.default: Optional[CodeInterpreterClient] = None
        self.attached: Dict[str, CodeInterpreterClient] = {}
        self.contexts: Dict[str, Context] = {}

    def get(self, session_id: Optional[str]) -> CodeInterpreterClient:
        if session_id:
            if self.default is not None and self.default.session_id == session_id:
                return self.default
            if session_id not in self.attached:
                self.attached[session_id] = CodeInterpreterClient(self.name, self.namespace, session_id=session_id)
            return self.attached[session_id]
        if self.default is None or self.default.session_id is None:
            self.default = CodeInterpreterClient(self.name, self.namespace)
        return self.default

    def context(self, client: CodeInterpreterClient) -> Context:
        sid = str(client.session_id)
        if sid not in self.contexts:
            self.contexts[sid] = client.create_context("python")
        return self.contexts[sid]

    def stop(self, session_id: Optional[str]) -> str:
        client = self.get(session_id) if session_id else self.default
        if client is None:
            return "no session to stop"
        sid = client.session_id
        client.stop()
        self.contexts.pop(str(sid), None)
        if client is self.default:
            self.default = None
        self.attached.pop(str(sid), None)
        return f"session {sid} stopped"

    def stop_all(self) -> None:
        if self.default is not None:
            self.default.stop()


def _checked(result: Dict[str, Any], what: str) -> str:
    if result["exit_code"] != 0:
        raise RuntimeError(f"{what} failed with exit code {result['exit_code']}:\n{result['stderr']}{result['stdout']}")
    return str(result["stdout"])


def build(name: str = "my-interpreter", namespace: str = "default") -> FastMCP:
    """The server (tests drive it over stdio and HTTP)."""
    boxes = Sandboxes(name, namespace)
    atexit.register(boxes.stop_all)
    mcp = FastMCP("agentcube")

    @mcp.tool()
    def run_code(language: str, code: str, session_id: Optional[str] = None) -> str:
        """Runs Python or bash code in a fresh process in the sandbox (nothing carries over between
        calls; use run_cell for that). Returns stdout; errors carry the program's stderr."""
        c = boxes.get(session_id)
        try:
            return c.run_code(language, code)
        except CommandExecutionError as e:
            raise RuntimeError(f"exit code {e.exit_code}:\n{e.stderr}") from e

    @mcp.tool(structured_output=False)
    def run_cell(code: str, session_id: Optional[str] = None) -> List[Content]:
        """Runs Python code in the session's persistent interpreter: variables, imports and
        definitions survive between calls. Returns output, the last expression's value, and any
        matplotlib figures as images."""
        c = boxes.get(session_id)
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

    @mcp.tool()
    def execute_command(command: str, session_id: Optional[str] = None) -> str:
        """Runs a shell command (through sh -c) in the sandbox; returns stdout."""
        c = boxes.get(session_id)
        return _checked(c.execute_command_result(["sh", "-c", command]), command)

    @mcp.tool()
    def write_file(path: str, content: str, session_id: Optional[str] = None) -> str:
        """Writes text to a file in the sandbox's workspace."""
        boxes.get(session_id).write_file(content, path)
        return f"wrote {len(content.encode())} bytes to {path}"

    @mcp.tool()
    def list_files(path: str = ".", session_id: Optional[str] = None) -> str:
        """Lists a directory of the sandbox (JSON: name, size, mode, modified)."""
        return json.dumps(boxes.get(session_id).list_files(path))

    @mcp.tool()
    def upload_file(local_path: str, remote_path: str, session_id: Optional[str] = None) -> str:
        """Copies a file of the MCP server's machine into the sandbox."""
        boxes.get(session_id).upload_file(local_path, remote_path)
        return f"uploaded {local_path} to {remote_path}"

    @mcp.tool()
    def download_file(remote_path: str, local_path: str, session_id: Optional[str] = None) -> str:
        """Copies a file of the sandbox to the MCP server's machine."""
        boxes.get(session_id).download_file(remote_path, local_path)
        return f"downloaded {remote_path} to {local_path} ({os.path.getsize(local_path)} bytes)"

    @mcp.tool()
    def start_process(command: str, session_id: Optional[str] = None) -> str:
        """Starts a long-running command (sh -c) in the background; returns its process id."""
        p = boxes.get(session_id).start_process(["sh", "-c", command])
        return p.id

    @mcp.tool()
    def process_output(process_id: str, session_id: Optional[str] = None) -> str:
        """The output of a background process so far (and its exit code once it ended)."""
        p = boxes.get(session_id).attach_process(process_id)
        text = "".join(ch.data for ch in p.output(since=0))
        if p.exit_code is not None:
            text += f"\n[exit code {p.exit_code}]"
        return text or "(no output yet)"

    @mcp.tool()
    def stop_process(process_id: str, session_id: Optional[str] = None) -> str:
        """Stops a background process (SIGTERM to its process group)."""
        boxes.get(session_id).attach_process(process_id).signal("TERM")
        return f"process {process_id} stopped"

    @mcp.tool()
    def stop_session(session_id: Optional[str] = None) -> str:
        """Deletes the sandbox (this server's own, or the one named)."""
        return boxes.stop(session_id)

    return mcp


def main() -> None:
    ap = argparse.ArgumentParser(prog="agentcube-mcp", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--name", default=os.getenv("AGENTCUBE_CODE_INTERPRETER", "my-interpreter"))
    ap.add_argument("--namespace", default=os.getenv("AGENTCUBE_NAMESPACE", "default"))
    ap.add_argument("--http", action="store_true", help="streamable HTTP instead of stdio")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    server = build(a.name, a.namespace)
    if a.http:
        server.settings.host, server.settings.port = a.host, a.port
        server.run(transport="streamable-http")
    else:
        server.run(transport="stdio")


if __name__ == "__main__":
    main()
