"""Starts a real stack (`agentcube up`: Router + Workload Manager + store, bubblewrap sandboxes)
for the e2e suite, on free loopback ports, and stops it afterwards (checking nothing is left)."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, wm_url: str, router_url: str, state_dir: Path):
        self.wm_url = wm_url
        self.router_url = router_url
        self.state_dir = state_dir

    def sandboxes(self) -> set:
        d = self.state_dir / "sandboxes"
        return {p.name for p in d.iterdir()} if d.exists() else set()


def _binary() -> Path:
    b = Path(os.environ.get("AGENTCUBE_BIN", REPO / "target/debug/agentcube"))
    if not b.exists():
        pytest.fail(f"{b} not found: build it with `cargo build -p agentcube -p agentcube-picod`")
    return b


@pytest.fixture(scope="session")
def stack():
    tmp = Path(tempfile.mkdtemp(prefix="agentcube-e2e-"))
    tmp.chmod(0o755)  # sandboxes run as an unprivileged user and must reach their directories
    manifests = tmp / "manifests"
    manifests.mkdir()
    for f in list((REPO / "examples").glob("*.yaml")) + list((REPO / "tests/e2e/manifests").glob("*.yaml")):
        shutil.copy(f, manifests / f.name)
    wm_port, router_port = _free_port(), _free_port()
    state = tmp / "state"
    args = [str(_binary()), "up", "--manifests", str(manifests), "--wm-port", str(wm_port),
            "--router-port", str(router_port), "--state-dir", str(state), "--gc-interval", "1s"]
    store = os.environ.get("AGENTCUBE_E2E_STORE")
    if store:
        args += ["--store", store]
    log = open(tmp / "agentcube.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wm_url, router_url = f"http://127.0.0.1:{wm_port}", f"http://127.0.0.1:{router_port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{wm_url}/health", timeout=1).ok and requests.get(f"{router_url}/health/ready", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail(f"agentcube up exited: {(tmp / 'agentcube.log').read_text()}")
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("agentcube up did not become healthy")
    os.environ["WORKLOAD_MANAGER_URL"] = wm_url
    os.environ["ROUTER_URL"] = router_url
    yield Stack(wm_url, router_url, state)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    output = (tmp / "agentcube.log").read_text()
    assert "stopped; no sandbox left running" in output, output
    leftovers = list((state / "sandboxes").iterdir()) if (state / "sandboxes").exists() else []
    assert not leftovers, f"sandboxes left behind: {leftovers}"
    shutil.rmtree(tmp, ignore_errors=True)
