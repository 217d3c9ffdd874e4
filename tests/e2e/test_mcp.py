"""The MCP server (`agentcube-mcp`, sdk-python/agentcube/mcp_server.py) driven by the official
`mcp` client over stdio and streamable HTTP, against the running stack: upstream's tool names and
arguments, errors that carry the sandbox's text, a persistent context with plots as images,
background processes, stop_session. The server runs under both MCP majors it supports: mcp 2 (this
venv, and the client's) and mcp 1 (`.venv-mcp1`, made by scripts/install-deps.sh)."""

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import pytest
import httpx2
import requests
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent

from conftest import REPO, _free_port

#: The Python each MCP major's server runs under.
SERVER_PYTHON = {2: sys.executable, 1: str(REPO / ".venv-mcp1" / "bin" / "python")}


@pytest.fixture(params=[2, 1], ids=["mcp2", "mcp1"])
def server_python(request) -> str:
    """A Python whose `agentcube.mcp_server` runs on the MCP major named by the parameter."""
    python = SERVER_PYTHON[request.param]
    assert os.path.exists(python), f"{python} is missing: run scripts/install-deps.sh"
    major = subprocess.run([python, "-c", "import agentcube.mcp_server as m; print(m.MCP_MAJOR)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert major == str(request.param), (python, major)
    return python

# Upstream's tools (integrations/code-interpreter-mcp at volcano-sh/agentcube 1286b3a): each one's
# arguments, the required ones first.
UPSTREAM_ARGS = {
    "run_code": (["language", "code"], ["session_id", "session_reuse", "timeout_seconds"]),
    "execute_command": (["command"], ["session_id", "session_reuse", "timeout_seconds"]),
    "write_file": (["content", "remote_path"], ["session_id", "session_reuse"]),
    "list_files": ([], ["path", "session_id", "session_reuse"]),
    "upload_file": (["local_path", "remote_path"], ["session_id", "session_reuse"]),
    "download_file": (["remote_path", "local_path"], ["session_id", "session_reuse"]),
    "stop_session": ([], ["session_id"]),
}
UPSTREAM_TOOLS = set(UPSTREAM_ARGS)


def text(result) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def answer(result) -> dict:
    """An upstream-shaped tool's answer (JSON with its session_id)."""
    assert not result.is_error, result
    return json.loads(text(result))


def on_demand(stack) -> set:
    """The sandboxes of `on-demand-interpreter`, a definition without a warm pool: each is a session's."""
    return {n for n in stack.sandboxes() if n.startswith("on-demand-interpreter-")}


def assert_none_left(stack, before: set, why: str) -> None:
    """Within 30 s no `on-demand-interpreter` sandbox is left but those in `before`."""
    deadline = time.monotonic() + 30
    while on_demand(stack) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not on_demand(stack) - before, why


def on_demand_over_http(stack, calls, why: str, python: str = sys.executable) -> None:
    """`calls(session)` through `agentcube-mcp --http` serving `on-demand-interpreter`, then no
    sandbox of it is left but those there before (`why` if one is)."""
    before = on_demand(stack)
    proc, port = _start_http(stack, "--name", "on-demand-interpreter", python=python)
    try:
        async def run() -> None:
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write, *_):
                async with ClientSession(read, write) as session:
                    await calls(session)

        asyncio.run(run())
        assert_none_left(stack, before, why)
    finally:
        proc.terminate()
        proc.wait(10)


def env(stack) -> dict:
    return dict(os.environ, WORKLOAD_MANAGER_URL=stack.wm_url, ROUTER_URL=stack.router_url)


async def scenario(session: ClientSession, stack) -> None:
    await session.initialize()
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert UPSTREAM_TOOLS | {"run_cell", "start_process", "process_output"} <= set(tools), tools
    # A model (or a client) written against upstream's schemas calls these with the same arguments.
    for name, (required, optional) in UPSTREAM_ARGS.items():
        schema = tools[name].input_schema
        assert set(schema["properties"]) == set(required + optional), (name, schema)
        assert set(schema.get("required", [])) == set(required), (name, schema)
    first = answer(await session.call_tool("run_code", {"language": "python", "code": "print(1+1)"}))
    assert first["output"].strip() == "2" and first["session_id"], first
    # Stateless as upstream: the NameError reaches the model as such.
    r = await session.call_tool("run_code", {"language": "python", "code": "print(undefined_x)"})
    assert r.is_error and "NameError" in text(r), r
    # The persistent context keeps state; a plot comes back as an image.
    assert answer(await session.call_tool("run_cell", {"code": "x = 21"}))["session_id"] == first["session_id"]
    assert answer(await session.call_tool("run_cell", {"code": "x * 2"}))["output"] == "42"
    r = await session.call_tool("run_cell", {"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2], [2, 1])\nNone"})
    images = [c for c in r.content if isinstance(c, ImageContent)]
    assert not r.is_error and images and images[0].mime_type == "image/png", r
    r = await session.call_tool("write_file", {"remote_path": "notes/a.txt", "content": "hello mcp"})
    assert not r.is_error
    assert "a.txt" in text(await session.call_tool("list_files", {"path": "notes"}))
    r2 = answer(await session.call_tool("execute_command", {"command": "cat notes/a.txt"}))
    assert r2["output"] == "hello mcp" and r2["session_id"] == first["session_id"], r2
    started = answer(await session.call_tool("start_process", {"command": "echo bg; sleep 0.2; echo done"}))
    assert started["session_id"] == first["session_id"], started
    out = await finished(session, started["process_id"])
    assert out["output"] == "bg\ndone\n" and out["exit_code"] == 0, out
    # What commands left running ends (and run_cell's interpreter); the files stay.
    answer(await session.call_tool("execute_command", {"command": "sh -c 'sleep 60 & sleep 60 & echo'"}))
    swept = answer(await session.call_tool("kill_all_processes", {}))
    assert swept["session_id"] == first["session_id"] and swept["killed"] >= 3, swept
    r2 = answer(await session.call_tool("execute_command", {"command": "pgrep -c sleep || true"}))
    assert r2["output"].strip() == "0", r2
    r2 = answer(await session.call_tool("execute_command", {"command": "cat notes/a.txt"}))
    assert r2["output"] == "hello mcp", r2
    r = await session.call_tool("stop_session", {})
    assert not r.is_error and "stopped" in text(r), r


async def finished(session: ClientSession, process_id: str, session_id: str | None = None) -> dict:
    """process_output's answer once the process has ended (within 10 s)."""
    args = {"process_id": process_id} | ({"session_id": session_id} if session_id else {})
    for _ in range(100):
        out = answer(await session.call_tool("process_output", args))
        if out["exit_code"] is not None:
            return out
        await asyncio.sleep(0.1)
    raise AssertionError(f"process {process_id} still runs: {out}")


def test_mcp_over_stdio(stack, server_python):
    params = StdioServerParameters(command=server_python, args=["-m", "agentcube.mcp_server"], env=env(stack))

    async def run():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await scenario(session, stack)

    asyncio.run(run())


def test_mcp_over_streamable_http(stack, server_python):
    proc, port = _start_http(stack, python=server_python)
    try:
        async def run():
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write, *_):
                async with ClientSession(read, write) as session:
                    await scenario(session, stack)

        async def two_sessions():
            # Each MCP session has a sandbox of its own.
            url = f"http://127.0.0.1:{port}/mcp"
            async with streamable_http_client(url) as (r1, w1, *_), streamable_http_client(url) as (r2, w2, *_):
                async with ClientSession(r1, w1) as a, ClientSession(r2, w2) as b:
                    await a.initialize()
                    await b.initialize()
                    await a.call_tool("write_file", {"remote_path": "only-a.txt", "content": "a"})
                    assert "only-a.txt" in text(await a.call_tool("list_files", {}))
                    assert "only-a.txt" not in text(await b.call_tool("list_files", {}))
                    for s in (a, b):
                        await s.call_tool("stop_session", {})

        asyncio.run(run())
        asyncio.run(two_sessions())
    finally:
        proc.terminate()
        proc.wait(10)


