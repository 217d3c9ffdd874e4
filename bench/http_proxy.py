"""HTTP-level: the `router` binary against nginx, both proxying to the same PicoD, all separate
processes, driven by wrk (keep-alive). Added latency (p50/p99 at 1 connection) and saturation
throughput (32 connections) for both, as ratios against the same run's baselines. The targets are
measured in interleaved rounds (medians reported), so the shared machine's drift during the run hits
each of them alike rather than whichever ran in a slow minute. Also a second
router with OIDC on (Ory Hydra as the issuer, one bearer token reused as a client would): what
end-user authentication adds per request."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import requests

from harness import REPO, Procs, Table, WrkResult, binary, free_port, procs, wait_http, wrk

HYDRA = REPO / ".cache/oidc/bin/hydra"

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
ROUNDS = 5


def record(session: str, endpoint: str) -> str:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    return json.dumps({"kind": "Sandbox", "sandboxId": "bench", "sandboxNamespace": "default", "name": "bench",
                       "entryPoints": [{"path": "/", "protocol": "HTTP", "endpoint": endpoint}],
                       "sessionId": session, "createdAt": now, "expiresAt": later, "idleTimeout": "8h0m0s",
                       "status": "ready"})


NGINX = """daemon off;
master_process {master};
worker_processes {workers};
error_log {tmp}/nginx.err;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream picod {{ server 127.0.0.1:{picod}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://picod;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def picod_with_session(p: Procs, picod_port: int, redis_port: int) -> None:
    """Starts a PicoD (no auth) and a redis-server holding session `s1` that points at it."""
    picod = p.start([binary("picod"), "--listen", f"127.0.0.1:{picod_port}", "--insecure-no-auth",
                     "--workspace", str(p.tmp / "ws")], "picod.log", env={"RUST_LOG": "warn"})
    p.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(p.tmp)], "redis.log")
    wait_http(f"http://127.0.0.1:{picod_port}/health", proc=picod)
    time.sleep(0.2)
    cli = ["redis-cli", "-p", str(redis_port)]
    subprocess.run(cli + ["SET", "session:s1", record("s1", f"127.0.0.1:{picod_port}")], check=True,
                   capture_output=True)
    subprocess.run(cli + ["ZADD", "session:expiry", str(int(time.time()) + 86400), "s1"], check=True,
                   capture_output=True)


# The standalone Router of these benchmarks: sessions from `picod_with_session`'s Redis, no
# Workload Manager behind it (every session it is asked for exists).
ROUTER_ENV = {"WORKLOAD_MANAGER_URL": "http://127.0.0.1:9", "RUST_LOG": "warn"}


def router_cmd(p: Procs, port: int, redis_port: int, *extra: str) -> list[str]:
    """The `router` command line on `port`, its store the Redis at `redis_port`."""
    return [binary("router"), "--port", str(port), "--bind", "127.0.0.1", "--metrics-port", "0",
            "--max-concurrent-requests", "0", "--identity-dir", str(p.tmp / "id"),
            "--store", f"redis://127.0.0.1:{redis_port}", *extra]


