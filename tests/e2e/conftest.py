"""Starts a real stack for the e2e suite on free loopback ports, and stops it afterwards (checking
nothing is left). `AGENTCUBE_E2E_BACKEND` picks it:

- `local` (default): `agentcube up` — Router + Workload Manager + in-memory store in one process,
  bubblewrap sandboxes.
- `fake-cluster`: the `router` and `workload-manager --backend kubernetes` binaries, a real
  redis-server, and `fake-cluster` (the in-repo fake API server with simulated agent-sandbox and
  kubelet, whose pods are real PicoD processes on their own loopback addresses).
- `cluster`: a real cluster with agent-sandbox and this chart installed. Needs `KUBECONFIG`,
  `AGENTCUBE_E2E_WM_URL` and `AGENTCUBE_E2E_ROUTER_URL` (e.g. `kubectl port-forward` to the two
  Services) and `kubectl` on PATH; the suite applies its manifests and inspects the cluster with
  kubectl. Skipped when those are not set.
"""

import json
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
import yaml

REPO = Path(__file__).resolve().parents[2]
# Set in the environment of the stack's processes: it must never be readable inside a sandbox.
CANARY = "agentcube-e2e-canary-" + os.urandom(8).hex()
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
BACKEND = os.environ.get("AGENTCUBE_E2E_BACKEND", "local")

# Where the agentcube and agent-sandbox kinds live in the API.
PLURALS = {
    "CodeInterpreter": ("apis/runtime.agentcube.volcano.sh/v1alpha1", "codeinterpreters"),
    "AgentRuntime": ("apis/runtime.agentcube.volcano.sh/v1alpha1", "agentruntimes"),
    "Sandbox": ("apis/agents.x-k8s.io/v1alpha1", "sandboxes"),
    "SandboxClaim": ("apis/extensions.agents.x-k8s.io/v1alpha1", "sandboxclaims"),
    "SandboxWarmPool": ("apis/extensions.agents.x-k8s.io/v1alpha1", "sandboxwarmpools"),
    "Pod": ("api/v1", "pods"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifests():
    files = sorted(REPO.glob("examples/*.yaml")) + sorted(REPO.glob("tests/e2e/manifests/*.yaml"))
    return files


def _wait_healthy(urls, procs, logs, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if all(requests.get(u, timeout=1).ok for u in urls):
                return
        except requests.RequestException:
            pass
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(f"{p.args[0]} exited: {Path(log).read_text()}")
        time.sleep(0.1)
    for p in procs:
        p.kill()
    pytest.fail("the stack did not become healthy:\n" + "\n".join(Path(l).read_text()[-3000:] for l in logs))


def _binary(name: str) -> Path:
    b = TARGET / name
    if not b.exists():
        pytest.fail(f"{b} not found: build it with `cargo build --workspace --bins`")
    return b


class Stack:
    """What the tests see: the two URLs, the backend, and the live sandboxes."""

    def __init__(self, backend, wm_url, router_url):
        self.backend = backend
        self.wm_url = wm_url
        self.router_url = router_url

    def sandboxes(self) -> set:
        raise NotImplementedError


class LocalStack(Stack):
    def __init__(self, wm_url, router_url, state_dir: Path, metrics_url: str):
        super().__init__("local", wm_url, router_url)
        self.state_dir = state_dir
        self.metrics_url = metrics_url

    def sandboxes(self) -> set:
        d = self.state_dir / "sandboxes"
        return {p.name for p in d.iterdir()} if d.exists() else set()


class KubeStack(Stack):
    """A cluster the tests can list objects in (`kube_list`)."""

    def kube_list(self, kind: str, namespace: str = "default", labels: str = "") -> list:
        raise NotImplementedError

    def sandboxes(self) -> set:
        # Sandboxes that still run something (a Sandbox past its shutdownTime keeps no pod).
        pods = {p["metadata"]["name"] for p in self.kube_list("Pod")}
        return {s["metadata"]["name"] for s in self.kube_list("Sandbox") if s["metadata"]["name"] in pods}


class FakeClusterStack(KubeStack):
    def __init__(self, wm_url, router_url, api_url):
        super().__init__("fake-cluster", wm_url, router_url)
        self.api_url = api_url

    def kube_list(self, kind, namespace="default", labels=""):
        prefix, plural = PLURALS[kind]
        r = requests.get(f"{self.api_url}/{prefix}/namespaces/{namespace}/{plural}", params={"labelSelector": labels} if labels else None)
        r.raise_for_status()
        return r.json()["items"]


class ClusterStack(KubeStack):
    def __init__(self, wm_url, router_url):
        super().__init__("cluster", wm_url, router_url)

    def kube_list(self, kind, namespace="default", labels=""):
        _, plural = PLURALS[kind]
        cmd = ["kubectl", "get", plural.split(".")[0], "-n", namespace, "-o", "json"] + (["-l", labels] if labels else [])
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["items"]


def _local(tmp: Path):
    manifests = tmp / "manifests"
    manifests.mkdir()
    for f in _manifests():
        shutil.copy(f, manifests / f.name)
    wm_port, router_port, metrics_port = _free_port(), _free_port(), _free_port()
    state = tmp / "state"
    args = [str(_binary("agentcube")), "up", "--manifests", str(manifests), "--wm-port", str(wm_port),
            "--router-port", str(router_port), "--metrics-port", str(metrics_port), "--state-dir", str(state),
            "--gc-interval", "1s"]
    store = os.environ.get("AGENTCUBE_E2E_STORE")
    if store:
        args += ["--store", store]
    log = tmp / "agentcube.log"
    env = dict(os.environ, AGENTCUBE_E2E_CANARY=CANARY)
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    stack = LocalStack(f"http://127.0.0.1:{wm_port}", f"http://127.0.0.1:{router_port}", state,
                       f"http://127.0.0.1:{metrics_port}/metrics")
    _wait_healthy([f"{stack.wm_url}/health", f"{stack.router_url}/health/ready"], [proc], [log])
    yield stack
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    output = log.read_text()
    assert "stopped; no sandbox left running" in output, output
    leftovers = list((state / "sandboxes").iterdir()) if (state / "sandboxes").exists() else []
    assert not leftovers, f"sandboxes left behind: {leftovers}"


def _stop(proc, secs=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=secs)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def _fake_cluster(tmp: Path):
    redis_port, wm_port, router_port = _free_port(), _free_port(), _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=open(tmp / "redis.log", "w"),
                             stderr=subprocess.STDOUT)
    pods = tmp / "cluster"
    kubeconfig = tmp / "kubeconfig"
    cluster_log = tmp / "fake-cluster.log"
    cluster = subprocess.Popen([str(_binary("fake-cluster")), "--picod", str(_binary("picod")),
                                "--state-dir", str(pods), "--kubeconfig", str(kubeconfig)],
                               stdout=subprocess.PIPE, stderr=open(cluster_log, "w"), text=True)
    line = cluster.stdout.readline()
    assert line.startswith("fake-cluster listening on "), f"{line!r}\n{cluster_log.read_text()}"
    api = line.split()[-1]
    for f in _manifests():
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            prefix, plural = PLURALS[doc["kind"]]
            ns = doc["metadata"].get("namespace", "default")
            r = requests.post(f"{api}/{prefix}/namespaces/{ns}/{plural}", json=doc)
            assert r.status_code == 201, r.text
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), AGENTCUBE_NAMESPACE="agentcube", AGENTCUBE_E2E_CANARY=CANARY,
               REDIS_ADDR=f"127.0.0.1:{redis_port}", REDIS_PASSWORD_REQUIRED="false",
               WORKLOAD_MANAGER_URL=f"http://127.0.0.1:{wm_port}", RUST_LOG="info")
    router_log, wm_log = tmp / "router.log", tmp / "workload-manager.log"
    # The Router first: it creates the identity Secret the Workload Manager follows.
    router = subprocess.Popen([str(_binary("router")), "--port", str(router_port), "--bind", "127.0.0.1",
                               "--metrics-port", "0"], env=env, stdout=open(router_log, "w"), stderr=subprocess.STDOUT)
    wm = subprocess.Popen([str(_binary("workload-manager")), "--backend", "kubernetes", "--port", str(wm_port),
                           "--bind", "127.0.0.1", "--metrics-port", "0", "--gc-interval", "1s"],
                          env=env, stdout=open(wm_log, "w"), stderr=subprocess.STDOUT)
    stack = FakeClusterStack(f"http://127.0.0.1:{wm_port}", f"http://127.0.0.1:{router_port}", api)
    procs = [router, wm]
    try:
        _wait_healthy([f"{stack.wm_url}/health", f"{stack.router_url}/health/ready"], procs, [router_log, wm_log])
        yield stack
    finally:
        for p in (wm, router):
            _stop(p)
        _stop(cluster)
        out = cluster.stdout.read()
        redis.terminate()
        redis.wait(timeout=10)
    assert "fake-cluster stopped;" in out, out + cluster_log.read_text()
    left = subprocess.run(["pgrep", "-f", str(pods)], capture_output=True, text=True).stdout.split()
    assert not left, f"pod processes left behind: {left}"
    leftovers = list((pods / "pods").iterdir())
    assert not leftovers, f"pod directories left behind: {[(p, sorted(x.name for x in p.rglob('*'))[:20]) for p in leftovers]}"


