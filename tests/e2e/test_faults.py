"""Hostile clients and faults against the running binaries (issue 14): HTTP/2 clients to HTTP/1
agents, names that contain path words, bad headers, sandboxes that die, a manager killed with
SIGKILL and restarted on the same Redis, and the session cap."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, _binary, _free_port, _wait_healthy, start_up


def url(stack, ns, kind, name, path):
    return f"{stack.router_url}/v1/namespaces/{ns}/{kind}/{name}/invocations/{path}"


def made_for(stack, name: str, before: set) -> set:
    """The sandboxes of definition `name` that were not there `before` (warm pools may fill at
    the same time)."""
    return {s for s in stack.sandboxes() - before if s.startswith(name + "-")}


def test_an_http2_client_reaches_an_http1_agent_and_leaves_no_orphan(stack):
    before = stack.sandboxes()
    out = subprocess.run(
        ["curl", "-s", "-i", "--http2-prior-knowledge", "-X", "POST", "-H", "Content-Type: application/json",
         "-d", '{"input":"h2"}', url(stack, "default", "agent-runtimes", "echo-agent", "echo")],
        capture_output=True, text=True, timeout=60)
    head, _, body = out.stdout.partition("\n\n")
    assert head.startswith("HTTP/2 200"), out.stdout + out.stderr
    assert '"echo: h2"' in body
    sid = next(l.split(":", 1)[1].strip() for l in head.splitlines() if l.lower().startswith("x-agentcube-session-id"))
    assert made_for(stack, "echo-agent", before), "the session's sandbox runs"
    assert requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{sid}").status_code == 200
    deadline = time.time() + 30
    while made_for(stack, "echo-agent", before) and time.time() < deadline:
        time.sleep(0.2)
    assert not made_for(stack, "echo-agent", before), "a sandbox outlived its session"


def test_a_client_gone_before_its_first_answer_leaves_no_sandbox(stack):
    """A request without a session makes one whose id the client learns from the answer only.
    A client that goes away before it (a timeout, a cancelled call) left that sandbox running,
    unnamed, until its idle timeout; the Router now deletes it."""
    before = stack.sandboxes()
    host, port = stack.router_url.removeprefix("http://").split(":")
    body = b'{"command":["sleep","60"]}'
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"
                  b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 60
        while not made_for(stack, "on-demand-interpreter", before) and time.time() < deadline:
            time.sleep(0.1)
        made = made_for(stack, "on-demand-interpreter", before)
        assert made, "the request made no sandbox"
        time.sleep(1)  # the command runs
    deadline = time.time() + 30
    while stack.sandboxes() & made and time.time() < deadline:
        time.sleep(0.2)
    assert not stack.sandboxes() & made, "the unnamed session's sandbox is still running"


@pytest.mark.parametrize("ns,name", [("default", "invocations-ci"), ("invocations", "ci")])
def test_names_containing_invocations_route(stack, ns, name):
    r = requests.post(url(stack, ns, "code-interpreters", name, "api/execute"), json={"command": ["echo", "routed"]})
    assert r.status_code == 200, r.text
    assert r.json()["stdout"] == "routed\n"
    sid = r.headers["x-agentcube-session-id"]
    # The same session on another runtime's URL: 409, also while it is cached.
    r = requests.post(url(stack, "default", "code-interpreters", "on-demand-interpreter", "api/execute"),
                      json={"command": ["true"]}, headers={"x-agentcube-session-id": sid})
    assert r.status_code == 409 and r.json()["code"] == "SESSION_TARGET_MISMATCH", r.text
    requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}")


def test_a_non_utf8_session_header_is_400(stack):
    host, port = stack.router_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/ HTTP/1.1\r\n"
                  b"Host: localhost\r\nConnection: close\r\nx-agentcube-session-id: \xff\xfe\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"INVALID_SESSION_ID" in answer


def own_cgroup(controller="memory"):
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    return None


def sandbox_processes(state: Path, name: str):
    """Host pids of a sandbox's processes (as root each sandbox has its own uid)."""
    uid = (state / "sandboxes" / name).stat().st_uid
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", "/opt/agentcube/picod"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_sandbox_whose_picod_is_killed_is_reclaimed(stack):
    if stack.backend != "local" or os.geteuid() != 0:
        pytest.skip("local backend as root (a uid per sandbox finds its processes)")
    r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json={"name": "on-demand-interpreter", "namespace": "default"})
    sid, name = r.json()["sessionId"], r.json()["sandboxName"]
    pids = sandbox_processes(stack.state_dir, name)
    assert pids, "PicoD not found"
    os.kill(pids[-1], signal.SIGKILL)
    headers = {"x-agentcube-session-id": sid}
    deadline = time.time() + 20
    while time.time() < deadline:
        r = requests.post(url(stack, "default", "code-interpreters", "on-demand-interpreter", "api/execute"),
                          json={"command": ["true"]}, headers=headers)
        if r.status_code == 404 and name not in stack.sandboxes():
            break
        time.sleep(0.3)
    assert r.status_code == 404, "the dead sandbox's session should be gone"
    assert name not in stack.sandboxes()
    # Whoever uses the session next is told why it ended.
    assert r.json()["reason"] == "its sandbox was killed by signal 9 (SIGKILL)", r.json()


