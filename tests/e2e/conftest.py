"""Starts a real stack for the e2e suite on free loopback ports, and stops it afterwards (checking
nothing is left). `AGENTCUBE_E2E_BACKEND` picks it:

- `local` (default): `agentcube up` — Router + Workload Manager + in-memory store in one process,
  bubblewrap sandboxes.
- `kube`: the `router` and `workload-manager --backend kubernetes` binaries, a real redis-server,
  and `test-cluster`: a real control plane (etcd, kube-apiserver with RBAC, controller-manager,
  scheduler, the agent-sandbox v1.0 controller) whose process kubelet runs pods as bubblewrap
  processes (PicoD on its own loopback address). Both binaries authenticate with tokens of the
  chart's service accounts and run under the chart's RBAC (rendered with helm).
- `cluster`: a cluster with agent-sandbox and this chart installed. Needs `KUBECONFIG`,
  `AGENTCUBE_E2E_WM_URL` and `AGENTCUBE_E2E_ROUTER_URL` (e.g. `kubectl port-forward` to the two
  Services) and `kubectl` on PATH; the suite applies its manifests and inspects the cluster with
  kubectl. Skipped when those are not set. `scripts/cluster.py --e2e` (in `make test`) runs it on
  the chart installed on the test cluster, with `AGENTCUBE_E2E_AUDIT_LOG` for the RBAC check.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
# Set in the environment of the stack's processes: it must never be readable inside a sandbox.
CANARY = "agentcube-e2e-canary-" + os.urandom(8).hex()
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
BACKEND = os.environ.get("AGENTCUBE_E2E_BACKEND", "local")
# The manifests name upstream images (ghcr.io/volcano-sh/picod, python:3.12-slim) a test machine
# need not reach: every `agentcube up` of the suite runs in host mode, except test_images.py's,
# which pulls images it built from its own registry (`--images pull`).
os.environ.setdefault("AGENTCUBE_IMAGES", "host")

sys.path.insert(0, str(REPO / "scripts"))
import testcluster  # noqa: E402

HELM = REPO / ".cache/tools/helm"
SYSTEM_NAMESPACE = "agentcube"

# Resource names of the kinds the tests list (kubectl's `<plural>.<group>`).
PLURALS = {
    "CodeInterpreter": "codeinterpreters.runtime.agentcube.volcano.sh",
    "AgentRuntime": "agentruntimes.runtime.agentcube.volcano.sh",
    "Sandbox": "sandboxes.agents.x-k8s.io",
    "SandboxClaim": "sandboxclaims.extensions.agents.x-k8s.io",
    "SandboxWarmPool": "sandboxwarmpools.extensions.agents.x-k8s.io",
    "NetworkPolicy": "networkpolicies.networking.k8s.io",
    "Pod": "pods",
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


class ClusterStack(KubeStack):
    """A cluster reached with `kubectl` (a command list, the admin's credentials), and the API
    server's audit log when the cluster is this machine's test cluster."""

    def __init__(self, backend, wm_url, router_url, kubectl=("kubectl",), audit_log: Path | None = None):
        super().__init__(backend, wm_url, router_url)
        self.kubectl = list(kubectl)
        self.audit_log = audit_log

    def audit(self) -> list[dict[str, Any]]:
        assert self.audit_log is not None, "the API server's audit log is known on the Kubernetes backend only"
        return [json.loads(l) for l in self.audit_log.read_text().splitlines() if l.strip()]

    def kube_list(self, kind, namespace="default", labels=""):
        cmd = self.kubectl + ["get", PLURALS[kind], "-n", namespace, "-o", "json"] + (["-l", labels] if labels else [])
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


def _chart_rbac() -> str:
    """The chart's ServiceAccounts, RBAC objects and the Router's identity Secret, rendered by helm
    for namespace `agentcube`."""
    env = dict(os.environ, XDG_CACHE_HOME="/tmp/agentcube-helm-c", XDG_CONFIG_HOME="/tmp/agentcube-helm-cfg",
               XDG_DATA_HOME="/tmp/agentcube-helm-d")
    out = subprocess.run([str(HELM), "template", "ac", str(REPO / "deploy/helm/agentcube"), "--namespace", SYSTEM_NAMESPACE],
                         env=env, capture_output=True, text=True, check=True).stdout
    kinds = {"ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "Secret"}
    return yaml.safe_dump_all([d for d in yaml.safe_load_all(out) if d and d["kind"] in kinds])


def _token_kubeconfig(admin: Path, kubectl: list, sa: str, out: Path) -> Path:
    """A kubeconfig for service account `sa` (a TokenRequest token), like a pod's credentials."""
    token = subprocess.run(kubectl + ["create", "token", sa, "-n", SYSTEM_NAMESPACE, "--duration", "6h"],
                           check=True, capture_output=True, text=True).stdout.strip()
    cfg = yaml.safe_load(admin.read_text())
    cfg["users"] = [{"name": sa, "user": {"token": token}}]
    cfg["contexts"][0]["context"]["user"] = sa
    out.write_text(yaml.safe_dump(cfg))
    return out


def _kube(tmp: Path):
    redis_port, wm_port, router_port = _free_port(), _free_port(), _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=open(tmp / "redis.log", "w"),
                             stderr=subprocess.STDOUT)
    state = tmp / "cluster"
    cluster_log = tmp / "test-cluster.log"
    cluster, admin = testcluster.start(_binary("test-cluster"), TARGET, state, cluster_log)
    kubectl = testcluster.kubectl(admin)

    def run_out(*args, stdin=None):
        r = subprocess.run(kubectl + list(args), input=stdin, text=True, capture_output=True)
        assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
        return r.stdout

    run = run_out

    docs = [d for f in _manifests() for d in yaml.safe_load_all(f.read_text()) if d]
    for ns in sorted({SYSTEM_NAMESPACE} | {d["metadata"].get("namespace", "default") for d in docs} - {"default"}):
        run("create", "namespace", ns)
    run("apply", "-f", "-", stdin=_chart_rbac())
    run("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    # The Router reads the chart's identity Secret from a directory, as the chart mounts it.
    identity = tmp / "identity"
    identity.mkdir()
    pem = run_out("get", "secret", "-n", SYSTEM_NAMESPACE, "picod-router-identity", "-o",
                  "jsonpath={.data.private\\.pem}")
    (identity / "private.pem").write_bytes(base64.b64decode(pem))
    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    wm_kc = _token_kubeconfig(admin, kubectl, values["workloadmanager"]["serviceAccountName"], tmp / "wm.kubeconfig")
    router_kc = _token_kubeconfig(admin, kubectl, values["router"]["serviceAccountName"], tmp / "router.kubeconfig")
    env = dict(os.environ, AGENTCUBE_NAMESPACE=SYSTEM_NAMESPACE, AGENTCUBE_E2E_CANARY=CANARY,
               REDIS_ADDR=f"127.0.0.1:{redis_port}", REDIS_PASSWORD_REQUIRED="false",
               WORKLOAD_MANAGER_URL=f"http://127.0.0.1:{wm_port}", RUST_LOG="info")
    router_log, wm_log = tmp / "router.log", tmp / "workload-manager.log"
    router = subprocess.Popen([str(_binary("router")), "--port", str(router_port), "--bind", "127.0.0.1",
                               "--metrics-port", "0", "--identity-dir", str(identity)],
                              env=dict(env, KUBECONFIG=str(router_kc)),
                              stdout=open(router_log, "w"), stderr=subprocess.STDOUT)
    wm = subprocess.Popen([str(_binary("workload-manager")), "--backend", "kubernetes", "--port", str(wm_port),
                           "--bind", "127.0.0.1", "--metrics-port", "0", "--gc-interval", "1s"],
                          env=dict(env, KUBECONFIG=str(wm_kc)), stdout=open(wm_log, "w"), stderr=subprocess.STDOUT)
    stack = ClusterStack("kube", f"http://127.0.0.1:{wm_port}", f"http://127.0.0.1:{router_port}", kubectl,
                         state / "control-plane/audit.log")
    procs = [router, wm]
    try:
        _wait_healthy([f"{stack.wm_url}/health", f"{stack.router_url}/health/ready"], procs, [router_log, wm_log])
        assert "agent-sandbox API v1beta1 in use" in wm_log.read_text(), wm_log.read_text()
        yield stack
    finally:
        for p in (wm, router):
            _stop(p)
        assert cluster.stdin is not None and cluster.stdout is not None
        cluster.stdin.close()
        out = cluster.stdout.read()
        cluster.wait(timeout=60)
        redis.terminate()
        redis.wait(timeout=10)
    assert "test-cluster stopped;" in out, out + cluster_log.read_text()[-5000:]
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"


def _cluster(tmp: Path):
    need = ["KUBECONFIG", "AGENTCUBE_E2E_WM_URL", "AGENTCUBE_E2E_ROUTER_URL"]
    missing = [n for n in need if not os.environ.get(n)]
    if missing or not shutil.which("kubectl"):
        pytest.skip(f"real-cluster e2e needs {', '.join(need)} and kubectl (missing: {missing or ['kubectl']})")
    docs = [d for f in _manifests() for d in yaml.safe_load_all(f.read_text()) if d]
    for ns in sorted({d["metadata"].get("namespace", "default") for d in docs} - {"default"}):
        subprocess.run(["kubectl", "create", "namespace", ns], capture_output=True)  # may exist
    subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump_all(docs), text=True, check=True)
    audit = os.environ.get("AGENTCUBE_E2E_AUDIT_LOG")
    yield ClusterStack("cluster", os.environ["AGENTCUBE_E2E_WM_URL"], os.environ["AGENTCUBE_E2E_ROUTER_URL"],
                       audit_log=Path(audit) if audit else None)


