"""`make cluster`: the Helm chart installed for real on the test control plane.

Starts `test-cluster` (etcd, kube-apiserver with RBAC, controller-manager, scheduler, the
agent-sandbox controller, and the process kubelet that runs pods as bubblewrap processes), runs
`helm install` of deploy/helm/agentcube as the README tells users (only `bundledRedis.enabled=true`
added; the chart's own image names map to this repository's binaries), waits until the Router, the
Workload Manager and Redis are Ready, applies examples/ and prints the environment for the SDK.
Ctrl-C (or SIGTERM) uninstalls the release and stops everything.

`--check` does the same, then runs one SDK session through the installed Router and Workload
Manager, uninstalls and exits (0 when everything worked). `--e2e` runs the whole e2e suite
(`AGENTCUBE_E2E_BACKEND=cluster`, both SDKs) through the installed chart instead, with the
Workload Manager's GC at 1 s (`workloadmanager.extraEnv`, as the suite expects): the `make test`
step.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import pki
import testcluster
from testcluster import KUBE, REPO

Pod = dict[str, Any]
T = TypeVar("T")

HELM = REPO / ".cache/tools/helm"
NAMESPACE = "agentcube"


def log(msg: str) -> None:
    print(f"cluster: {msg}", flush=True)


class Cluster:
    def __init__(self, bin_dir: Path, state: Path):
        self.state = state
        self.proc, kubeconfig = testcluster.start(bin_dir / "test-cluster", bin_dir, state,
                                                   state.parent / "test-cluster.log")
        self.kubeconfig = str(kubeconfig)
        self.env = dict(os.environ, KUBECONFIG=self.kubeconfig, XDG_CACHE_HOME=str(state.parent / "helm-cache"),
                        XDG_CONFIG_HOME=str(state.parent / "helm-config"), XDG_DATA_HOME=str(state.parent / "helm-data"))

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        r = subprocess.run([str(KUBE / "bin/controlplane"), "kubectl", *args], input=stdin, text=True,
                           capture_output=True, env=self.env)
        if check and r.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)}: {r.stderr}")
        return r.stdout

    def helm(self, *args: str) -> str:
        r = subprocess.run([str(HELM), *args], text=True, capture_output=True, env=self.env)
        if r.returncode != 0:
            raise SystemExit(f"helm {' '.join(args)}: {r.stderr}{r.stdout}")
        return r.stdout

    def pod_ip(self, app: str) -> str:
        pods = json.loads(self.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"app={app}", "-o", "json"))["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                        for c in p.get("status", {}).get("conditions", []))]
        if not ready:
            raise SystemExit(f"no ready {app} pod: {[p['status'] for p in pods]}")
        ip: str = ready[0]["status"]["podIP"]
        return ip

    def stop(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        return out


def install(c: Cluster, extra: list[str], create_namespace: bool = True) -> None:
    if create_namespace:
        c.kubectl("create", "namespace", NAMESPACE)
    t = time.time()
    c.helm("install", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE,
           "--set", "bundledRedis.enabled=true", *extra, "--wait", "--timeout", "3m")
    log(f"helm install: Router, Workload Manager and Redis Ready in {time.time() - t:.1f} s")
    # Started together, none may need a restart to come up: the Workload Manager waits for Redis
    # (before, it exited once and waited out the kubelet's back-off).
    restarted = {p["metadata"]["name"]: s["restartCount"] for p in json.loads(
        c.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
        for s in p.get("status", {}).get("containerStatuses", []) if s["restartCount"]}
    if restarted:
        raise SystemExit(f"containers restarted during helm install: {restarted}")
    for f in sorted(REPO.glob("examples/*.yaml")):
        c.kubectl("apply", "-f", str(f))
    log("examples applied")


def session(wm: str, router: str) -> None:
    """One SDK session through the installed Router and Workload Manager."""
    env = dict(os.environ, WORKLOAD_MANAGER_URL=wm, ROUTER_URL=router)
    code = ("from agentcube import CodeInterpreterClient as C\n"
            "with C() as c:\n"
            "    assert c.run_code('python', 'print(6*7)').strip() == '42'\n"
            "print('ok')\n")
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0 or r.stdout.strip() != "ok":
        raise SystemExit(f"SDK session through the installed chart failed: {r.stdout}{r.stderr}")


def e2e(c: Cluster, wm: str, router: str) -> None:
    """The e2e suite through the installed chart (`kubectl` on PATH is this cluster's)."""
    bin_dir = c.state.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(f'#!/bin/sh\nexec {KUBE / "bin/controlplane"} kubectl "$@"\n')
    (bin_dir / "kubectl").chmod(0o755)
    env = dict(c.env, PATH=f"{bin_dir}:{os.environ['PATH']}", AGENTCUBE_E2E_BACKEND="cluster",
               AGENTCUBE_E2E_WM_URL=wm, AGENTCUBE_E2E_ROUTER_URL=router,
               AGENTCUBE_E2E_AUDIT_LOG=str(c.state / "control-plane/audit.log"))
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", str(REPO / "tests/e2e")], env=env,
                       cwd=REPO)
    if r.returncode != 0:
        raise SystemExit("the e2e suite failed through the installed chart")


