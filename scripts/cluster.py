"""`make cluster`: the Helm chart installed for real on the test control plane.

Starts `test-cluster` (etcd, kube-apiserver with RBAC, controller-manager, scheduler, the
agent-sandbox controller, and the process kubelet that runs pods as bubblewrap processes), runs
`helm install` of deploy/helm/agentcube as the README tells users (only `bundledRedis.enabled=true`
added; the chart's own image names map to this repository's binaries), waits until the Router, the
Workload Manager and Redis are Ready, applies examples/ and prints the environment for the SDK.
Ctrl-C (or SIGTERM) uninstalls the release and stops everything.

`--check` does the same, then runs one SDK session through the installed Router and Workload
Manager, uninstalls and exits (0 when everything worked): the `make test` step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KUBE = Path(os.environ.get("AGENTCUBE_KUBE_CACHE", REPO / ".cache/kube"))
HELM = REPO / ".cache/tools/helm"
NAMESPACE = "agentcube"


def log(msg: str) -> None:
    print(f"cluster: {msg}", flush=True)


class Cluster:
    def __init__(self, bin_dir: Path, state: Path):
        self.state = state
        self.proc = subprocess.Popen([str(bin_dir / "test-cluster"), "--state-dir", str(state), "--bin-dir", str(bin_dir),
                                      "--stdin"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(state.parent / "test-cluster.log", "w"), text=True,
                                     env=dict(os.environ, AGENTCUBE_KUBE_CACHE=str(KUBE)))
        line = self.proc.stdout.readline()
        if not line.startswith("test-cluster ready: kubeconfig="):
            raise SystemExit(f"test cluster did not start: {(state.parent / 'test-cluster.log').read_text()[-3000:]}")
        self.kubeconfig = line.strip().split("=", 1)[1]
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
        return ready[0]["status"]["podIP"]

    def stop(self) -> str:
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=60)
        return out


def install(c: Cluster) -> None:
    c.kubectl("create", "namespace", NAMESPACE)
    t = time.time()
    c.helm("install", "agentcube", str(REPO / "deploy/helm/agentcube"), "-n", NAMESPACE,
           "--set", "bundledRedis.enabled=true", "--wait", "--timeout", "3m")
    log(f"helm install: Router, Workload Manager and Redis Ready in {time.time() - t:.1f} s")
    for f in sorted(REPO.glob("examples/*.yaml")):
        c.kubectl("apply", "-f", str(f))


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=str(REPO / "target/release"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="agentcube-cluster-"))
    tmp.chmod(0o755)
    c = Cluster(Path(args.bin_dir).resolve(), tmp / "state")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1) or (_ for _ in ()).throw(KeyboardInterrupt))
    ok = False
    try:
        install(c)
        wm, router = f"http://{c.pod_ip('workloadmanager')}:8080", f"http://{c.pod_ip('agentcube-router')}:8080"
        if args.check:
            session(wm, router)
            log("an SDK session through the installed Router and Workload Manager worked")
        else:
            print(f"export KUBECONFIG={c.kubeconfig} WORKLOAD_MANAGER_URL={wm} ROUTER_URL={router}", flush=True)
            print(f"kubectl: {KUBE / 'bin/controlplane'} kubectl    (Ctrl-C uninstalls and stops everything)",
                  flush=True)
            while True:
                time.sleep(3600)
        ok = True
    except KeyboardInterrupt:
        ok = True
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