@pytest.fixture(scope="session")
def stack():
    tmp = Path(tempfile.mkdtemp(prefix="agentcube-e2e-"))
    tmp.chmod(0o755)  # sandboxes run as an unprivileged user and must reach their directories
    starters = {"local": _local, "kube": _kube, "cluster": _cluster}
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
    if not os.environ.get("AGENTCUBE_E2E_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def scratch():
    """Makes directories under the system's temporary directory (0755: sandboxes run as an
    unprivileged user and must reach what is in them), removed after the test unless
    AGENTCUBE_E2E_KEEP is set (they used to pile up, one set per run)."""
    made: list[Path] = []

    def make(prefix: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=prefix))
        d.chmod(0o755)
        made.append(d)
        return d

    yield make
    if not os.environ.get("AGENTCUBE_E2E_KEEP"):
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def redis_url(scratch):
    port = _free_port()
    tmp = str(scratch("agentcube-redis-"))
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            break
        except OSError:
            assert proc.poll() is None, f"redis-server exited ({proc.returncode}): port {port} taken?"
            time.sleep(0.05)
    else:
        proc.kill()
        raise AssertionError(f"redis-server did not answer on port {port}")
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def start_up(tmp: Path, store: str | None, *extra, env=None, manifests: Path = REPO / "examples"):
    """A second `agentcube up` (examples/ manifests unless given) on free ports: (process, WM URL,
    Router URL); its output is in `tmp/up-<wm port>.log`. `store` None: the in-memory store."""
    wm, router = _free_port(), _free_port()
    log = tmp / f"up-{wm}.log"
    store_args = ["--store", store] if store else []
    proc = subprocess.Popen([str(_binary("agentcube")), "up", "--manifests", str(manifests), "--wm-port", str(wm),
                             "--router-port", str(router), "--metrics-port", "0", "--state-dir", str(tmp / "state"),
                             "--gc-interval", "1s", *store_args, *extra],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    _wait_healthy([f"http://127.0.0.1:{wm}/health", f"http://127.0.0.1:{router}/health/ready"], [proc], [log])
    return proc, f"http://127.0.0.1:{wm}", f"http://127.0.0.1:{router}"
