"""Attacks on the trust boundaries, made the way an attacker would: from code running inside a
real sandbox, reached through the Router (or with raw sockets), against the running stack."""

import base64
import concurrent.futures
import json
import os
import re
import socket
import threading
import time

import pytest
import requests

from conftest import CANARY

CI = "on-demand-interpreter"


def url(stack, name, path, kind="code-interpreters"):
    return f"{stack.router_url}/v1/namespaces/default/{kind}/{name}/invocations/{path}"


class Session:
    """A CodeInterpreter session created at the Workload Manager, used through the Router."""

    def __init__(self, stack, name=CI):
        self.stack, self.name = stack, name
        r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json={"name": name, "namespace": "default"})
        assert r.status_code == 200, r.text
        self.created = r.json()
        self.id = self.created["sessionId"]
        self.http = requests.Session()
        self.http.headers["x-agentcube-session-id"] = self.id

    def sh(self, script, timeout="60s"):
        r = self.http.post(url(self.stack, self.name, "api/execute"), json={"command": ["sh", "-c", script], "timeout": timeout})
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, path, **kw):
        return self.http.get(url(self.stack, self.name, path), **kw)

    def close(self):
        requests.delete(f"{self.stack.wm_url}/v1/code-interpreter/sessions/{self.id}")


@pytest.fixture
def session(stack):
    s = Session(stack)
    yield s
    s.close()


def local_only(stack):
    if stack.backend != "local":
        pytest.skip("local-backend boundary (a cluster's pods are isolated by the cluster)")