def sandbox_cgroup_processes(cgroups: Path, names: list[str]) -> dict[str, list[str]]:
    """The processes still in each named sandbox's cgroup (those that have one)."""
    left = {}
    for d in cgroups.glob("agentcube/*/*"):
        if d.name in names:
            procs = (d / "cgroup.procs").read_text().split()
            if procs:
                left[d.name] = procs
    return left


@pytest.mark.parametrize("isolation", ["bubblewrap", "gvisor"])
def test_a_killed_manager_leaves_nothing_after_a_restart(stack, redis_url, scratch, isolation):
    if stack.backend != "local":
        pytest.skip("runs its own `agentcube up`")
    if isolation == "gvisor" and (os.geteuid() != 0 or not shutil.which("runsc")):
        pytest.skip("gVisor sandboxes need root and runsc")
    tmp = scratch("agentcube-crash-")
    iso = ["--isolation", isolation]
    proc, wm, router = start_up(tmp, redis_url, "--max-sessions", "3", *iso)
    names, sids = [], []
    for _ in range(3):
        r = requests.post(f"{wm}/v1/code-interpreter", json={"name": "on-demand-interpreter", "namespace": "default"})
        assert r.status_code == 200, r.text
        names.append(r.json()["sandboxName"])
        sids.append(r.json()["sessionId"])
    # The cap: a fourth session is refused, and nothing is created for it.
    r = requests.post(f"{wm}/v1/code-interpreter", json={"name": "on-demand-interpreter", "namespace": "default"})
    assert r.status_code == 429 and "--max-sessions" in r.json()["message"], r.text
    # So is one the Router would make for a request without a session: the client is told why
    # (upstream's Router answers `500 internal server error`).
    invoke = f"{router}/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"
    r = requests.post(invoke, json={"command": ["true"]})
    assert r.status_code == 429 and r.json()["code"] == "SESSION_CREATE_REFUSED", r.text
    assert "--max-sessions" in r.json()["error"], r.text
    cgroups = own_cgroup()
    before = {p.name for p in cgroups.glob("agentcube/*/*")} if cgroups else set()
    assert set(names) <= before or not cgroups, (names, before)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.5)
    if cgroups:
        left = {p.name for p in cgroups.glob("agentcube/*/*")}
        assert set(names) & left, "the crash left cgroups (what the restart must clean)"
        # The sandboxes die with their manager (not only at the next start): nothing of theirs
        # keeps running, or holding memory, while no manager is there to reclaim it.
        deadline = time.monotonic() + 10
        while (running := sandbox_cgroup_processes(cgroups, names)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running, f"sandbox processes outlived their manager: {running}"
    proc, wm, router = start_up(tmp, redis_url, *iso)
    try:
        if cgroups:
            now = {p.name for p in cgroups.glob("agentcube/*/*")}
            assert not set(names) & now, f"cgroups of the crashed run are still there: {set(names) & now}"
        dirs = {p.name for p in (tmp / "state" / "sandboxes").iterdir()}
        assert not set(names) & dirs
        for sid in sids:
            r = requests.post(f"{router}/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute",
                              json={"command": ["true"]}, headers={"x-agentcube-session-id": sid})
            assert r.status_code == 404, f"{sid}: {r.status_code} {r.text}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


@pytest.mark.parametrize("taken", ["router", "wm", "metrics"])
def test_a_port_in_use_stops_the_start_with_nothing_made(stack, scratch, taken):
    """`agentcube up` whose port is taken (another instance runs) stops with the address, before
    it makes a sandbox: it used to fill its warm pool first, and leave the pool's mounts and
    cgroups behind when it then could not listen."""
    if stack.backend != "local":
        pytest.skip("runs its own `agentcube up`")
    tmp = scratch("agentcube-port-")
    state = tmp / "state"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"router": _free_port(), "wm": _free_port(), "metrics": _free_port()}
        ports[taken] = port
        out = subprocess.run([str(_binary("agentcube")), "up", "--manifests", str(REPO / "examples"),
                              "--router-port", str(ports["router"]), "--wm-port", str(ports["wm"]),
                              "--metrics-port", str(ports["metrics"]), "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=120, cwd=REPO,
                             env=dict(os.environ, RUST_BACKTRACE="0"))
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr, out.stderr
    made = list((state / "sandboxes").iterdir()) if (state / "sandboxes").exists() else []
    assert not made, f"sandboxes made before the start failed: {made}"
    mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(state) in line]
    assert not mounts, mounts


