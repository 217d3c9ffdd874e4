"""Upstream's `kubectl agentcube` CLI (agentcube-cli 0.1.1 from PyPI, unmodified, in `.venv-cli`)
against this stack on Kubernetes: `publish` makes an AgentRuntime from an agent workspace whose
image is already in a registry (build mode `cloud`; `pack`, `build` and a `local` publish need a
Docker daemon, which these machines lack), `invoke` reaches it through the Router and keeps its
session, `status` reads it back."""

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO

CLI = REPO / ".venv-cli" / "bin" / "kubectl-agentcube"

# The agent: answers every POST with what it was sent, on its pod IP (the pod's own /etc/hosts
# entry, as on any cluster), with an id that tells sandboxes apart.
AGENT = """
import json, socket, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
INSTANCE = uuid.uuid4().hex
class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        self.answer({"status": "ok"})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.answer({"echo": body, "path": self.path, "instance": INSTANCE})
    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
HTTPServer((socket.gethostbyname(socket.gethostname()), 8080), Echo).serve_forever()
"""


def kubeconfig(stack) -> str:
    """The admin kubeconfig the stack's kubectl uses (the test control plane's, or the cluster's)."""
    flag = next((a for a in stack.kubectl if a.startswith("--kubeconfig=")), None)
    return flag.split("=", 1)[1] if flag else os.environ["KUBECONFIG"]


def cli(stack, workspace: Path, *args: str) -> str:
    env = dict(os.environ, KUBECONFIG=kubeconfig(stack), COLUMNS="200")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(CLI), *args, "-f", str(workspace)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=str(workspace))
    assert r.returncode == 0, f"kubectl agentcube {' '.join(args)}:\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def answer(out: str) -> "tuple[str, str]":
    """The echoed input and the sandbox instance from `invoke`'s printed response."""
    found = re.search(r"'echo': \{'input': '([^']*)'\}, 'path': '/', 'instance':\s*'([0-9a-f]{32})'", out)
    assert found, out
    return found.group(1), found.group(2)


def test_upstream_cli_publishes_invokes_and_reports(stack, tmp_path):
    if stack.backend == "local":
        pytest.skip("kubectl agentcube deploys to Kubernetes")
    assert CLI.exists(), f"{CLI} is missing: run scripts/install-deps.sh"
    name = f"cli-echo-{uuid.uuid4().hex[:6]}"
    workspace = tmp_path / "agent"
    workspace.mkdir()
    metadata = {
        "agent_name": name,
        "entrypoint": f"python3 -c '{AGENT}'",
        "port": 8080,
        "build_mode": "cloud",
        "image": {"repository_url": "python:3.12-slim"},
        "router_url": stack.router_url,
        "workload_manager_url": stack.wm_url,
        "agent_endpoint": stack.router_url,
        "readiness_probe_path": "/",
        "readiness_probe_port": 8080,
    }
    (workspace / "agent_metadata.yaml").write_text(yaml.safe_dump(metadata))

    def saved() -> dict:
        return yaml.safe_load((workspace / "agent_metadata.yaml").read_text())

    session = None
    try:
        assert f"Successfully published agent: {name}" in cli(stack, workspace, "publish")
        [runtime] = [r for r in stack.kube_list("AgentRuntime") if r["metadata"]["name"] == name]
        assert runtime["spec"]["podTemplate"]["spec"]["containers"][0]["image"] == "python:3.12-slim"

        # The first invoke makes a session (the CLI keeps its id from the answer's header), the
        # second reaches the same sandbox with it.
        echoed, first = answer(cli(stack, workspace, "invoke", "--payload", json.dumps({"input": "hi"})))
        session = saved()["session_id"]
        assert echoed == "hi" and session, saved()
        echoed, second = answer(cli(stack, workspace, "invoke", "--payload", json.dumps({"input": "again"})))
        assert echoed == "again" and second == first and saved()["session_id"] == session

        # An AgentRuntime has no status, as upstream: the CLI reports it found, without one.
        assert "created_no_status" in cli(stack, workspace, "status")
    finally:
        if session:
            requests.delete(f"{stack.wm_url}/v1/agent-runtime/sessions/{session}", timeout=30)
        subprocess.run(stack.kubectl + ["delete", "agentruntime", name, "--ignore-not-found"], capture_output=True)