def main() -> None:
    with procs("http") as p:
        picod_port, redis_port, router_port, nginx_port = (free_port() for _ in range(4))
        picod_with_session(p, picod_port, redis_port)
        router = p.start(router_cmd(p, router_port, redis_port), "router.log", env=ROUTER_ENV)
        oidc_port, bearer = free_port(), oidc_token(p)
        oidc = p.start(router_cmd(p, oidc_port, redis_port, "--jwt-issuer-url", bearer[0], "--jwt-role-claim", "scp",
                                  "--jwt-required-role", "sandbox:invoke"), "router-oidc.log", env=ROUTER_ENV)
        (p.tmp / "nginx.conf").write_text(NGINX.format(tmp=p.tmp, picod=picod_port, port=nginx_port, master="on",
                                                       workers=2))
        nginx = p.start(["nginx", "-c", str(p.tmp / "nginx.conf"), "-p", str(p.tmp)], "nginx.log")
        wait_http(f"http://127.0.0.1:{router_port}/health/ready", proc=router)
        wait_http(f"http://127.0.0.1:{nginx_port}/health", proc=nginx)
        wait_http(f"http://127.0.0.1:{oidc_port}/health/ready", proc=oidc)
        urls = {
            "direct": (f"http://127.0.0.1:{picod_port}/health", {}),
            "nginx": (f"http://127.0.0.1:{nginx_port}/health", {}),
            "router": (f"http://127.0.0.1:{router_port}/v1/namespaces/default/code-interpreters/bench/invocations/health",
                       {"x-agentcube-session-id": "s1"}),
            "router+oidc": (f"http://127.0.0.1:{oidc_port}/v1/namespaces/default/code-interpreters/bench/invocations/health",
                            {"x-agentcube-session-id": "s1", "Authorization": f"Bearer {bearer[1]}"}),
        }
        for name, (url, h) in urls.items():  # warm up connections and caches
            wrk(url, 4, 2, h)
        per = max(1, round(SECS / ROUNDS))
        lat, lat_rounds = interleaved(urls, 1, per, 1)
        sat, sat_rounds = interleaved(urls, 32, per, 2)
    t = Table(f"HTTP proxying: router vs nginx to one PicoD (GET /health, wrk keep-alive, "
              f"medians of {ROUNDS} interleaved {per} s runs)")
    for n in ("direct", "nginx", "router", "router+oidc"):
        t.row(f"{n}: p50 / p99 at c=1", f"{lat[n].p50_us:.0f} / {lat[n].p99_us:.0f} µs", f"errors {lat[n].errors}")
    add = {n: (lat[n].p50_us - lat["direct"].p50_us, lat[n].p99_us - lat["direct"].p99_us) for n in ("nginx", "router")}
    def us(v: float) -> str:  # a tail below the direct run's tail is noise, not a speed-up
        return f"{v:.0f}" if v >= 0 else "<0 (noise)"

    t.row("nginx added p50 / p99", f"{us(add['nginx'][0])} / {us(add['nginx'][1])} µs")
    t.row("router added p50 / p99", f"{us(add['router'][0])} / {us(add['router'][1])} µs")
    ratio = add["router"][0] / add["nginx"][0] if add["nginx"][0] > 0 else float("nan")
    def added_ratio(r: dict[str, WrkResult]) -> float:
        nginx = r["nginx"].p50_us - r["direct"].p50_us
        return (r["router"].p50_us - r["direct"].p50_us) / nginx if nginx > 0 else float("nan")

    t.row("router added ÷ nginx added (p50)", f"{ratio:.2f}",
          f"goal ≤ 1.0; {spread([added_ratio(r) for r in lat_rounds])}")
    oidc_add = lat["router+oidc"].p50_us - lat["router"].p50_us
    t.row("OIDC added over router (p50)", f"{us(oidc_add)} µs", "goal: microseconds (verified-token cache)")
    for n in ("direct", "nginx", "router", "router+oidc"):
        t.row(f"{n}: saturation at c=32", f"{sat[n].rps:,.0f} req/s", f"errors {sat[n].errors}")
    t.row("router ÷ nginx saturation", f"{sat['router'].rps / sat['nginx'].rps:.2f}",
          f"goal ≥ 1.0; {spread([r['router'].rps / r['nginx'].rps for r in sat_rounds])}")
    t.row("router ÷ direct saturation", f"{sat['router'].rps / sat['direct'].rps:.2f}", "goal ≥ 0.6")
    t.print()


def interleaved(urls: dict[str, tuple[str, dict[str, str]]], connections: int, secs: int,
                threads: int) -> tuple[dict[str, WrkResult], list[dict[str, WrkResult]]]:
    """ROUNDS runs of every target in turn; per target the median p50, p99 and rate, errors summed;
    and the rounds themselves (for the spread of per-round ratios)."""
    rounds = [{n: wrk(u, connections, secs, h, threads=threads) for n, (u, h) in urls.items()}
              for _ in range(ROUNDS)]
    med = statistics.median
    return {n: WrkResult(med(r[n].rps for r in rounds), med(r[n].p50_us for r in rounds),
                         med(r[n].p99_us for r in rounds), sum(r[n].errors for r in rounds)) for n in urls}, rounds


def spread(values: list[float]) -> str:
    """min–max of per-round values: how far one round's ratio can be from the median here."""
    ok = [v for v in values if v == v]
    return f"per round {min(ok):.2f}–{max(ok):.2f}" if ok else ""


def oidc_token(p: Procs) -> tuple[str, str]:
    """Starts Ory Hydra and returns (issuer, an admin's access token for audience agentcube-api)."""
    public, admin = free_port(), free_port()
    issuer = f"http://127.0.0.1:{public}"
    env = {"DSN": "memory", "SECRETS_SYSTEM": "agentcube-bench-secret-0123", "URLS_SELF_ISSUER": issuer,
           "STRATEGIES_ACCESS_TOKEN": "jwt", "SERVE_PUBLIC_HOST": "127.0.0.1", "SERVE_PUBLIC_PORT": str(public),
           "SERVE_ADMIN_HOST": "127.0.0.1", "SERVE_ADMIN_PORT": str(admin), "LOG_LEVEL": "warn"}
    hydra = p.start([str(HYDRA), "serve", "all", "--dev"], "hydra.log", env=env, cwd=p.tmp)
    wait_http(f"http://127.0.0.1:{admin}/health/ready", proc=hydra)
    scope = "sandbox:invoke admin"
    requests.post(f"http://127.0.0.1:{admin}/admin/clients", json={
        "client_id": "bench", "client_secret": "bench-secret-0123456789", "grant_types": ["client_credentials"],
        "scope": scope, "audience": ["agentcube-api"], "token_endpoint_auth_method": "client_secret_post"},
        timeout=10).raise_for_status()
    r = requests.post(f"{issuer}/oauth2/token", data={"grant_type": "client_credentials", "client_id": "bench",
                      "client_secret": "bench-secret-0123456789", "scope": scope, "audience": "agentcube-api"},
                      timeout=10)
    r.raise_for_status()
    return issuer, r.json()["access_token"]


if __name__ == "__main__":
    main()