def first_session(router: str) -> tuple[str, str]:
    """A session of `on-demand-interpreter` made by the Router for a first `execute`: the
    execute URL and the session's id."""
    invoke = f"{router}/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"
    r = requests.post(invoke, json={"command": ["true"]})
    assert r.status_code == 200, r.text
    return invoke, r.headers["x-agentcube-session-id"]


def test_a_second_platform_on_the_same_store_is_refused(stack, redis_url, scratch):
    """Two `agentcube up` with their own state directories on one Redis: the second's start-up
    reconciliation deleted the first's sessions (records whose sandbox it did not have). It is
    refused at start now, told which manager holds the store, and the first's session lives."""
    if stack.backend != "local":
        pytest.skip("runs its own `agentcube up`")
    tmp = scratch("agentcube-two-")
    proc, wm, router = start_up(tmp, redis_url)
    try:
        invoke, sid = first_session(router)
        other = tmp / "other"
        cgroups = own_cgroup()
        groups_before = {p.name for p in cgroups.glob("agentcube/*")} if cgroups else set()
        out = subprocess.run([str(_binary("agentcube")), "up", "--manifests", str(REPO / "examples"),
                              "--router-port", str(_free_port()), "--wm-port", str(_free_port()),
                              "--metrics-port", "0", "--state-dir", str(other), "--store", redis_url],
                             capture_output=True, text=True, timeout=120, cwd=REPO,
                             env=dict(os.environ, RUST_BACKTRACE="0"))
        assert out.returncode != 0
        assert "the session store is in use by another Workload Manager" in out.stderr, out.stderr
        assert str(tmp / "state") in out.stderr, out.stderr
        made = list((other / "sandboxes").iterdir()) if (other / "sandboxes").exists() else []
        assert not made, made
        # Nor its cgroup directory (the backend made it before the lease refused the start).
        groups_after = {p.name for p in cgroups.glob("agentcube/*")} if cgroups else set()
        assert groups_after == groups_before, groups_after - groups_before
        r = requests.post(invoke, json={"command": ["true"]}, headers={"x-agentcube-session-id": sid})
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_a_platform_that_lost_its_store_stops(stack, redis_url, scratch):
    """An `agentcube up` stalled past its store lease (a suspended laptop) while another platform
    took the store: it went on, and each deleted the other's sessions as stale. It stops now,
    saying why, with its own sandboxes removed and the other's lease left alone. The other
    platform's take-over is written straight into Redis, as its start would write it."""
    if stack.backend != "local":
        pytest.skip("runs its own `agentcube up`")
    tmp = scratch("agentcube-lost-")
    proc, wm, router = start_up(tmp, redis_url)
    try:
        first_session(router)
        assert list((tmp / "state" / "sandboxes").iterdir())
        other = "the local backend of host elsewhere with state directory /var/lib/agentcube"
        key = "session:idx:mark:workload-manager"
        subprocess.run(["redis-cli", "-u", redis_url, "SET", key, other, "EX", "60"], check=True, capture_output=True)
        proc.wait(40)  # the keeper looks every 10 s; then the drain and the teardown
        log = next(tmp.glob("up-*.log")).read_text()
        assert proc.returncode != 0, log
        assert f"another Workload Manager ({other}) took the session store" in log, log
        assert not list((tmp / "state" / "sandboxes").iterdir())
        mark = subprocess.run(["redis-cli", "-u", redis_url, "GET", key], check=True, capture_output=True, text=True)
        assert mark.stdout.strip() == other
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
