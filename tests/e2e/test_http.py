"""Raw HTTP (curl-style) scenarios against the Router and the Workload Manager."""

import json
import threading
import time

import pytest
import requests


def invocations(stack, kind, name, path=""):
    return f"{stack.router_url}/v1/namespaces/default/{kind}/{name}/invocations/{path}"


def test_router_bootstrapped_flow(stack):
    url = invocations(stack, "code-interpreters", "on-demand-interpreter", "api/execute")
    r = requests.post(url, json={"command": ["python3", "-c", "print(1+1)"]})
    assert r.status_code == 200
    sid = r.headers["x-agentcube-session-id"]
    assert r.json()["stdout"] == "2\n"
    r = requests.post(url, json={"command": ["sh", "-c", "echo again"]}, headers={"x-agentcube-session-id": sid})
    assert r.status_code == 200 and r.headers["x-agentcube-session-id"] == sid
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}").status_code == 200


def test_unknown_session_and_runtime(stack):
    r = requests.get(invocations(stack, "code-interpreters", "my-interpreter", "api/files?path=."), headers={"x-agentcube-session-id": "does-not-exist"})
    assert r.status_code == 404
    assert r.json() == {"error": 'sessions.agentcube.volcano.sh "does-not-exist" not found', "code": "SESSION_NOT_FOUND"}
    assert r.headers["x-agentcube-error"] == "router"
    r = requests.post(invocations(stack, "agent-runtimes", "no-such-agent", "echo"), json={"input": "x"})
    assert r.status_code == 404
    assert "not found" in r.text


def test_echo_agent_with_and_without_session(stack):
    url = invocations(stack, "agent-runtimes", "echo-agent", "echo")
    for text in ["Hello, World!", "", "special chars: ü ✓ \"quoted\" <tag>"]:
        r = requests.post(url, json={"input": text})
        assert r.status_code == 200, r.text
        assert r.json()["output"] == f"echo: {text}"
    sid = r.headers["x-agentcube-session-id"]
    r2 = requests.post(url, json={"input": "same"}, headers={"x-agentcube-session-id": sid})
    assert r2.json()["output"] == "echo: same"
    assert r2.json()["metadata"]["instance"] == r.json()["metadata"]["instance"], "same sandbox"
    r3 = requests.post(url, json={"input": "new"})
    assert r3.headers["x-agentcube-session-id"] != sid
    assert r3.json()["metadata"]["instance"] != r.json()["metadata"]["instance"], "a new session, a new sandbox"


def test_an_agent_that_exits_at_start_is_named_by_the_router(stack):
    """A session the Router makes for an agent that exits as it starts: upstream's 500, with the
    Workload Manager's words (which sandbox, its exit status) and code `SANDBOX_FAILED` instead of
    upstream's bare `internal server error`; the agent's output stays in the manager's log."""
    r = requests.post(invocations(stack, "agent-runtimes", "crashing-agent", "run"), json={"input": "x"}, timeout=120)
    assert r.status_code == 500, r.text
    assert r.headers["x-agentcube-error"] == "router"
    assert "x-agentcube-session-id" not in r.headers
    body = r.json()
    assert body["code"] == "SANDBOX_FAILED", body
    assert "crashing-agent-" in body["error"] and "3" in body["error"], body
    assert "OPENAI_API_KEY" not in body["error"], body
    # The SDK raises it as a session it could not get, with the reason.
    from agentcube import AgentRuntimeClient
    from agentcube.exceptions import SessionError

    with pytest.raises(SessionError) as e:
        AgentRuntimeClient("crashing-agent").invoke({"input": "x"})
    assert "could not create a session (HTTP 500)" in str(e.value) and "crashing-agent-" in str(e.value)


def test_agent_runtime_client(stack):
    from agentcube import AgentRuntimeClient

    with AgentRuntimeClient("echo-agent") as a:
        assert a.invoke({"input": "hi"}, path="echo")["output"] == "echo: hi"
        assert a.session_id


def test_idle_session_is_reclaimed_then_404(stack):
    url = invocations(stack, "code-interpreters", "short-ttl", "api/execute")
    r = requests.post(url, json={"command": ["true"]})
    # Its sandbox ran the command (listing it here raced the collector on a slow control plane:
    # two kubectl calls can take longer than the 2 s timeout).
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    sid = r.headers["x-agentcube-session-id"]
    # Stay idle (any request through the Router would count as activity) and watch the sandbox go.
    deadline = time.time() + 2 + 1 + 1 + 10
    while time.time() < deadline and any(n.startswith("short-ttl-") for n in stack.sandboxes()):
        time.sleep(0.2)
    assert not any(n.startswith("short-ttl-") for n in stack.sandboxes()), "idle sandbox not reclaimed"
    time.sleep(1.2)  # the Router's short session cache
    r = requests.get(invocations(stack, "code-interpreters", "short-ttl", "api/files?path=."), headers={"x-agentcube-session-id": sid})
    assert r.status_code == 404
    # With why it ended (extension; a made-up id gets none: test_unknown_session_and_runtime).
    assert r.json() == {"error": f'sessions.agentcube.volcano.sh "{sid}" not found', "code": "SESSION_NOT_FOUND",
                        "reason": "it was idle for longer than its sessionTimeout (2s)"}


