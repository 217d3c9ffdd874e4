"""SDK-level: what a user of the Python SDK feels on the embedded default (`agentcube up`, release
build, a separate process). Median and p99 of `execute_command("true")` and
`run_code("python", "print(1)")` with this repo's SDK and the unmodified upstream `agentcube-sdk`
0.1.0, each in its own venv and process, against the same HTTP calls made with the SDK's HTTP stack
straight to the sandbox's PicoD, and with this repo's SDK through nginx proxying to that PicoD (what
one proxy hop costs on this machine, whoever the proxy is), in interleaved rounds (five times) so
the shared machine's drift hits every target alike. Every target calls the same sandbox: the SDKs
are given its session's id (as a client resuming a session is), so no target pays for another
sandbox's placement or for a warm pool refilling beside it. Then session creation: a warm-pool
claim and a cold start, from the SDK's constructor to the first answer of PicoD."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from harness import REPO, Table, binary, free_port, median, pct, procs, wait_http

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
SESSIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 50
VENVS = {"this repo's SDK": REPO / ".venv/bin/python", "upstream agentcube-sdk 0.1.0": REPO / ".venv-upstream/bin/python"}
CLIENT = str(Path(__file__).with_name("sdk_client.py"))
ROUNDS = 5
# nginx in front of one sandbox's PicoD, with the Router's path prefix stripped and the sandbox's
# token set, so an SDK pointed at it runs every call on that sandbox (the session id it sends is
# not read). Root workers: the sandbox's socket is root's.
NGINX = """daemon off;
master_process off;
user root;
error_log {tmp}/nginx.err;
pid {tmp}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  upstream picod {{ server unix:{sock}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      rewrite ^/v1/namespaces/[^/]+/code-interpreters/[^/]+/invocations(/.*)$ $1 break;
      proxy_pass http://picod;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
    }}
  }}
}}
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(private_pem: Path, claims: dict[str, Any]) -> str:
    """An RS256 JWT signed with openssl (the Router's key), as the Router would sign it."""
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(private_pem)], input=head.encode(),
                         capture_output=True, check=True).stdout
    return head + "." + b64url(sig)


Samples = dict[str, list[float]]
"""Seconds per call, by kind of call (what `sdk_client.py` prints)."""


def run(python: Path, env: dict[str, str], *args: object) -> Samples:
    out = subprocess.run([str(python), CLIENT, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=900, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"{python} {args}: {out.stderr[-2000:]}")
    samples: Samples = json.loads(out.stdout.strip().splitlines()[-1])
    return samples


def wait_pool(metrics: str, name: str, size: int, secs: float = 60) -> None:
    deadline = time.time() + secs
    needle = f'agentcube_workload_manager_warm_pool_ready{{namespace="default",name="{name}"}} {size}'
    while time.time() < deadline:
        if needle in requests.get(metrics, timeout=2).text:
            return
        time.sleep(0.2)
    raise SystemExit(f"warm pool {name} did not fill")


def ms(v: float) -> str:
    return f"{v * 1e3:.2f} ms"


def main() -> None:
    t = Table(f"SDK calls on `agentcube up` (release, separate processes; {N} calls each in {ROUNDS} interleaved "
              "rounds, each after 20 warm-up calls; every target on one sandbox)")
    with procs("sdk") as p:
        wm, router, metrics = free_port(), free_port(), free_port()
        up = p.start([binary("agentcube"), "up", "--manifests", str(REPO / "bench/manifests"), "--wm-port", str(wm),
                      "--router-port", str(router), "--metrics-port", str(metrics), "--state-dir", str(p.tmp / "state"),
                      "--identity-dir", str(p.tmp / "id")], "up.log", env={**os.environ, "RUST_LOG": "warn"})
        wm_url, router_url = f"http://127.0.0.1:{wm}", f"http://127.0.0.1:{router}"
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        wait_http(f"{router_url}/health/ready", proc=up)
        wait_pool(metrics_url, "warm", 4)
        env = {**os.environ, "WORKLOAD_MANAGER_URL": wm_url, "ROUTER_URL": router_url}
        env.pop("PYTHONPATH", None)
        # The baseline's sandbox: a session of the same definition, reached on its own socket.
        s = requests.post(f"{wm_url}/v1/code-interpreter", json={"name": "warm", "namespace": "default"}).json()
        sock = s["entryPoints"][0]["endpoint"].removeprefix("unix:")
        now = int(time.time())
        token = sign(p.tmp / "id/private.pem", {"iss": "agentcube-router", "iat": now, "exp": now + 3600,
                                                 "session_id": s["sessionId"], "aud": s["sandboxIdentity"]})
        nginx_port = free_port()
        (p.tmp / "nginx.conf").write_text(NGINX.format(tmp=p.tmp, sock=sock, token=token, port=nginx_port))
        nginx = p.start(["nginx", "-c", str(p.tmp / "nginx.conf"), "-p", str(p.tmp)], "nginx.log")
        wait_http(f"http://127.0.0.1:{nginx_port}/health", proc=nginx)
        wait_pool(metrics_url, "warm", 4)  # the session's claim refilled: nothing starts beside the rounds
        via_nginx = {**env, "ROUTER_URL": f"http://127.0.0.1:{nginx_port}"}
        ours = VENVS["this repo's SDK"]
        live = ["session", "warm", s["sessionId"]]
        targets = {"direct to PicoD (requests.Session)": (ours, env, ["direct", sock, token]),
                   "this repo's SDK via nginx (one hop, no routing)": (ours, via_nginx, live),
                   **{f"{name} via Router": (py, env, live) for name, py in VENVS.items()}}
        samples: dict[str, Samples] = {t: {"execute": [], "run_code": [], "download": []} for t in targets}
        for _ in range(ROUNDS):
            for target, (py, e, args) in targets.items():
                for call, v in run(py, e, *args, N // ROUNDS).items():
                    samples[target][call] += v
        p.stop(nginx)
        for call in ("execute", "run_code", "download"):
            d50 = median(samples["direct to PicoD (requests.Session)"][call])
            for target, by_call in samples.items():
                v50, v99 = median(by_call[call]), pct(by_call[call], 0.99)
                note = "baseline" if target.startswith("direct") else f"÷ direct {v50 / d50:.2f}"
                if target.endswith("via Router"):
                    note += " (goal ≤ 1.2)"
                t.row(f"{call}: {target} p50 / p99", f"{ms(v50)} / {ms(v99)}", note)
        requests.delete(f"{wm_url}/v1/code-interpreter/sessions/{s['sessionId']}")
        needle = f'agentcube_workload_manager_warm_pool_ready{{namespace="default",name="warm"}} 4'
        warm_run = run(VENVS["this repo's SDK"], {**env, "BENCH_FULL_URL": metrics_url, "BENCH_FULL_NEEDLE": needle},
                       "sessions", "warm", SESSIONS)
        warm, full = warm_run["create"], warm_run["full"]
        cold = run(VENVS["this repo's SDK"], env, "sessions", "cold", SESSIONS)["create"]
        t.row(f"session from the warm pool: constructor → first answer p50 / p99 ({SESSIONS})",
              f"{ms(median(warm))} / {ms(pct(warm, 0.99))}",
              f"goal p50 ≤ 20 ms; from a full pool: {int(sum(full))} / {len(full)}")
        t.row(f"cold session: constructor → first answer p50 / p99 ({SESSIONS})",
              f"{ms(median(cold))} / {ms(pct(cold, 0.99))}", f"warm ÷ cold {median(warm) / median(cold):.2f}")
        p.stop(up, sig=2)
    t.print()


if __name__ == "__main__":
    main()
