"""Who may do what (issue 19), with the real binaries and SDKs: `agentcube up` beyond loopback
requires the token it prints; a standalone Router with OIDC against a real issuer (Ory Hydra)
serves SDK calls authenticated with `ServiceAccountAuth` and keeps users to their own sessions."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from agentcube import AgentRuntimeClient, CodeInterpreterClient, ServiceAccountAuth, TokenAuth
from agentcube.clients.control_plane import ControlPlaneClient
from conftest import REPO, _binary, _free_port, _wait_healthy, start_up

HYDRA = REPO / ".cache/oidc/bin/hydra"
ROLE = "sandbox:invoke"
AUD = "agentcube-api"


def _local_only(stack):
    if stack.backend != "local":
        pytest.skip("runs its own `agentcube up` and router")


def test_up_beyond_loopback_requires_the_token_it_prints(stack, monkeypatch, scratch):
    _local_only(stack)
    tmp = scratch("agentcube-auth-")
    env = {k: v for k, v in os.environ.items() if k != "AGENTCUBE_AUTH_TOKEN"}
    proc, wm, router = start_up(tmp, None, "--bind", "0.0.0.0", env=env)
    try:
        out = next(tmp.glob("up-*.log")).read_text()
        m = re.search(r"AGENTCUBE_AUTH_TOKEN=(\S+)", out)
        assert m, out
        token = m.group(1)
        assert len(token) >= 32
        invoke = f"{router}/v1/namespaces/default/code-interpreters/my-interpreter/invocations/api/execute"
        # Without the token: 401 from both, nothing created.
        r = requests.post(f"{wm}/v1/code-interpreter", json={"name": "my-interpreter", "namespace": "default"})
        assert (r.status_code, r.json()) == (401, {"message": "Missing authorization header"})
        r = requests.post(invoke, json={"command": ["true"]})
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED", r.text
        r = requests.post(invoke, json={"command": ["true"]}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "x-agentcube-session-id" not in r.headers
        # The SDK with the printed export line's token (read from the environment).
        monkeypatch.setenv("AGENTCUBE_AUTH_TOKEN", token)
        with (CodeInterpreterClient(workload_manager_url=wm, router_url=router) as c,
              CodeInterpreterClient(workload_manager_url=wm, router_url=router) as d):
            assert c.run_code("python", "print(6*7)").strip() == "42"
            # With the token, sessions are listed: one per page (the client follows the pages),
            # each once, only of the kind asked for.
            cp = ControlPlaneClient(wm)
            ids = [s["sessionId"] for s in cp.list_sessions(page_size=1)]
            assert {c.session_id, d.session_id} <= set(ids) and len(ids) == len(set(ids)), ids
            assert c.session_id not in [s["sessionId"] for s in cp.list_sessions("agent-runtime")]
            cp.close()
        r = requests.post(invoke, json={"command": ["echo", "ok"]}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["stdout"] == "ok\n", r.text
        sid = r.headers["x-agentcube-session-id"]
        r = requests.delete(f"{wm}/v1/code-interpreter/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(2)
        proc.wait(30)


def test_up_on_loopback_keeps_web_pages_out(stack):
    """`agentcube up` on loopback needs no token, and a browser would send it what any web page
    asks: a cross-site POST needs no preflight (text/plain), and after DNS rebinding the page's
    own name points at 127.0.0.1 so it reads the answers too. Both servers refuse a foreign
    Origin or Host; local clients (no Origin, a loopback Host, a page served from localhost) pass."""
    _local_only(stack)
    invoke = f"{stack.router_url}/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"
    body = '{"command": ["id"]}'
    sandboxes = lambda: {n for n in stack.sandboxes() if n.startswith("on-demand-interpreter-")}  # noqa: E731
    before = sandboxes()
    port = stack.router_url.rsplit(":", 1)[1]
    for headers in ({"Origin": "http://evil.example"}, {"Host": f"rebound.example:{port}"},
                    {"Origin": "null"}):
        r = requests.post(invoke, data=body, headers=dict(headers, **{"Content-Type": "text/plain"}), timeout=30)
        assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN", (headers, r.status_code, r.text)
        assert r.headers.get("x-agentcube-error") == "router" and "x-agentcube-session-id" not in r.headers
    # An <img> on any page GETs without Origin; fetch metadata still names the page's site.
    files = invoke.replace("/api/execute", "/api/files")
    r = requests.get(files, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, timeout=30)
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN", r.text
    wm_port = stack.wm_url.rsplit(":", 1)[1]
    create = {"name": "on-demand-interpreter", "namespace": "default"}
    for headers in ({"Origin": "https://evil.example"}, {"Host": f"rebound.example:{wm_port}"}):
        r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json=create, headers=headers, timeout=30)
        assert r.status_code == 403 and "web page" in r.json()["message"], (headers, r.status_code, r.text)
    r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json=create, headers={"Sec-Fetch-Site": "cross-site"},
                      timeout=30)
    assert r.status_code == 403, r.text
    assert sandboxes() == before, "a refused request made a sandbox"
    # A page this machine serves itself (a local dev app) and plain clients are served.
    r = requests.post(invoke, data=body, headers={"Origin": "http://localhost:3000"}, timeout=60)
    assert r.status_code == 200 and "uid=" in r.json()["stdout"], r.text
    sid = r.headers["x-agentcube-session-id"]
    r = requests.get(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}", headers={"Origin": "http://evil.example"},
                     timeout=30)
    assert r.status_code == 403, r.text
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}", timeout=30).status_code == 200


def test_standalone_servers_keep_other_sites_pages_out(stack):
    """A Router and a Workload Manager without caller authentication (upstream's default), which
    a developer reaches through `kubectl port-forward` as the chart's NOTES show, or anyone on an
    intranet: any web page that browser shows could POST a command to the Router (text/plain
    needs no preflight), which made a session and ran it; a page rebinding its name to the
    port-forward's 127.0.0.1 read the answers too. Both binaries refuse pages of other sites and,
    from loopback, pages under a foreign name; clients that are no browser are served as before."""
    if stack.backend == "local":
        pytest.skip("the standalone binaries (agentcube up keeps every web page out: above)")
    invoke = f"{stack.router_url}/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"
    body = '{"command": ["id"]}'
    before = stack.sandboxes()
    port = stack.router_url.rsplit(":", 1)[1]
    page = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
            "Content-Type": "text/plain"}
    rebound = {"Host": f"rebound.example:{port}", "Origin": f"http://rebound.example:{port}",
               "Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain"}
    for headers in (page, rebound):
        r = requests.post(invoke, data=body, headers=headers, timeout=30)
        assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN", (headers, r.status_code, r.text)
        assert "web page" in r.json()["error"] and "x-agentcube-session-id" not in r.headers, r.text
    wm_port = stack.wm_url.rsplit(":", 1)[1]
    create = '{"name": "on-demand-interpreter", "namespace": "default"}'
    for headers in (page, dict(rebound, Host=f"rebound.example:{wm_port}", Origin=f"http://rebound.example:{wm_port}")):
        r = requests.post(f"{stack.wm_url}/v1/code-interpreter", data=create, headers=headers, timeout=30)
        assert r.status_code == 403 and "web page" in r.json()["message"], (headers, r.status_code, r.text)
    assert stack.sandboxes() == before, "a refused page made a sandbox"
    # A client that is no browser, under a name that is not loopback's (a sidecar, a Service
    # name), and a page of the same site are served.
    r = requests.post(invoke, data=body, headers={"Host": "agentcube-router.agentcube.svc"}, timeout=120)
    assert r.status_code == 200 and "uid=" in r.json()["stdout"], r.text
    sid = r.headers["x-agentcube-session-id"]
    r = requests.post(invoke, data=body, timeout=60, headers={
        "x-agentcube-session-id": sid, "Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"})
    assert r.status_code == 200, r.text
    r = requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{sid}", headers={"Sec-Fetch-Site": "none"},
                        timeout=60)
    assert r.status_code == 200, r.text


class Hydra:
    """Ory Hydra (scripts/build-oidc.sh): in-memory, JWT access tokens, client credentials."""

    def __init__(self, tmp: Path):
        assert HYDRA.exists(), f"{HYDRA} is missing: run scripts/build-oidc.sh (make test does)"
        public, self.admin_port = _free_port(), _free_port()
        self.issuer = f"http://127.0.0.1:{public}"
        self.log = tmp / "hydra.log"
        env = {"DSN": "memory", "SECRETS_SYSTEM": "agentcube-e2e-secret-0123456789", "URLS_SELF_ISSUER": self.issuer,
               "STRATEGIES_ACCESS_TOKEN": "jwt", "SERVE_PUBLIC_HOST": "127.0.0.1", "SERVE_PUBLIC_PORT": str(public),
               "SERVE_ADMIN_HOST": "127.0.0.1", "SERVE_ADMIN_PORT": str(self.admin_port), "LOG_LEVEL": "warn"}
        self.proc = subprocess.Popen([str(HYDRA), "serve", "all", "--dev"], env=env, cwd=tmp,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        _wait_healthy([f"{self.issuer}/.well-known/openid-configuration",
                       f"http://127.0.0.1:{self.admin_port}/health/ready"], [self.proc], [self.log])

    def client(self, cid: str, scope: str) -> ServiceAccountAuth:
        secret = f"{cid}-secret-0123456789"
        r = requests.post(f"http://127.0.0.1:{self.admin_port}/admin/clients", json={
            "client_id": cid, "client_secret": secret, "grant_types": ["client_credentials"], "scope": scope,
            "audience": [AUD], "token_endpoint_auth_method": "client_secret_post"})
        assert r.ok, r.text
        return ServiceAccountAuth(f"{self.issuer}/oauth2/token", cid, secret, scope=scope, audience=AUD)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def test_oidc_router_with_service_account_auth(stack, redis_url, scratch):
    _local_only(stack)
    tmp = scratch("agentcube-oidc-")
    hydra = Hydra(tmp)
    identity = tmp / "identity"
    # The Workload Manager and sandboxes (agentcube up), and a standalone Router sharing its store
    # and key pair, with OIDC on.
    up, wm, _ = start_up(tmp, redis_url, "--identity-dir", str(identity))
    port = _free_port()
    log = tmp / "router.log"
    router_env = dict(os.environ, WORKLOAD_MANAGER_URL=wm)
    router_proc = subprocess.Popen(
        [str(_binary("router")), "--port", str(port), "--bind", "127.0.0.1", "--metrics-port", "0",
         "--identity-dir", str(identity), "--store", redis_url, "--unix-socket-dir", str(tmp / "state/private"),
         "--jwt-issuer-url", hydra.issuer,
         "--jwt-audience", AUD, "--jwt-role-claim", "scp", "--jwt-required-role", ROLE],
        env=router_env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    router = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy([f"{router}/health/ready"], [router_proc], [log])
        alice, bob = hydra.client("alice", ROLE), hydra.client("bob", ROLE)
        root = hydra.client("root", f"{ROLE} admin")
        # An agent session bootstrapped through the Router belongs to alice.
        agent = AgentRuntimeClient("echo-agent", router_url=router, auth=alice, workload_manager_url=wm)
        assert agent.invoke({"input": "hi"}, path="echo")["output"] == "echo: hi"
        sid = agent.session_id
        assert sid is not None
        rec = requests.get(f"{wm}/v1/agent-runtime/sessions/{sid}").json()
        assert rec["ownerId"] == "alice", rec
        # Bob may not use it; the admin may.
        r = requests.post(f"{router}/v1/namespaces/default/agent-runtimes/echo-agent/invocations/echo",
                          json={"input": "x"}, headers={"x-agentcube-session-id": sid,
                                                        "Authorization": f"Bearer {bob.get_token()}"})
        assert (r.status_code, r.json()) == (403, {"error": "you do not own this sandbox", "code": "FORBIDDEN"})
        other = AgentRuntimeClient("echo-agent", router_url=router, auth=root, session_id=sid)
        assert other.invoke({"input": "admin"}, path="echo")["output"] == "echo: admin"
        other.close()
        # The token is fetched once and reused (client credentials cached until near expiry).
        assert alice.get_token() == alice.get_token()
        # No token: 401, with the upstream body.
        r = requests.post(f"{router}/v1/namespaces/default/agent-runtimes/echo-agent/invocations/echo", json={})
        assert (r.status_code, r.json()) == (401, {"error": "missing authorization header", "code": "UNAUTHORIZED"})
        # stop() deletes the session at the Workload Manager (upstream PR #426).
        assert agent.stop() is True
        assert requests.get(f"{wm}/v1/agent-runtime/sessions/{sid}").status_code == 404
        # A Code Interpreter session made at the WM has no owner: only an admin may use it
        # through an OIDC Router (upstream's fail-closed rule).
        with CodeInterpreterClient(workload_manager_url=wm, router_url=router, auth=root) as c:
            assert c.execute_command("echo admin") == "admin\n"
        with CodeInterpreterClient(workload_manager_url=wm, router_url=router, auth=alice) as c:
            with pytest.raises(requests.HTTPError) as e:
                c.execute_command("true")
            assert e.value.response is not None and e.value.response.status_code == 403
    finally:
        router_proc.terminate()
        router_proc.wait(30)
        up.send_signal(2)
        up.wait(30)
        hydra.stop()


def test_token_auth_is_sent_by_both_clients():
    # Without a server: the header each client would send.
    cp = ControlPlaneClient("http://127.0.0.1:9", auth=TokenAuth("t0k"))
    assert cp._headers() == {"Authorization": "Bearer t0k"}
    cp.close()