def ready_pods(c: Cluster, app: str) -> list[Pod]:
    pods = json.loads(c.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"app={app}", "-o", "json"))["items"]
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None and any(
        x["type"] == "Ready" and x["status"] == "True" for x in p.get("status", {}).get("conditions", []))]


def wait_for(what: str, cond: Callable[[], T | None], secs: float = 60) -> T:
    deadline = time.time() + secs
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def sdk(wm: str, router: str, code: str) -> str:
    env = dict(os.environ, WORKLOAD_MANAGER_URL=wm, ROUTER_URL=router)
    r = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], env=env, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0:
        raise SystemExit(f"SDK: {r.stdout}{r.stderr}")
    return r.stdout.strip()


def secret_key(c: Cluster) -> str:
    return c.kubectl("get", "secret", "-n", NAMESPACE, "picod-router-identity", "-o", "jsonpath={.data.private\\.pem}")


def lifecycle(c: Cluster, wm: str) -> None:
    """helm upgrade to two Router replicas (one key; a session survives losing its Router pod),
    a pool resized through its CodeInterpreter, helm uninstall (what stays), reinstall."""
    key = secret_key(c)
    # Placement values reach the real scheduler's and admission's objects: the priority class's
    # value is resolved into each pod by the API server.
    c.kubectl("apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
        "metadata": {"name": "agentcube-router-test"}, "value": 100000}))
    c.helm("upgrade", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE, "--reuse-values",
           "--set", "router.replicas=2", "--set", "router.priorityClassName=agentcube-router-test",
           "--set-json", 'router.nodeSelector={"kubernetes.io/os": "linux"}',
           "--set-json", 'router.podAnnotations={"example.com/owner": "platform"}', "--wait", "--timeout", "3m")
    def two_routers() -> list[Pod] | None:
        pods = ready_pods(c, "agentcube-router")
        return pods if len(pods) == 2 else None
    routers = wait_for("two ready Router pods", two_routers)
    assert secret_key(c) == key, "the upgrade kept the identity Secret"
    for p in routers:
        spec, meta = p["spec"], p["metadata"]
        placed = (spec.get("priority"), spec.get("nodeSelector"), meta.get("annotations", {}).get("example.com/owner"))
        assert placed == (100000, {"kubernetes.io/os": "linux"}, "platform"), f"{meta['name']}: {placed}"
    def url(p: Pod) -> str:
        return f"http://{p['status']['podIP']}:8080"
    sid = sdk(wm, url(routers[0]), "from agentcube import CodeInterpreterClient as C\n"
              "c = C(); c.write_file('kept', 'f.txt'); print(c.session_id)")
    c.kubectl("delete", "pod", "-n", NAMESPACE, routers[0]["metadata"]["name"], "--wait=false")
    out = sdk(wm, url(routers[1]), f"from agentcube import CodeInterpreterClient as C\n"
              f"c = C(session_id={sid!r}); print(c.execute_command('cat f.txt')); c.stop()")
    assert out == "kept", f"the session through the other Router replica: {out!r}"
    log("upgrade to 2 Router replicas with a priority class, node selector and annotation: one key, "
        "a session kept working after its Router pod was deleted")
    c.kubectl("patch", "codeinterpreter", "my-interpreter", "-n", "default", "--type", "merge", "-p",
              '{"spec": {"warmPoolSize": 1}}')
    wait_for("the pool resized to 1", lambda: c.kubectl(
        "get", "sandboxwarmpools.extensions.agents.x-k8s.io", "my-interpreter", "-n", "default", "-o",
        "jsonpath={.spec.replicas}") == "1")
    log("warmPoolSize 2 -> 1: the SandboxWarmPool followed")
    c.helm("uninstall", "agentcube", "-n", NAMESPACE, "--wait", "--timeout", "2m")
    wait_for("the chart's pods gone", lambda: not json.loads(c.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"])
    assert secret_key(c) == key, "uninstall keeps the identity Secret (helm.sh/resource-policy: keep)"
    crds = c.kubectl("get", "crd", "-o", "name")
    assert "codeinterpreters.runtime.agentcube.volcano.sh" in crds, "uninstall keeps the CRDs"
    log("helm uninstall: workloads gone; CRDs, CodeInterpreters and the identity Secret kept")
    install(c, [], create_namespace=False)
    assert secret_key(c) == key, "a reinstall reuses the identity Secret"
    wm2, router2 = f"http://{c.pod_ip('workloadmanager')}:8080", f"http://{c.pod_ip('agentcube-router')}:8080"
    session(wm2, router2)
    log("reinstall: same key, SDK session works")
    caller_auth(c, router2)
    mtls(c)
    store_tls(c)


def post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def caller_auth(c: Cluster, router: str) -> None:
    """helm upgrade to caller authentication: the Workload Manager reviews every caller's token
    and asks the API server whether it may create the session's Sandbox in that namespace; the
    Router, the one trusted caller, still creates sessions for its own clients."""
    c.helm("upgrade", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE, "--reuse-values",
           "--set", "workloadmanager.auth.enabled=true", "--wait", "--timeout", "3m")
    def authed(p: Pod) -> bool:
        return "--enable-auth" in p["spec"]["containers"][0].get("args", [])
    def new_manager_alone() -> list[Pod] | None:
        pods = ready_pods(c, "workloadmanager")
        return pods if len(pods) == 1 and authed(pods[0]) else None
    pods = wait_for("the Workload Manager with --enable-auth, alone", new_manager_alone)
    wm = f"http://{pods[0]['status']['podIP']}:8080"
    echo = {"name": "echo-agent", "namespace": "default"}
    status, body = post(f"{wm}/v1/agent-runtime", echo)
    assert (status, body.get("message")) == (401, "Missing authorization header"), (status, body)
    c.kubectl("create", "serviceaccount", "tenant", "-n", "default")
    token = c.kubectl("create", "token", "tenant", "-n", "default").strip()
    status, body = post(f"{wm}/v1/agent-runtime", echo, token)
    assert status == 403 and body["message"].startswith(
        "system:serviceaccount:default:tenant may not create sessions in namespace default"), (status, body)
    status, body = post(f"{router}/v1/namespaces/default/agent-runtimes/echo-agent/invocations/echo", {"input": "hi"})
    assert (status, body.get("output")) == (200, "echo: hi"), (status, body)
    log("caller authentication: no token 401, a tenant without RBAC 403, the Router still creates sessions")


def mtls(c: Cluster) -> None:
    """helm upgrade to mutual TLS between the Router and the Workload Manager, certificates from
    Secrets (as cert-manager writes them): a session-less invocation makes its session over mTLS,
    and the Workload Manager no longer answers plain HTTP."""
    d = c.state.parent / "mtls"
    d.mkdir()
    ca = pki.Pki(d)
    for secret, account, usage in (("workloadmanager-mtls", "workloadmanager", pki.SERVER_AUTH),
                                   ("agentcube-router-mtls", "agentcube-router", pki.CLIENT_AUTH)):
        crt, key = ca.leaf(account, pki.spiffe_id(NAMESPACE, account), usage)
        c.kubectl("create", "secret", "generic", secret, "-n", NAMESPACE, f"--from-file=tls.crt={crt}",
                  f"--from-file=tls.key={key}", f"--from-file=ca.crt={ca.bundle}")
    c.helm("upgrade", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE, "--reuse-values",
           "--set", "mtls.enabled=true", "--wait", "--timeout", "3m")
    def alone(app: str, flag: str) -> list[Pod] | None:
        pods = ready_pods(c, app)
        ok = pods and all(any(a.startswith(flag) for a in p["spec"]["containers"][0].get("args", [])) for p in pods)
        return pods if ok and len(pods) == len(json.loads(c.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", f"app={app}", "-o", "json"))["items"]) else None
    wms = wait_for("the Workload Manager with --tls-ca, alone", lambda: alone("workloadmanager", "--tls-ca"))
    routers = wait_for("Routers with --mtls-*, alone", lambda: alone("agentcube-router", "--mtls-ca"))
    router = f"http://{routers[0]['status']['podIP']}:8080"
    status, body = post(f"{router}/v1/namespaces/default/agent-runtimes/echo-agent/invocations/echo", {"input": "tls"})
    assert (status, body.get("output")) == (200, "echo: tls"), (status, body)
    try:
        urllib.request.urlopen(f"http://{wms[0]['status']['podIP']}:8080/health", timeout=10)
        raise SystemExit("the Workload Manager answered plain HTTP with mtls.enabled")
    except (OSError, http.client.HTTPException):
        pass
    log("mtls.enabled: the Router makes sessions over mutual TLS; the Workload Manager refuses plain HTTP")


REDIS_TLS = f"redis-tls.{NAMESPACE}.svc.cluster.local"


def store_tls(c: Cluster) -> None:
    """helm upgrade to a Redis that speaks TLS only and asks for client certificates (as a managed
    Redis with in-transit encryption may): both components reach it with `redis.tls`, and a
    session made through the Router lands in it."""
    d = c.state.parent / "store-tls"
    d.mkdir()
    ca = pki.Pki(d)
    server = ca.leaf("redis-tls", "spiffe://cluster.local/redis-tls", pki.SERVER_AUTH, dns=(REDIS_TLS,))
    client = ca.leaf("agentcube-store", "spiffe://cluster.local/agentcube-store", pki.CLIENT_AUTH)
    for secret, (crt, key) in (("redis-tls-server", server), ("redis-tls-client", client)):
        c.kubectl("create", "secret", "generic", secret, "-n", NAMESPACE, f"--from-file=tls.crt={crt}",
                  f"--from-file=tls.key={key}", f"--from-file=ca.crt={ca.bundle}")
    password = "tls-store-password"
    tls_args = ["--save", "", "--appendonly", "no", "--requirepass", password, "--port", "0",
                "--tls-port", "6379", "--tls-cert-file", "/tls/tls.crt", "--tls-key-file", "/tls/tls.key",
                "--tls-ca-cert-file", "/tls/ca.crt", "--tls-auth-clients", "yes"]
    labels = {"app": "redis-tls"}
    objects = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redis-tls", "namespace": NAMESPACE},
         "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
             "containers": [{"name": "redis", "image": "redis:7-alpine", "args": tls_args,
                             "ports": [{"name": "redis", "containerPort": 6379}],
                             "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 1},
                             "volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": True}]}],
             "volumes": [{"name": "tls", "secret": {"secretName": "redis-tls-server"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis-tls", "namespace": NAMESPACE},
         "spec": {"selector": labels, "ports": [{"port": 6379, "targetPort": 6379}]}},
    ]
    c.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    wait_for("the TLS Redis ready", lambda: ready_pods(c, "redis-tls") or None)
    c.helm("upgrade", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE, "--reuse-values",
           "--set", "bundledRedis.enabled=false", "--set", f"redis.addr={REDIS_TLS}:6379",
           "--set", f"redis.password={password}", "--set", "redis.tls.enabled=true",
           "--set", "redis.tls.secretName=redis-tls-client", "--set", "redis.tls.clientCertificate=true",
           "--wait", "--timeout", "3m")
    def on_tls(app: str) -> list[Pod] | None:
        pods = json.loads(c.kubectl("get", "pods", "-n", NAMESPACE, "-l", f"app={app}", "-o", "json"))["items"]
        env = [{e["name"] for e in p["spec"]["containers"][0].get("env", [])} for p in pods]
        ready = ready_pods(c, app)
        return ready if pods and len(ready) == len(pods) and all("AGENTCUBE_STORE_TLS" in e for e in env) else None
    routers = wait_for("Routers on the TLS store, alone", lambda: on_tls("agentcube-router"))
    wait_for("the Workload Manager on the TLS store, alone", lambda: on_tls("workloadmanager"))
    router = f"http://{routers[0]['status']['podIP']}:8080"
    status, body = post(f"{router}/v1/namespaces/default/agent-runtimes/echo-agent/invocations/echo",
                        {"input": "store"})
    assert (status, body.get("output")) == (200, "echo: store"), (status, body)
    records = subprocess.run(
        ["redis-cli", "-h", ready_pods(c, "redis-tls")[0]["status"]["podIP"], "--tls", "--cacert", str(ca.bundle),
         "--cert", str(client[0]), "--key", str(client[1]), "-a", password, "--no-auth-warning",
         "ZCARD", "session:expiry"], capture_output=True, text=True, check=True).stdout.strip()
    assert records == "1", f"sessions in the TLS Redis: {records!r}"
    log("redis.tls: Router and Workload Manager reach a TLS-only Redis with a client certificate; "
        "a session made through the Router is in it")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"))
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentcube-cluster-"))
    tmp.chmod(0o755)
    c = Cluster(Path(args.bin_dir).resolve(), tmp / "state")
    def interrupted(*_: object) -> None:  # SIGTERM stops as Ctrl-C does: uninstall, then stop the cluster
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    ok = False
    try:
        extra = ["--set", "workloadmanager.extraEnv[0].name=AGENTCUBE_GC_INTERVAL",
                 "--set", "workloadmanager.extraEnv[0].value=1s"] if args.e2e else []
        install(c, extra)
        wm, router = f"http://{c.pod_ip('workloadmanager')}:8080", f"http://{c.pod_ip('agentcube-router')}:8080"
        if args.check:
            session(wm, router)
            log("an SDK session through the installed Router and Workload Manager worked")
        elif args.e2e:
            e2e(c, wm, router)
            log("the e2e suite passed through the installed Router and Workload Manager")
            lifecycle(c, wm)
        else:
            print(f"export KUBECONFIG={c.kubeconfig} WORKLOAD_MANAGER_URL={wm} ROUTER_URL={router}", flush=True)
            print(f"kubectl: {KUBE / 'bin/controlplane'} kubectl    (Ctrl-C uninstalls and stops everything)",
                  flush=True)
            while True:
                time.sleep(3600)
        ok = True
    except KeyboardInterrupt:
        ok = not (args.check or args.e2e)
    except SystemExit as e:
        print(e, file=sys.stderr)
    finally:
        try:
            c.helm("uninstall", "agentcube", "-n", NAMESPACE, "--wait", "--timeout", "2m")
            log("helm uninstall done")
        except SystemExit as e:
            ok = False
            print(e, file=sys.stderr)
        out = c.stop()
        log(out.strip())
        left = subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split()
        if left:
            ok = False
            print(f"processes left behind: {left}", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(tmp)])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