def _cluster(tmp: Path):
    need = ["KUBECONFIG", "AGENTCUBE_E2E_WM_URL", "AGENTCUBE_E2E_ROUTER_URL"]
    missing = [n for n in need if not os.environ.get(n)]
    if missing or not shutil.which("kubectl"):
        pytest.skip(f"real-cluster e2e needs {', '.join(need)} and kubectl (missing: {missing or ['kubectl']})")
    for f in _manifests():
        subprocess.run(["kubectl", "apply", "-f", str(f)], check=True)
    yield ClusterStack(os.environ["AGENTCUBE_E2E_WM_URL"], os.environ["AGENTCUBE_E2E_ROUTER_URL"])


@pytest.fixture(scope="session")
def stack():
    tmp = Path(tempfile.mkdtemp(prefix="agentcube-e2e-"))
    tmp.chmod(0o755)  # sandboxes run as an unprivileged user and must reach their directories
    starters = {"local": _local, "fake-cluster": _fake_cluster, "cluster": _cluster}
    if BACKEND not in starters:
        pytest.fail(f"AGENTCUBE_E2E_BACKEND={BACKEND!r}: use one of {sorted(starters)}")
    gen = starters[BACKEND](tmp)
    s = next(gen)
    os.environ["WORKLOAD_MANAGER_URL"] = s.wm_url
    os.environ["ROUTER_URL"] = s.router_url
    yield s
    try:
        next(gen)
    except StopIteration:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
