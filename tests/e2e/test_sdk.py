"""Upstream's SDK scenarios (spec §7.4) against the embedded default, with this repo's SDK."""

import hashlib
import json
import os
import socket
import subprocess
import time
from typing import Any

import pytest
import requests

from agentcube import (CodeInterpreterClient, CommandExecutionError, DataPlaneError, Execution,
                       ExecutionError, SessionError, SessionNotFoundError)
from conftest import _free_port

def _error(ex: Execution) -> ExecutionError:
    """The cell's error, which the test expects there to be."""
    assert ex.error is not None, ex
    return ex.error


FIB = """
import json
a, b, seq = 0, 1, []
for _ in range(10):
    seq.append(a)
    a, b = b, a + b
with open("fibonacci.json", "w") as f:
    json.dump(seq, f)
print("written")
"""


def test_run_code_prints(stack):
    with CodeInterpreterClient(name="on-demand-interpreter") as c:
        assert "2" in c.run_code("python", "print(1+1)")
        assert c.run_code("bash", "echo $((6*7))").strip() == "42"


def test_each_run_code_is_a_fresh_process(stack):
    with CodeInterpreterClient() as c:
        c.run_code("python", "x = 41")
        with pytest.raises(CommandExecutionError) as e:
            c.run_code("python", "print(x + 1)")
        assert "NameError" in e.value.stderr


def test_files_round_trip(stack, tmp_path):
    with CodeInterpreterClient() as c:
        c.write_file(FIB, "generate_fib.py")
        assert "written" in c.execute_command("python3 generate_fib.py")
        c.download_file("fibonacci.json", str(tmp_path / "out/fib.json"))
        assert json.loads((tmp_path / "out/fib.json").read_text()) == [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]
        names = {f["name"] for f in c.list_files(".")}
        assert {"generate_fib.py", "fibonacci.json"} <= names
        blob = bytes(range(256)) * 300
        (tmp_path / "blob.bin").write_bytes(blob)
        c.upload_file(str(tmp_path / "blob.bin"), "data/blob.bin")
        c.download_file("/data/blob.bin", str(tmp_path / "back.bin"))
        assert (tmp_path / "back.bin").read_bytes() == blob
        assert c.execute_command(["sha256sum", "data/blob.bin"]).split()[0] == hashlib.sha256(blob).hexdigest()
        # Names with URL syntax in them come back as themselves (the download's path is a URL's).
        for name in ("a#b.txt", "100%.txt", "q?x=1.txt", "sp ace.txt", "dir/./d.txt"):
            c.write_file(f"content of {name}", name.replace("/./", "/"))
            c.download_file(name, str(tmp_path / "named"))
            assert (tmp_path / "named").read_text() == f"content of {name}", name
        # Dot segments reach PicoD's file API, whose jail refuses the escape (a client resolving them
        # would have asked the Router for another path).
        with pytest.raises(DataPlaneError) as escape:
            c.download_file("../../etc/hostname", str(tmp_path / "escape"))
        assert escape.value.status_code == 403, escape.value


