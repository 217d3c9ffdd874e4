"""Session creation on the Kubernetes backend, as the Python SDK feels it: the release `router` and
`workload-manager --backend kubernetes` binaries, a real redis-server, and the test cluster — a real
kube-apiserver, controller-manager, scheduler and the real agent-sandbox v1.0 controller, whose pods
are PicoD processes run by the process kubelet (no container runtime here, so a pod starts in
milliseconds where a real node pulls and starts a container). p50/p99 over N sessions from the SDK's
constructor to PicoD's first answer (`execute_command("true")`), for a warm-pool claim (the pool is
full again before each one), a cold create (a Sandbox per session), and a warm-pool session with
`--standby-claims` (the Workload Manager restarted with claims bound ahead of demand). First, the
SDK calls on a live session through the standalone Router (both SDKs), against the same HTTP calls
made straight to a pod's PicoD."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from datetime import datetime
import sys
import time
from pathlib import Path
from typing import Any, Callable

import requests

from harness import RELEASE, REPO, Procs, Table, binary, free_port, median, pct, procs, wait_http
from sdk import VENVS, Samples, ms, run, sign

SESSIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 50
SETTLED = max(SESSIONS // 3, 1)
POOL = 4
sys.path.insert(0, str(REPO / "scripts"))
import testcluster  # noqa: E402

DEFINITIONS = f"""apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {{name: kwarm, namespace: default}}
spec:
  template: {{image: ghcr.io/volcano-sh/picod:latest}}
  warmPoolSize: {POOL}
---
apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {{name: kcold, namespace: default}}
spec:
  template: {{image: ghcr.io/volcano-sh/picod:latest}}
"""


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def controller_share(audit: Path) -> list[float]:
    """Per claim, seconds from the API server answering its create to agent-sandbox writing its
    status (the adoption), from the API server's audit log."""
    created: dict[str, float] = {}
    bound: dict[str, float] = {}
    for line in audit.read_text().splitlines():
        e = json.loads(line)
        o = e.get("objectRef", {})
        if o.get("resource") != "sandboxclaims" or e.get("stage") != "ResponseComplete":
            continue
        if e["verb"] == "create" and e.get("responseStatus", {}).get("code") == 201:
            created[o.get("name")] = ts(e["stageTimestamp"])
        elif o.get("subresource") == "status" and e["verb"] in ("update", "patch"):
            bound.setdefault(o["name"], ts(e["stageTimestamp"]))
    return [bound[n] - t for n, t in created.items() if n in bound]