def raw_http(endpoint, method, path, token, body=None):
    """One request to a sandbox entry point (`unix:/path` or `host:port`), bypassing the Router."""
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    if endpoint.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(endpoint[len("unix:"):])
    else:
        host, port = endpoint.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    with s:
        s.sendall(head.encode() + data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return int(out.split(b" ", 2)[1])


def test_a_token_captured_by_an_agent_opens_no_other_sandbox(stack):
    # A hostile agent receives the Router's token on every request...
    r = requests.get(url(stack, "header-echo", "", kind="agent-runtimes"))
    assert r.status_code == 200, r.text
    auth = {k.lower(): v for k, v in r.json()}["authorization"]
    assert auth.startswith("Bearer ")
    captured = auth.split(" ", 1)[1]
    claims = json.loads(base64.urlsafe_b64decode(captured.split(".")[1] + "=="))
    assert claims["iss"] == "agentcube-router" and claims.get("aud"), claims
    # ...and replays it against another session's PicoD, straight at its entry point.
    victim = Session(stack)
    try:
        endpoint = victim.created["entryPoints"][0]["endpoint"]
        assert raw_http(endpoint, "POST", "/api/execute", captured, {"command": ["id"]}) == 401
        # The Router's own token for the victim still works (the refusal is the binding).
        assert victim.sh("echo ok")["stdout"] == "ok\n"
    finally:
        victim.close()
        requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{r.headers['x-agentcube-session-id']}")


def fast_requests(stack):
    """The Router's fast-lane request count (`agentcube up` only), or None."""
    metrics_url = getattr(stack, "metrics_url", None)
    if metrics_url is None:
        return None
    text = requests.get(metrics_url, timeout=5).text
    m = re.search(r"^agentcube_router_http1_fast_requests_total (\d+)", text, re.M)
    assert m, text
    return int(m.group(1))


def through_router(stack, data):
    """`data` sent to the Router over a raw socket; everything it answers until it closes."""
    host, port = stack.router_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def spoofing_request(sid, connection):
    """A raw request to the header-echo agent with every header the Router owns spoofed (`Host` a
    loopback name: `agentcube up` on loopback refuses other names, see test_auth.py)."""
    return (f"GET /v1/namespaces/default/agent-runtimes/header-echo/invocations/ HTTP/1.1\r\n"
            f"Host: spoofed.localhost\r\nx-AgentCube-Session-Id: {sid}\r\n"
            "AUTHORIZATION: Bearer forged\r\nauthorization: Bearer forged-too\r\n"
            "X-Forwarded-For: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7\r\nX-FORWARDED-HOST: evil\r\n"
            "x-forwarded-proto: gopher\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
            f"Keep-Alive: timeout=5\r\nConnection: {connection}\r\nclose: smuggled\r\n"
            "X-Drop: secret\r\nX-Kept: yes\r\n\r\n").encode()


def test_spoofed_headers_never_reach_an_agent(stack):
    # A client (raw socket) sends the headers the Router owns spoofed, repeated and in mixed
    # case, hop-by-hop ones and fields its `Connection` names; the agent (real sandbox code)
    # reports every field it received. Once as a plain request the Router forwards from its own
    # bytes (its HTTP/1.1 fast lane), once with a `Connection` the lane leaves to hyper.
    r = requests.get(url(stack, "header-echo", "", kind="agent-runtimes"))
    assert r.status_code == 200, r.text
    sid = r.headers["x-agentcube-session-id"]
    try:
        for connection, lane in (("close", True), ("close, x-drop", False)):
            before = fast_requests(stack)
            out = through_router(stack, spoofing_request(sid, connection))
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), out
            got = [(k.lower(), v) for k, v in json.loads(body)]
            names = [k for k, _ in got]
            values = dict(got)
            for name in ("authorization", "host", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"):
                assert names.count(name) == 1, (name, got)
            token = values["authorization"].removeprefix("Bearer ")
            claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            assert (claims["iss"], claims["session_id"]) == ("agentcube-router", sid), claims
            assert values["host"] != "spoofed.localhost", got
            assert values["x-forwarded-for"].startswith("6.6.6.6, ") and "7.7.7.7" not in values["x-forwarded-for"], got
            assert values["x-forwarded-host"] == "spoofed.localhost", got
            assert values["x-forwarded-proto"] == "http", got
            for gone in ("proxy-authorization", "te", "keep-alive", "close", "connection"):
                assert gone not in names, (gone, got)
            assert values["x-kept"] == "yes", got
            # `x-drop` is named by `Connection` only on the second request.
            assert ("x-drop" in names) == lane, got
            after = fast_requests(stack)
            if before is not None:
                assert after - before == (1 if lane else 0), (connection, before, after)
    finally:
        requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{sid}")


def test_a_planted_socket_symlink_sends_nothing_to_the_host(stack, session, scratch):
    local_only(stack)
    received = []
    path = str(scratch("agentcube-host-") / "host-daemon.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(64)

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            received.append(conn.recv(65536))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    out = session.sh(f"rm -f /run/agentcube/picod.sock && ln -s {path} /run/agentcube/picod.sock && echo planted")
    assert out["stdout"] == "planted\n", out
    # Many requests at once make the Router open new upstream connections.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: session.http.post(url(stack, CI, "api/execute"), json={"command": ["echo", str(i)]}), range(48)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    assert sorted(r.json()["stdout"] for r in results) == sorted(f"{i}\n" for i in range(48))
    server.close()
    assert received == [], "the host socket received the Router's request"


def test_the_managers_environment_and_state_stay_outside(stack, session):
    local_only(stack)
    out = session.sh("cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'")
    assert CANARY not in out["stdout"], "a variable of `agentcube up` reached the sandbox"
    assert str(stack.state_dir) not in out["stdout"], "host state paths are visible inside"


def test_the_run_directory_is_no_way_onto_the_hosts_disk(stack):
    """`/run/agentcube` is the one host directory a sandbox writes outside its workspace (PicoD
    binds its sockets there). On the state directory's disk a sandbox filled it past its workspace
    quota, and a deep enough tree there aborted the manager when the sandbox ended; as root it is
    a tmpfs of 64 KiB and 1024 inodes of its own, gone with the sandbox."""
    local_only(stack)
    if os.geteuid() != 0:
        pytest.skip("a tmpfs per sandbox needs a root manager")
    session = Session(stack)
    name = session.created["sandboxName"]
    out = session.sh("head -c 1048576 /dev/zero > /run/agentcube/fill; echo rc=$?; df -k /run/agentcube | tail -1; "
                     "cd /run/agentcube && i=0; while [ $i -lt 5000 ] && mkdir d 2>/dev/null && cd d; do i=$((i+1)); done; "
                     "echo depth=$i")["stdout"]
    assert "rc=1" in out, out
    size_kb = int(out.split("\n")[1].split()[1])
    assert size_kb <= 64, out
    depth = int(out.rsplit("depth=", 1)[1])
    assert 0 < depth < 1024, out

    def mounts_of_the_sandbox() -> list:
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if f"/{name}/" in line and str(stack.state_dir) in line]

    assert len(mounts_of_the_sandbox()) == 2, "its tmpfs and the bind of its run/"
    session.close()
    deadline = time.time() + 20
    while (mounts_of_the_sandbox() or name in stack.sandboxes()) and time.time() < deadline:
        time.sleep(0.2)
    assert not mounts_of_the_sandbox() and name not in stack.sandboxes()


def test_no_nested_user_namespace_and_a_seccomp_filter(stack, session):
    local_only(stack)
    out = session.sh("grep '^Seccomp:' /proc/self/status; unshare -Ur true 2>&1; echo rc=$?")
    assert "Seccomp:\t2" in out["stdout"], out
    assert "Operation not permitted" in out["stdout"] and "rc=0" not in out["stdout"], out


RACE = r"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('/tmp/outside', exist_ok=True)
open('/tmp/outside/secret', 'w').write('ESCAPED')
os.makedirs('real', exist_ok=True)
open('real/secret', 'w').write('inside')
if not os.path.islink('lnk'):
    os.symlink('/tmp/outside', 'lnk')
end = time.time() + float(os.environ['RACE_SECS'])
while time.time() < end:
    # RENAME_EXCHANGE: `real` and `lnk` swap atomically, again and again.
    libc.renameat2(-100, b'real', -100, b'lnk', 2)
"""


def test_the_workspace_jail_survives_a_rename_race(stack, session):
    secs = 20
    session.http.post(url(stack, CI, "api/files"), json={"path": "race.py", "content": base64.b64encode(RACE.encode()).decode()}).raise_for_status()
    session.sh(f"RACE_SECS={secs + 5} nohup python3 race.py >/dev/null 2>&1 &")
    time.sleep(0.5)
    seen: dict[str | int, int] = {}
    end, n = time.time() + secs, 0
    while time.time() < end:
        n += 1
        for p in ("real/secret", "lnk/secret"):
            r = session.get(f"api/files/{p}")
            key = r.text if r.status_code == 200 else r.status_code
            seen[key] = seen.get(key, 0) + 1
        if n % 10 == 0:
            session.http.post(url(stack, CI, "api/files"), json={"path": f"real/up{n}", "content": "eA=="})
    assert "ESCAPED" not in seen, f"downloads returned a file outside the workspace: {seen}"
    assert seen.get("inside", 0) > 0, seen
    leaked = session.sh("ls /tmp/outside")["stdout"].split()
    assert leaked == ["secret"], f"uploads created files outside the workspace: {leaked}"


def test_fifos_do_not_wedge_picod(stack, session):
    session.sh("mkfifo f")

    def fetch(_):
        return session.get("api/files/f", timeout=10).status_code

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(fetch, range(500)))
    assert set(codes) == {400}, codes
    assert time.time() - started < 60
    out = session.sh("echo alive")
    assert out["stdout"] == "alive\n"


def test_an_agent_cannot_forge_the_fields_of_its_answers(stack):
    # The agent (real sandbox code) answers with the session header set twice to other ids,
    # hop-by-hop fields, a field its `Connection` names and the mark of the Router's own errors
    # (which would pass its answers off as the Router's to clients). The client creating the session must
    # get the Router's id (one that works), and every answer just that id and the agent's own
    # fields: once relayed from the answer's bytes (a plain request, the fast lane), once through
    # a header map (a request the lane leaves to hyper).
    r = requests.get(url(stack, "answer-smuggler", "spoof", kind="agent-runtimes"))
    assert (r.status_code, r.text) == (200, "real"), r.text
    sid = r.headers["x-agentcube-session-id"]
    assert sid not in ("someone-else", "s2") and "," not in sid, sid
    assert "x-agentcube-error" not in r.headers, r.headers
    path = "/v1/namespaces/default/agent-runtimes/answer-smuggler/invocations/spoof"
    try:
        for connection, lane in (("close", True), ("close, x-drop", False)):
            before = fast_requests(stack)
            out = through_router(stack, (f"GET {path} HTTP/1.1\r\nHost: r.localhost\r\n"
                                         f"x-agentcube-session-id: {sid}\r\nConnection: {connection}\r\n\r\n").encode())
            head, _, body = out.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0].startswith("HTTP/1.1 200 ") and body == b"real", out
            fields = [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
            names = [k for k, _ in fields]
            assert [v for k, v in fields if k == "x-agentcube-session-id"] == [sid], fields
            for gone in ("x-secret", "keep-alive", "proxy-authenticate", "upgrade", "trailer", "x-agentcube-error"):
                assert gone not in names, (gone, fields)
            assert ("x-agent", "yes") in fields and names.count("content-length") == 1, fields
            after = fast_requests(stack)
            if before is not None:
                assert after - before == (1 if lane else 0), (connection, before, after)
        # The id the client was given is a working session.
        r = requests.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"),
                         headers={"x-agentcube-session-id": sid})
        assert (r.status_code, r.text) == (200, "real"), r.text
    finally:
        requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{sid}")


def test_an_agent_that_refuses_an_upload_unread_is_heard(stack):
    # The agent (real sandbox code) answers 413 to an upload as soon as it has the head and
    # closes with the body unread, so its kernel resets the connection while the Router is still
    # sending: the client gets the agent's 413, not "sandbox unreachable", on both upstream paths
    # (a known length read first, and a stream of unknown length through hyper's client).
    r = requests.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"))
    assert (r.status_code, r.text) == (200, "real"), r.text
    sid = r.headers["x-agentcube-session-id"]
    try:
        big = b"u" * (40 << 20)
        streamed = (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))
        for name, body in (("40 MiB, known length", big), ("40 MiB, streamed", streamed)):
            r = requests.post(url(stack, "answer-smuggler", "refuse", kind="agent-runtimes"), data=body,
                              headers={"x-agentcube-session-id": sid}, timeout=60)
            assert (r.status_code, r.text, r.headers.get("x-agentcube-error")) == (413, "too large", None), \
                (name, r.status_code, r.text)
        r = requests.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"),
                         headers={"x-agentcube-session-id": sid})
        assert (r.status_code, r.text) == (200, "real"), r.text
    finally:
        requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{sid}")


def test_an_agents_crafted_answers_reach_no_other_request(stack):
    # The agent (real sandbox code) appends an unasked-for second response to its answer: the
    # Router must not keep that connection, so the next request never reads "evil".
    http = requests.Session()
    r = http.get(url(stack, "answer-smuggler", "plant", kind="agent-runtimes"))
    assert (r.status_code, r.text) == (200, "ok"), r.text
    http.headers["x-agentcube-session-id"] = r.headers["x-agentcube-session-id"]
    try:
        for _ in range(5):
            r = http.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"))
            assert (r.status_code, r.text) == (200, "real"), r.text
            r = http.get(url(stack, "answer-smuggler", "plant", kind="agent-runtimes"))
            assert (r.status_code, r.text) == (200, "ok"), r.text
        # Ambiguous framing (Content-Length with Transfer-Encoding) is the Router's 503.
        r = http.get(url(stack, "answer-smuggler", "both", kind="agent-runtimes"))
        assert r.status_code == 503 and r.headers.get("x-agentcube-error") == "router", (r.status_code, r.text)
        r = http.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"))
        assert (r.status_code, r.text) == (200, "real"), r.text
        # The same answers, and a 101 nobody asked for, to requests whose bodies stream (chunked:
        # sent on a connection of their own through hyper's client, not the pooled one).
        for path in ("both", "switch"):
            streamed = (part for part in (b"upload ", b"in ", b"pieces"))
            r = http.post(url(stack, "answer-smuggler", path, kind="agent-runtimes"), data=streamed)
            assert r.status_code == 503 and r.headers.get("x-agentcube-error") == "router", (path, r.status_code, r.text)
            r = http.get(url(stack, "answer-smuggler", "switch", kind="agent-runtimes"))
            assert r.status_code == 503 and r.headers.get("x-agentcube-error") == "router", (r.status_code, r.text)
            r = http.get(url(stack, "answer-smuggler", "next", kind="agent-runtimes"))
            assert (r.status_code, r.text) == (200, "real"), r.text
    finally:
        requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{http.headers['x-agentcube-session-id']}")