def test_mcp_files_stay_in_their_directory(stack, tmp_path, server_python):
    """upload_file and download_file take local paths from the model, which reads what sandbox code
    prints: a prompt planted there could have it copy the server's ~/.ssh into the sandbox or a
    script over ~/.bashrc. Without --files-dir they are off; with it, they stay under it."""
    files, outside = tmp_path / "files", tmp_path / "outside"
    files.mkdir()
    outside.mkdir()
    (files / "in.txt").write_text("from the host")
    (outside / "secret").write_text("host secret")
    (outside / "victim").write_text("untouched")
    (files / "to-secret").symlink_to(outside / "secret")
    (files / "to-victim").symlink_to(outside / "victim")
    (files / "to-outside").symlink_to(outside)

    async def calls(args: list, check) -> None:
        params = StdioServerParameters(command=server_python, args=["-m", "agentcube.mcp_server", *args],
                                       env=env(stack))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await check(session)
                await session.call_tool("stop_session", {})

    async def off(session: ClientSession) -> None:
        r = await session.call_tool("upload_file", {"local_path": str(files / "in.txt"), "remote_path": "x"})
        assert r.is_error and "--files-dir" in text(r), r
        await session.call_tool("write_file", {"remote_path": "x", "content": "from the sandbox"})
        r = await session.call_tool("download_file", {"remote_path": "x", "local_path": str(files / "x")})
        assert r.is_error and "--files-dir" in text(r), r

    async def under(session: ClientSession) -> None:
        r = await session.call_tool("upload_file", {"local_path": "in.txt", "remote_path": "in.txt"})
        assert not r.is_error, r
        assert answer(await session.call_tool("execute_command", {"command": "cat in.txt"}))["output"] == "from the host"
        await session.call_tool("write_file", {"remote_path": "out.txt", "content": "from the sandbox"})
        r = await session.call_tool("download_file", {"remote_path": "out.txt", "local_path": "out.txt"})
        assert not r.is_error and (files / "out.txt").read_text() == "from the sandbox", r
        for local in ("/etc/hostname", "../outside/secret", str(outside / "secret"), "to-secret",
                      "to-outside/secret"):
            r = await session.call_tool("upload_file", {"local_path": local, "remote_path": "stolen"})
            assert r.is_error and "outside the files directory" in text(r), (local, r)
        for local in ("../outside/victim", str(outside / "victim"), "to-outside/victim", "to-victim",
                      str(tmp_path / "new"), "..", "sub/..", ".", ""):
            r = await session.call_tool("download_file", {"remote_path": "out.txt", "local_path": local})
            assert r.is_error, (local, r)
        assert (outside / "victim").read_text() == "untouched"
        assert not (tmp_path / "new").exists()
        r = await session.call_tool("execute_command", {"command": "ls"})
        assert "stolen" not in text(r), r

    asyncio.run(calls([], off))
    asyncio.run(calls(["--files-dir", str(files)], under))