def standby_bound(kubectl: list[str]) -> int:
    """Standby claims of kwarm whose status names a Sandbox."""
    out = subprocess.run(kubectl + ["get", "sandboxclaims.extensions.agents.x-k8s.io", "-l",
                                    "runtime.agentcube.io/standby=kwarm", "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return sum(1 for c in json.loads(out)["items"] if c.get("status", {}).get("sandbox", {}).get("name"))


def wait_until(what: str, cond: Callable[[], bool], secs: float = 120) -> None:
    deadline = time.time() + secs
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"{what}: not within {secs} s")
        time.sleep(0.2)


def pool_ready(kubectl: list[str]) -> int:
    out = subprocess.run(kubectl + ["get", "sandboxwarmpools.extensions.agents.x-k8s.io", "kwarm", "-o",
                                    "jsonpath={.status.readyReplicas}"], capture_output=True, text=True).stdout
    return int(out or 0)


DIRECT = "direct to the pod's PicoD (requests.Session)"
CALLS, ROUNDS = 200, 5


def router_key(kubectl: list[str], path: Path) -> None:
    """The Router's private key, from the Secret the Router made (to sign the baseline's token)."""
    out = subprocess.run(kubectl + ["get", "secret", "picod-router-identity", "-n", "agentcube", "-o",
                                    "jsonpath={.data.private\\.pem}"], capture_output=True, text=True, check=True)
    path.write_bytes(base64.b64decode(out.stdout))


def sdk_calls(p: Procs, kubectl: list[str], wm_url: str, sdk_env: dict[str, str]) -> dict[str, Samples]:
    """`execute_command("true")`, `run_code("python", "print(1)")` and a 4 MiB `download_file`
    through the standalone Router with both SDKs on one live session (each SDK given its id, as a
    client resuming it is), and the same HTTP calls straight to that session's pod: the same PicoD
    for every target; in interleaved rounds."""
    s = requests.post(f"{wm_url}/v1/code-interpreter", json={"name": "kwarm", "namespace": "default"},
                      timeout=60).json()
    endpoint = s["entryPoints"][0]["endpoint"]
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    # The session's claim refilled: no pod starts beside the rounds.
    wait_until("the warm pool refilling", lambda: pool_ready(kubectl) >= POOL, 60)
    router_key(kubectl, p.tmp / "router.pem")
    now = int(time.time())
    token = sign(p.tmp / "router.pem", {"iss": "agentcube-router", "iat": now, "exp": now + 3600,
                                        "session_id": s["sessionId"], "aud": s["sandboxIdentity"]})
    targets = {DIRECT: (VENVS["this repo's SDK"], ["direct", url, token]),
               **{f"{name} via Router": (py, ["session", "kwarm", s["sessionId"]]) for name, py in VENVS.items()}}
    samples: dict[str, Samples] = {t: {"execute": [], "run_code": [], "download": []} for t in targets}
    for _ in range(ROUNDS):
        for target, (py, args) in targets.items():
            for call, v in run(py, sdk_env, *args, CALLS // ROUNDS).items():
                samples[target][call] += v
    requests.delete(f"{wm_url}/v1/code-interpreter/sessions/{s['sessionId']}", timeout=60)
    return samples


def full_pool_env(env: dict[str, str], metrics: str, gauge: str) -> dict[str, str]:
    """`env` for `sessions` runs that wait, before each claim, for kwarm's `gauge` to show all
    POOL warm sandboxes."""
    needle = f'agentcube_workload_manager_{gauge}{{namespace="default",name="kwarm"}} {POOL}'
    return {**env, "BENCH_FULL_URL": metrics, "BENCH_FULL_NEEDLE": needle}


def from_full(r: Samples) -> str:
    """How many claims (after the first) found the pool full within 30 s of asking."""
    return f"from a full pool: {int(sum(r['full']))} / {len(r['full'])}"


def main() -> None:
    t = Table(f"Sessions on the Kubernetes backend (release binaries, real control plane + agent-sandbox v1.0.1, "
              f"process kubelet; {SESSIONS} sessions each)")
    with procs("kube") as p:
        cluster, kubeconfig = testcluster.start(binary("test-cluster"), RELEASE, p.tmp / "cluster",
                                                 p.tmp / "cluster.log",
                                                 ["--keep"] if os.environ.get("BENCH_KEEP") else [])
        p.started.append(cluster)
        kubectl = testcluster.kubectl(kubeconfig)
        subprocess.run(kubectl + ["create", "namespace", "agentcube"], check=True, capture_output=True)
        subprocess.run(kubectl + ["apply", "-f", "-"], input=DEFINITIONS, text=True, check=True, capture_output=True)
        redis_port, wm, router, wm_metrics = free_port(), free_port(), free_port(), free_port()
        p.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                "redis.log")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "AGENTCUBE_NAMESPACE": "agentcube", "RUST_LOG": "warn",
               "REDIS_ADDR": f"127.0.0.1:{redis_port}", "REDIS_PASSWORD_REQUIRED": "false",
               "WORKLOAD_MANAGER_URL": f"http://127.0.0.1:{wm}"}
        r = p.start([binary("router"), "--port", str(router), "--bind", "127.0.0.1", "--metrics-port", "0"],
                    "router.log", env=env)
        wait_http(f"http://127.0.0.1:{router}/health/ready", proc=r)
        wm_args = [binary("workload-manager"), "--backend", "kubernetes", "--port", str(wm), "--bind", "127.0.0.1",
                   "--metrics-port", str(wm_metrics)]
        w = p.start(wm_args, "wm.log", env=env)
        wm_url, router_url = f"http://127.0.0.1:{wm}", f"http://127.0.0.1:{router}"
        wait_http(f"{wm_url}/health", proc=w)
        wait_until("the warm pool filling", lambda: pool_ready(kubectl) >= POOL)
        sdk_env = {**os.environ, "WORKLOAD_MANAGER_URL": wm_url, "ROUTER_URL": router_url}
        sdk_env.pop("PYTHONPATH", None)
        sdk = VENVS["this repo's SDK"]
        samples = sdk_calls(p, kubectl, wm_url, sdk_env)
        for call in ("execute", "run_code", "download"):
            d50 = median(samples[DIRECT][call])
            for target, v in samples.items():
                v50 = median(v[call])
                note = "baseline" if target == DIRECT else f"÷ direct {v50 / d50:.2f} (goal ≤ 1.2)"
                t.row(f"{call}: {target} p50 / p99 ({len(v[call])})", f"{ms(v50)} / {ms(pct(v[call], 0.99))}", note)
        base = samples["this repo's SDK via Router"]["execute"]
        b50 = median(base)
        # A pause for the control plane's writes after each claim to settle, and then each
        # claim waits for a full pool (the Workload Manager's gauge): it finds a ready member.
        gauge = f"http://127.0.0.1:{wm_metrics}/metrics"
        pool_env = full_pool_env(sdk_env, gauge, "warm_pool_ready")
        warm_run = run(sdk, pool_env, "sessions", "kwarm", SESSIONS, 1.5)
        # The same claims with the first call 0.3 s after the constructor: what the first call
        # pays for the control plane's writes that follow a claim (on these same CPUs).
        settled_run = run(sdk, pool_env, "sessions", "kwarm", SETTLED, 1.5, 0.3)
        cold_run = run(sdk, sdk_env, "sessions", "kcold", SESSIONS, 0.2)
        warm, cold = warm_run["create"], cold_run["create"]
        filled = pool_ready(kubectl)
        share = controller_share(p.tmp / "cluster/control-plane/audit.log")
        # The same warm-pool sessions with standby claims: the Workload Manager restarted with
        # one standby claim per warm Sandbox (standby claims are carved out of the pool's size:
        # the SandboxWarmPool drops to 0 replicas and each replacement claim gets a Sandbox
        # agent-sandbox starts for it); the pause lets the standby claims refill.
        p.stop(w)
        w = p.start(wm_args + ["--standby-claims", str(POOL)], "wm-standby.log", env=env)
        wait_http(f"{wm_url}/health", proc=w)
        wait_until("the standby claims binding", lambda: standby_bound(kubectl) >= POOL)
        standby_run = run(sdk, full_pool_env(sdk_env, gauge, "standby_claims_ready"), "sessions", "kwarm",
                          SESSIONS, 1.5)
        standby = standby_run["create"]
        t.row(f"warm-pool claim: constructor → first PicoD answer p50 / p99 ({SESSIONS})",
              f"{ms(median(warm))} / {ms(pct(warm, 0.99))}",
              f"÷ an execute via Router {median(warm) / b50:.1f} (goal p50 ≤ 20 ms); {from_full(warm_run)}")
        t.row(f"warm-pool session with --standby-claims {POOL}: constructor → first PicoD answer p50 / p99 "
              f"({SESSIONS})", f"{ms(median(standby))} / {ms(pct(standby, 0.99))}",
              f"÷ an execute via Router {median(standby) / b50:.1f}; ÷ warm claim "
              f"{median(standby) / median(warm):.2f} (goal p50 ≤ 20 ms); {from_full(standby_run)}")
        t.row(f"cold create (Sandbox → pod): constructor → first PicoD answer p50 / p99 ({SESSIONS})",
              f"{ms(median(cold))} / {ms(pct(cold, 0.99))}", f"warm ÷ cold {median(warm) / median(cold):.2f}")
        for what, run_of in (("warm claim", warm_run), ("standby claim", standby_run), ("cold create", cold_run)):
            c = run_of["constructor"]
            t.row(f"of a {what}: the constructor (Workload Manager create) p50 / p99",
                  f"{ms(median(c))} / {ms(pct(c, 0.99))}", "the rest is the first execute")
            first = [a - b for a, b in zip(run_of["create"], c)]
            t.row(f"after a {what}: first / second execute_command p50",
                  f"{ms(median(first))} / {ms(median(run_of['second']))}", "")
        first = [a - b for a, b in zip(settled_run["create"], settled_run["constructor"])]
        t.row(f"after a warm claim, first execute_command 0.3 s later p50 ({SETTLED})", ms(median(first)),
              "the control plane's writes after a claim run on these CPUs")
        t.row("warm pool ready members after the warm claims", f"{filled} / {POOL}", "")
        if share:
            t.row(f"of a warm claim: claim created → agent-sandbox wrote its status p50 / p99 ({len(share)})",
                  f"{ms(median(share))} / {ms(pct(share, 0.99))}", "the controller's part")
        requests.get(f"{wm_url}/health", timeout=2)
        assert cluster.stdin is not None
        cluster.stdin.close()
    t.print()


if __name__ == "__main__":
    main()