def test_a_command_longer_than_the_idle_timeout_is_not_cut(stack):
    """A request being served is activity: a `sleep 6` in a session whose timeout is 2 s had its
    sandbox reclaimed under it (`503` after ~3 s), as the session's last answer was its only
    activity."""
    url = invocations(stack, "code-interpreters", "short-ttl", "api/execute")
    r = requests.post(url, json={"command": ["true"]})
    assert r.status_code == 200, r.text
    sid = r.headers["x-agentcube-session-id"]
    started = time.time()
    r = requests.post(url, json={"command": ["sh", "-c", "sleep 6; echo survived"], "timeout": "30s"},
                      headers={"x-agentcube-session-id": sid}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["stdout"] == "survived\n"
    assert time.time() - started >= 6
    requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}")


def test_a_request_cut_by_a_delete_is_told_why(stack):
    """A session deleted while a command of it runs: the command's request gets the
    unknown-session 404 with why the session ended (it got `503 sandbox unreachable`)."""
    url = invocations(stack, "code-interpreters", "on-demand-interpreter", "api/execute")
    r = requests.post(url, json={"command": ["true"]})
    assert r.status_code == 200, r.text
    sid = r.headers["x-agentcube-session-id"]
    answers: list[requests.Response] = []
    long = threading.Thread(target=lambda: answers.append(requests.post(
        url, json={"command": ["sleep", "30"], "timeout": "60s"}, headers={"x-agentcube-session-id": sid},
        timeout=90)))
    long.start()
    time.sleep(1)
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}").status_code == 200
    long.join(timeout=90)
    assert answers[0].status_code == 404, answers[0].text
    assert answers[0].json() == {"error": f'sessions.agentcube.volcano.sh "{sid}" not found',
                                 "code": "SESSION_NOT_FOUND",
                                 "reason": "it was deleted (DELETE on the Workload Manager's sessions API)"}


def test_a_definitions_network_policy(stack):
    """`spec.networkPolicy` (tests/e2e/manifests/network-policy.yaml): a NetworkPolicy on
    Kubernetes; locally a network namespace of its own (probed in crates/workload-manager/tests/
    network.rs), where the agent still answers the Router."""
    if stack.backend == "local":
        r = requests.get(invocations(stack, "agent-runtimes", "net-agent"))
        assert r.status_code == 200, r.text
        sid = r.headers["x-agentcube-session-id"]
        assert requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{sid}").status_code == 200
        return
    deadline = time.time() + 30
    while True:
        found = [p for p in stack.kube_list("NetworkPolicy") if p["metadata"]["name"] == "ar-net-agent"]
        if found or time.time() > deadline:
            break
        time.sleep(0.2)
    assert found, "no NetworkPolicy ar-net-agent"
    spec = found[0]["spec"]
    assert spec["podSelector"]["matchLabels"]["runtime.agentcube.io/workload-name"] == "net-agent"
    assert spec["egress"][1] == {"to": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    assert spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app": "agentcube-router"}


def test_a_background_process_through_the_router(stack):
    """Issue 20's process API on a real sandbox, through the Router: it outlives the request that
    started it, takes stdin, and its output is read to the exit code."""
    s = requests.Session()
    base = invocations(stack, "code-interpreters", "my-interpreter", "api/processes")
    r = s.post(base, json={"command": ["sh", "-c", "read x; echo got:$x"]})
    assert r.status_code == 200, r.text
    s.headers["x-agentcube-session-id"] = r.headers["x-agentcube-session-id"]
    pid = r.json()["id"]
    assert s.post(f"{base}/{pid}/stdin", data=b"hi\n").json() == {"written": 3}
    out = [json.loads(l) for l in s.get(f"{base}/{pid}/output", params={"follow": "true"}, timeout=30).text.splitlines()]
    assert "".join(l.get("data", "") for l in out) == "got:hi\n" and out[-1] == {"exit_code": 0}, out
    requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{s.headers['x-agentcube-session-id']}")