def _start_http(stack, *args: str, python: str = sys.executable, stderr: int = subprocess.DEVNULL,
                upstream_env: "dict[str, str] | None" = None) -> "tuple[subprocess.Popen[str], int]":
    """`agentcube-mcp --http` on a free port, once it answers (its stderr piped only when asked: a full
    pipe would stall it); with `upstream_env`, configured as upstream's server is instead (those
    variables, MCP_TRANSPORT and MCP_PORT, no flags). A port picked free can be taken before the
    server binds it (an outgoing connection's source port): a server that exits is started again
    on another port."""
    for _ in range(3):
        port = _free_port()
        if upstream_env is None:
            argv, environ = ["--http", "--port", str(port), *args], env(stack)
        else:
            argv = list(args)
            environ = dict(env(stack), MCP_TRANSPORT="streamable-http", MCP_PORT=str(port), **upstream_env)
        proc = subprocess.Popen([python, "-m", "agentcube.mcp_server", *argv],
                                env=environ, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
                return proc, port
            except requests.RequestException:
                time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            raise AssertionError(f"agentcube-mcp --http did not answer on port {port} within 60 s")
    raise AssertionError(f"agentcube-mcp --http exited three times (last exit code {proc.returncode})")


async def _run_code_over_http(url: str, token: str) -> str:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        async with streamable_http_client(url, http_client=http) as (read, write, *_):
            async with ClientSession(read, write) as session:
                await session.initialize()
                r = await session.call_tool("run_code", {"language": "python", "code": "print(6*7)"})
                await session.call_tool("stop_session", {})
                return str(answer(r)["output"]).strip()


def test_mcp_over_http_needs_its_token(stack, server_python):
    """Anyone reaching the HTTP port drives sandboxes with the server's credentials: with --token every
    request needs it, and off loopback one is generated when not given (the address then takes any
    Host header: FastMCP's DNS-rebinding guard is for loopback, and turned every remote client away)."""
    initialize: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    proc, port = _start_http(stack, "--token", "mcp-s3cret", python=server_python)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        assert requests.post(url, json=initialize, headers=headers, timeout=10).status_code == 401
        wrong = dict(headers, Authorization="Bearer nope")
        assert requests.post(url, json=initialize, headers=wrong, timeout=10).status_code == 401
        assert asyncio.run(_run_code_over_http(url, "mcp-s3cret")) == "42"
    finally:
        proc.terminate()
        proc.wait(10)
    proc, port = _start_http(stack, "--host", "0.0.0.0", python=server_python, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        assert requests.post(url, json=initialize, headers=headers, timeout=10).status_code == 401
        remote = dict(headers, Host=f"agentcube.example:{port}")
        assert requests.post(url, json=initialize, headers=remote, timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    printed = proc.stderr.read() if proc.stderr else ""
    token = printed.split("Authorization: Bearer ", 1)[1].split()[0]
    proc, port = _start_http(stack, "--host", "0.0.0.0", f"--token={token}", python=server_python)
    try:
        assert asyncio.run(_run_code_over_http(f"http://127.0.0.1:{port}/mcp", token)) == "42"
        remote = dict(headers, Host=f"agentcube.example:{port}", Authorization=f"Bearer {token}")
        r = requests.post(f"http://127.0.0.1:{port}/mcp", json=initialize, headers=remote, timeout=10)
        assert r.status_code == 200, (r.status_code, r.text)
    finally:
        proc.terminate()
        proc.wait(10)


def test_mcp_2026_protocol_without_sessions(stack):
    """A client on MCP's 2026-07-28 protocol skips the handshake, and every request is a connection
    of its own (mcp 2 servers only). Over stdio the server still has one client: its calls share
    one sandbox. Over HTTP nothing ties two calls together: each call without a session_id runs in
    a sandbox of its own, which is stopped after it (none is left behind, and no call sees
    another's files)."""
    async def write_then_list(session: ClientSession) -> str:
        await session.discover()
        r = await session.call_tool("write_file", {"remote_path": "m.txt", "content": "modern"})
        assert not r.is_error, r
        return text(await session.call_tool("list_files", {}))

    async def over_stdio() -> None:
        params = StdioServerParameters(command=sys.executable, args=["-m", "agentcube.mcp_server"], env=env(stack))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                assert "m.txt" in await write_then_list(session)
                assert not (await session.call_tool("stop_session", {})).is_error

    asyncio.run(over_stdio())

    async def over_http(session: ClientSession) -> None:
        assert "m.txt" not in await write_then_list(session)

    on_demand_over_http(stack, over_http, "a sandbox outlived its call")


def test_an_mcp_http_session_that_ends_takes_its_sandbox(stack, server_python):
    """A client that leaves without stop_session (its HTTP session deleted as the client closes)
    leaves no sandbox behind."""
    async def leave_without_stopping(session: ClientSession) -> None:
        await session.initialize()
        assert not (await session.call_tool("write_file", {"remote_path": "a", "content": "a"})).is_error

    on_demand_over_http(stack, leave_without_stopping, "the sandbox outlived its MCP session", python=server_python)


def test_mcp_sessions_by_id_outlive_their_calls_and_recover(stack):
    """Upstream's way to keep a sandbox across calls, which a client on the 2026-07-28 protocol over
    HTTP (no MCP session) needs: session_reuse keeps it, the answer's session_id names it later,
    stop_session ends it. A session_id that has gone is replaced once, and the answer says so."""
    async def calls(session: ClientSession) -> None:
        await session.discover()
        first = answer(await session.call_tool(
            "write_file", {"content": "kept", "remote_path": "k.txt", "session_reuse": True}))
        sid = first["session_id"]
        r = answer(await session.call_tool(
            "execute_command", {"command": "cat k.txt", "session_id": sid, "timeout_seconds": 30}))
        assert r["output"] == "kept" and r["session_id"] == sid and "session_recovered" not in r, r
        assert answer(await session.call_tool("stop_session", {"session_id": sid}))["status"] == "stopped"
        r = answer(await session.call_tool("list_files", {"session_id": sid}))
        assert r["session_recovered"] is True and r["previous_session_id"] == sid, r
        assert r["session_id"] != sid and "k.txt" not in json.dumps(r["entries"]), r
        again = answer(await session.call_tool("list_files", {"session_id": r["session_id"]}))
        assert again["session_id"] == r["session_id"] and "session_recovered" not in again, again
        answer(await session.call_tool("stop_session", {"session_id": r["session_id"]}))

    on_demand_over_http(stack, calls, "a sandbox outlived stop_session")


def test_mcp_extras_keep_their_sandbox_by_id(stack):
    """run_cell's variables and a background process outlive their call for a client without an
    MCP session (the 2026-07-28 protocol over HTTP), as upstream's tools' files do: session_reuse
    keeps the sandbox, every answer names it, and later calls name it by that id."""
    async def calls(session: ClientSession) -> None:
        await session.discover()
        first = answer(await session.call_tool("run_cell", {"code": "x = 21", "session_reuse": True}))
        sid = first["session_id"]
        r = answer(await session.call_tool("run_cell", {"code": "x * 2", "session_id": sid, "timeout_seconds": 30}))
        assert r["output"] == "42" and r["session_id"] == sid and "session_recovered" not in r, r
        started = answer(await session.call_tool("start_process", {"command": "echo up; exec sleep 60",
                                                                   "session_id": sid}))
        assert started["session_id"] == sid, started
        pid = started["process_id"]
        out = answer(await session.call_tool("process_output", {"process_id": pid, "session_id": sid}))
        assert out["session_id"] == sid and out["exit_code"] is None, out
        stopped = answer(await session.call_tool("stop_process", {"process_id": pid, "session_id": sid}))
        assert stopped == {"session_id": sid, "process_id": pid, "status": "stopped"}, stopped
        out = await finished(session, pid, sid)
        assert out["output"] == "up\n" and out["exit_code"] != 0, out
        assert answer(await session.call_tool("stop_session", {"session_id": sid}))["status"] == "stopped"

    on_demand_over_http(stack, calls, "a sandbox outlived stop_session")


def test_mcp_runs_as_upstreams_server_is_configured(stack):
    """An MCP client configured for upstream's server (its variables, no flags) runs this one:
    streamable HTTP on MCP_PORT, sandboxes of CODE_INTERPRETER_NAME living
    CODE_INTERPRETER_SESSION_TTL seconds."""
    proc, port = _start_http(stack, upstream_env={"CODE_INTERPRETER_NAME": "on-demand-interpreter",
                                                  "CODE_INTERPRETER_SESSION_TTL": "600"})
    try:
        async def call() -> str:
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write, *_):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    r = answer(await session.call_tool("execute_command", {"command": "hostname", "session_reuse": True}))
                    return str(r["session_id"])

        sid = asyncio.run(call())
        record = requests.get(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}", timeout=10).json()
        assert record["name"].startswith("on-demand-interpreter-"), record  # its sandbox's name
        seconds = lambda t: datetime.strptime(t[:19], "%Y-%m-%dT%H:%M:%S")  # noqa: E731
        lived = seconds(record["expiresAt"]) - seconds(record["createdAt"])
        assert abs(lived.total_seconds() - 600) < 5, record
        requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}", timeout=30)
    finally:
        proc.terminate()
        proc.wait(10)


def test_mcp_on_loopback_refuses_other_host_names(stack, server_python):
    """Without a token on loopback, a web page could drive the server through DNS rebinding (its
    own name resolved to 127.0.0.1, so the browser sends that name as Host): only loopback names
    are served."""
    initialize: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                  "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                             "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    proc, port = _start_http(stack, python=server_python)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for host in (f"rebound.example:{port}", "rebound.example"):
            r = requests.post(url, json=initialize, headers=dict(headers, Host=host), timeout=10)
            assert r.status_code in (403, 421), (host, r.status_code, r.text)
        r = requests.post(url, json=initialize, headers=dict(headers, Origin="http://rebound.example"), timeout=10)
        assert r.status_code in (403, 421), (r.status_code, r.text)
        r = requests.post(url, json=initialize, headers=headers, timeout=10)
        assert r.status_code == 200, (r.status_code, r.text)
    finally:
        proc.terminate()
        proc.wait(10)