def test_an_upload_over_the_limit_is_a_413_not_a_reset(stack, tmp_path):
    """PicoD answers 413 as soon as it sees the length, while the client is still sending a
    multipart body as upstream's SDK does: the answer must reach it through the Router (servers
    close lingering), and the session go on."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(40 * 1024 * 1024)
    with CodeInterpreterClient() as c, open(big, "rb") as f:
        url = f"{stack.router_url}/v1/namespaces/default/code-interpreters/my-interpreter/invocations/api/files"
        resp = requests.post(url, files={"file": ("big.bin", f)}, data={"path": "big.bin"},
                             headers={"x-agentcube-session-id": c.session_id or ""}, timeout=60)
        assert resp.status_code == 413, resp.text
        assert resp.json() == {"error": "request body too large", "detail": "maximum allowed size is 33554432 bytes"}
        assert c.execute_command(["ls", "-a"]).split() == [".", ".."]


def _cut_upload(router_url: str, session_id: str, path: str) -> None:
    """Starts a 10 MB streamed upload to ``path`` through the Router and hangs up after 1 MB."""
    from urllib.parse import quote, urlsplit
    u = urlsplit(router_url)
    with socket.create_connection((u.hostname, u.port or 80)) as s:
        s.sendall((f"POST /v1/namespaces/default/code-interpreters/my-interpreter/invocations/api/files"
                   f"?path={quote(path, safe='')} HTTP/1.1\r\nHost: {u.netloc}\r\n"
                   f"x-agentcube-session-id: {session_id}\r\ncontent-type: application/octet-stream\r\n"
                   "content-length: 10000000\r\n\r\n").encode() + b"z" * 1_000_000)
        time.sleep(0.5)
    time.sleep(0.5)


def test_files_past_the_body_limit_are_streamed(stack, tmp_path):
    """The SDK streams uploads too big for one upstream request body; PicoD writes them to disk
    as they come."""
    data = os.urandom(1 << 20) * 40
    (tmp_path / "big.bin").write_bytes(data)
    with CodeInterpreterClient() as c:
        c.upload_file(str(tmp_path / "big.bin"), "data/big.bin")
        assert c.execute_command(["sha256sum", "data/big.bin"]).split()[0] == hashlib.sha256(data).hexdigest()
        c.download_file("data/big.bin", str(tmp_path / "back.bin"))
        assert (tmp_path / "back.bin").read_bytes() == data
        # A client that goes away mid-upload changes nothing.
        _cut_upload(stack.router_url, c.session_id or "", "data/big.bin")
        assert c.execute_command(["sha256sum", "data/big.bin"]).split()[0] == hashlib.sha256(data).hexdigest()
        text = "line of text\n" * (30 * 1024 * 1024 // 13)
        c.write_file(text, "text.txt")
        assert int(c.execute_command(["stat", "-c", "%s", "text.txt"])) == len(text)
        assert sorted(f["name"] for f in c.list_files("data")) == ["big.bin"], "no staging file left"


def test_command_results_and_failures(stack):
    with CodeInterpreterClient() as c:
        assert c.execute_command(["echo", "Hello, World!"]) == "Hello, World!\n"
        r = c.execute_command_result(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert r == {"stdout": "out\n", "stderr": "err\n", "exit_code": 3}
        with pytest.raises(CommandExecutionError) as e:
            c.execute_command(["sh", "-c", "exit 1"])
        assert e.value.exit_code == 1


def test_streaming_output_to_a_callback(stack):
    seen = []
    with CodeInterpreterClient() as c:
        out = c.execute_command(["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.2; done"], on_output=lambda s, t: seen.append((s, t)))
    assert out == "line1\nline2\nline3\n"
    assert len(seen) >= 2, f"output should arrive in several chunks: {seen}"
    assert all(s == "stdout" for s, _ in seen)


def test_run_code_streams_python_output_as_it_is_printed(stack):
    seen = []
    with CodeInterpreterClient() as c:
        code = "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.3)\n"
        out = c.run_code("python", code, on_output=lambda s, t: seen.append(t))
    assert out == "tick 0\ntick 1\ntick 2\n"
    assert len(seen) >= 2, f"Python's output should arrive line by line, not at exit: {seen}"


def test_stop_deletes_the_session(stack):
    c = CodeInterpreterClient()
    sid = c.session_id
    c.execute_command("true")
    again = CodeInterpreterClient(session_id=sid)  # attached while it exists
    c.stop()
    # A Router may route a session it resolved within its cache TTL (--session-cache-ttl-ms, 1 s)
    # while the sandbox is still terminating (a pod's grace period on Kubernetes); not after.
    time.sleep(1.2)
    with pytest.raises(SessionNotFoundError) as e:
        again.execute_command("true")
    assert e.value.status_code == 404
    assert f"session {sid} has ended: it was deleted (DELETE on the Workload Manager's sessions API)" in str(e.value)
    assert isinstance(e.value, SessionError) and isinstance(e.value, requests.HTTPError)
    assert again.session_id is None, "the stale id is forgotten"
    with pytest.raises(SessionNotFoundError):
        again.execute_command("true")  # still gone: no new session behind the caller's back
    r = requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}")
    assert r.status_code == 404
    assert r.json() == {"message": f"Session ID {sid} not found, maybe already deleted"}


def test_session_reuse_by_id(stack):
    with CodeInterpreterClient() as c:
        c.write_file("kept", "state.txt")
        other = CodeInterpreterClient(session_id=c.session_id)
        assert other.execute_command("cat state.txt") == "kept"
        # Attaching makes no Workload Manager call (as upstream): a client that reaches only
        # the Router works.
        unreachable = f"http://127.0.0.1:{_free_port()}"
        router_only = CodeInterpreterClient(session_id=c.session_id, workload_manager_url=unreachable)
        assert router_only.execute_command("cat state.txt") == "kept"


def test_sessions_are_read_at_the_workload_manager_and_listed_only_by_authenticated_callers(stack):
    """Without caller authentication (this stack) a session's id is its only key, so listing is a
    403 with the reason; reading one session by its id works. Listing with a token:
    test_auth.py."""
    from agentcube.clients.control_plane import ControlPlaneClient

    cp = ControlPlaneClient()
    with CodeInterpreterClient() as a:
        sid = a.session_id
        assert sid is not None
        with pytest.raises(SessionError) as refused:
            cp.list_sessions()
        assert refused.value.status_code == 403, refused.value
        assert "listing sessions needs caller authentication" in str(refused.value)
        assert sid not in str(refused.value)
        rec = cp.get_session(sid)
        assert rec["sessionId"] == sid and rec["status"] == "ready", rec
        assert rec["workloadName"] == "my-interpreter"
        with pytest.raises(SessionNotFoundError):
            cp.get_session(sid, kind="agent-runtime")  # the other kind: not found
        # An id is one path segment (the MCP server's model picks ids): dot segments do not make a
        # read or delete of one kind reach the other's.
        sneaky = f"../../code-interpreter/sessions/{sid}"
        with pytest.raises(SessionNotFoundError):
            cp.get_session(sneaky, kind="agent-runtime")
        cp.delete_session(sneaky, kind="agent-runtime")
        assert cp.get_session(sid)["status"] == "ready"
    with pytest.raises(SessionNotFoundError) as e:
        cp.get_session(sid)
    assert e.value.status_code == 404
    # Attaching makes no call (as upstream's SDK); a session that does not exist any more is
    # SessionNotFoundError at the first call, with the reason — once the Router's session cache
    # (1 s) no longer routes it to its terminating sandbox (a pod's grace period on Kubernetes).
    gone = CodeInterpreterClient(session_id=sid)
    time.sleep(1.2)
    with pytest.raises(SessionNotFoundError) as why:
        gone.execute_command("true")
    assert f"session {sid} has ended: it was deleted" in str(why.value)
    gone.stop()
    with pytest.raises(ValueError):
        cp.list_sessions("sandboxes")
    cp.close()


def test_background_processes_with_the_sdk(stack):
    with CodeInterpreterClient() as c:
        p = c.start_process(["sh", "-c", "echo ready; read name; echo hello $name; echo warn >&2"])
        first = [ch.data for ch in p.output()]  # what is there now, without waiting
        assert first in ([], ["ready\n"]), first
        p.write_stdin("agent\n")
        chunks = list(p.output(follow=True))
        text = "".join(ch.data for ch in chunks if ch.stream == "stdout")
        assert "hello agent\n" in text and p.exit_code == 0, chunks
        assert any(ch.stream == "stderr" and ch.data == "warn\n" for ch in chunks)
        # Another client of the same session attaches and reads everything from the start.
        other = CodeInterpreterClient(session_id=c.session_id)
        again = other.attach_process(p.id)
        assert "".join(ch.data for ch in again.output(since=0) if ch.stream == "stdout") == "ready\nhello agent\n"
        assert again.exit_code == 0
        # Waiting leaves the output unread: it is all there afterwards.
        quick = c.start_process(["sh", "-c", "echo one; sleep 0.2; echo two >&2"])
        assert quick.wait(timeout=10) == 0
        assert [(ch.stream, ch.data) for ch in quick.output()] == [("stdout", "one\n"), ("stderr", "two\n")]
        long = c.start_process(["sleep", "60"])
        assert any(i["id"] == long.id and i["running"] for i in c.list_processes())
        with pytest.raises(TimeoutError):
            long.wait(timeout=0.3)
        long.kill()
        assert long.wait() == -1


def test_stateful_contexts_with_the_sdk(stack, tmp_path):
    with CodeInterpreterClient() as c:
        ctx = c.create_context("python")
        assert c.run_code("python", "x = 6", context=ctx) == ""
        ex = c.run_cell("x * 7", context=ctx)
        assert ex.error is None and ex.results[0].text == "42" and ex.execution_count == 2, ex
        # Another client attached to the same session sees the same context.
        other = CodeInterpreterClient(session_id=c.session_id)
        assert [k.id for k in other.list_contexts()] == [ctx.id]
        assert other.run_cell("x", context=ctx).results[0].text == "6"
        # Errors come back as data; run_code raises as it always did.
        assert _error(c.run_cell("nope", context=ctx)).name == "NameError"
        with pytest.raises(CommandExecutionError):
            c.run_code("python", "nope", context=ctx)
        # A timeout interrupts the cell and keeps the state; restart clears it.
        ex = c.run_cell("import time\nwhile True: time.sleep(0.1)", context=ctx, timeout=1)
        assert _error(ex).name == "TimeoutError"
        assert c.run_cell("x", context=ctx).results[0].text == "6"
        # A plot comes back as a PNG.
        ex = c.run_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nNone", context=ctx, timeout=60)
        assert ex.error is None, ex
        png = [r for r in ex.results if r.png]
        assert png and (png[0].png or b"")[:8] == b"\x89PNG\r\n\x1a\n"
        png[0].save(str(tmp_path / "plot.png"))
        assert (tmp_path / "plot.png").stat().st_size > 1000
        c.restart(ctx)
        assert _error(c.run_cell("x", context=ctx)).name == "NameError"
        # bash keeps its directory and variables; each cell has its exit status.
        sh = c.create_context("bash")
        c.run_cell("mkdir -p d && cd d; V=ok", context=sh)
        assert c.run_cell('basename "$PWD"; echo $V', context=sh).stdout == "d\nok\n"
        assert c.run_cell("false", context=sh).exit_code == 1
        # Deleting a context works through the Router (which routes GET and POST only).
        c.delete_context(sh)
        assert [k.id for k in c.list_contexts()] == [ctx.id]
        with pytest.raises(DataPlaneError) as gone:
            c.run_cell("true", context=sh)
        assert gone.value.status_code == 404
        # Upstream's run_code stays stateless.
        assert "NameError" in str(pytest.raises(CommandExecutionError, c.run_code, "python", "print(x)").value)


def test_langchain_tools_over_a_persistent_context(stack):
    from agentcube.langchain import python_tool, shell_tool

    with CodeInterpreterClient() as c:
        py, sh = python_tool(c), shell_tool(c)
        assert py.name == "python" and "persistent" in py.description
        assert py.invoke({"code": "total = sum(range(10))"}) == "(no output)"
        assert py.invoke({"code": "print('sum'); total * 2"}) == "sum\n90"
        assert "NameError" in py.invoke({"code": "missing"})
        out = sh.invoke({"command": "echo hi; echo oops >&2; exit 3"})
        assert out.startswith("hi\n") and "oops" in out and "[exit code 3]" in out, out


def test_interrupt_keeps_state_and_processes_die_with_the_sandbox(stack):
    import subprocess
    import threading

    c = CodeInterpreterClient()
    ctx = c.create_context("python")
    c.run_cell("kept = 'yes'", context=ctx)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(ex=c.run_cell("import time\nwhile True: time.sleep(0.05)", context=ctx)))
    t.start()
    time.sleep(1.0)
    c.interrupt(ctx)
    t.join(30)
    assert _error(box["ex"]).name == "KeyboardInterrupt", box
    assert c.run_cell("kept", context=ctx).results[0].text == "'yes'"
    # A background process ends with its sandbox (host processes: both test backends run
    # sandboxes as processes of this machine).
    if stack.backend not in ("local", "kube") and getattr(stack, "audit_log", None) is None:
        c.stop()
        return  # a remote cluster: its processes are not visible here
    marker = f"{300 + (os.getpid() % 1000) / 1000:.3f}"
    c.start_process(["sleep", marker])
    time.sleep(0.3)
    assert subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).returncode == 0
    c.stop()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).returncode == 0:
        assert time.time() < deadline, "the process outlived its sandbox"
        time.sleep(0.2)


def test_kill_all_processes_brings_back_a_session_at_its_process_limit(stack):
    """Commands that left processes behind until the sandbox is at its process limit (locally:
    the test cluster's kubelet sets no limit, so there only 20): not even `kill` can start, and
    kill_all_processes() ends them all; the workspace and the session stay."""
    # What the sweep must never reach: a neighbouring sandbox's process, and one of the host's.
    neighbour = CodeInterpreterClient()
    neighbour.execute_command(["sh", "-c", "sleep 300 & echo"])
    host = subprocess.Popen(["sleep", "300"])
    with CodeInterpreterClient() as c:
        c.write_file("kept", "state.txt")
        left = 600 if stack.backend == "local" else 20
        try:
            c.execute_command(["sh", "-c", f"for i in $(seq {left}); do sleep 300 & done"])
        except CommandExecutionError as filled:
            assert stack.backend == "local", filled  # its shell could not fork at the limit
        if stack.backend == "local":
            with pytest.raises(CommandExecutionError) as full:  # three processes where one is free
                c.execute_command(["sh", "-c", "true | true"])
            assert "it is at its process limit" in str(full.value) and "kill_all_processes()" in str(full.value)
            left = 400
        assert c.kill_all_processes() >= left
        assert c.execute_command("cat state.txt") == "kept"
        assert c.execute_command(["sh", "-c", "pgrep -c sleep || true"]).strip() == "0"
    assert host.poll() is None, "a host process was killed"
    assert neighbour.execute_command(["sh", "-c", "pgrep -c sleep || true"]).strip() == "1"
    host.kill()
    host.wait()
    neighbour.stop()
