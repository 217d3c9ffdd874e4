"""Instructions the release `router` binary executes per proxied request, counted by valgrind's
callgrind (deterministic, unlike timings on a shared machine): one keep-alive client sends N
`GET …/invocations/health` to one PicoD through the Router (Redis store, one session); counting
starts after start-up and 50 warm-up requests. The baselines, counted the same way: an nginx
worker (one process, `master_process off`) proxying `GET /health` to the same PicoD, and
`examples/bare-proxy` — the least a proxy built on hyper's server and client does per request (no
session lookup, token, limits or metrics; the Router itself uses hyper's server only). Prints the
counts per request and the Router's functions that cost most (self cost). Needs valgrind
(`apt-get install valgrind`)."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import sys
from pathlib import Path

from harness import RELEASE, Procs, Table, free_port, procs, wait_http
from http_proxy import NGINX, ROUTER_ENV, picod_with_session, router_cmd

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
PATH = "/v1/namespaces/default/code-interpreters/bench/invocations/health"


def requests_through(port: int, n: int, path: str = PATH) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n):
        c.request("GET", path, headers={"x-agentcube-session-id": "s1"})
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise SystemExit(f"router answered {r.status}")
    c.close()


def totals(out: Path) -> int:
    return next(int(line.split()[1]) for line in out.read_text().splitlines() if line.startswith("totals:"))


def counted(p: Procs, name: str, cmd: list[str], port: int, ready: str, path: str = PATH,
            env: dict[str, str] | None = None) -> Path:
    """Runs `cmd` under callgrind, sends it 50 warm-up requests, then counts N more; the profile."""
    out = p.tmp / f"{name}.callgrind"
    proc = p.start(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                    *cmd], f"{name}.log", env=env)
    wait_http(f"http://127.0.0.1:{port}{ready}", secs=120, proc=proc)
    requests_through(port, 50, path)
    subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
    requests_through(port, N, path)
    proc.terminate()
    proc.wait(timeout=120)
    return out


def bare_count(p: Procs, picod_port: int) -> int:
    """Instructions of `examples/bare-proxy` for the same N requests to the same PicoD."""
    bare = RELEASE / "examples" / "bare-proxy"
    if not bare.exists():
        raise SystemExit(f"{bare} missing: `make bench-instructions` builds it")
    port = free_port()
    cmd = [str(bare), str(port), str(picod_port), PATH.removesuffix("/health")]
    return totals(counted(p, "bare", cmd, port, PATH))


def nginx_count(p: Procs, picod_port: int) -> int:
    """Instructions of one nginx worker process for N proxied `GET /health`."""
    port = free_port()
    # One worker process and no master: callgrind counts the one process that proxies.
    (p.tmp / "nginx.conf").write_text(NGINX.format(tmp=p.tmp, picod=picod_port, port=port, master="off", workers=1))
    cmd = ["nginx", "-c", str(p.tmp / "nginx.conf"), "-p", str(p.tmp)]
    return totals(counted(p, "nginx", cmd, port, "/health", "/health"))


def main() -> None:
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    with procs("instructions") as p:
        picod_port, redis_port, router_port = free_port(), free_port(), free_port()
        picod_with_session(p, picod_port, redis_port)
        out = counted(p, "router", router_cmd(p, router_port, redis_port), router_port, "/health/ready",
                      env=ROUTER_ENV)
        total = totals(out)
        top = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True).stdout
        nginx_total = nginx_count(p, picod_port)
        bare_total = bare_count(p, picod_port)
    t = Table(f"Router instructions per proxied request (callgrind, {N} requests, one keep-alive client)")
    t.row("instructions per request", f"{total / N:,.0f}", "release build; deterministic")
    t.row("nginx worker, same requests to the same PicoD", f"{nginx_total / N:,.0f}",
          f"router ÷ nginx {total / nginx_total:.2f}")
    t.row("bare hyper proxy (examples/bare-proxy), same requests", f"{bare_total / N:,.0f}",
          f"router ÷ bare {total / bare_total:.2f} (hyper both ways; the Router's client side is its own)")
    rows = [line for line in top.splitlines() if "(" in line and "%)" in line and "PROGRAM TOTALS" not in line]
    for line in rows[:12]:
        count, rest = line.split(None, 1)
        name = rest.split(")", 1)[1].strip().split(" [")[0].split(":", 1)[-1]
        t.row(f"self: {name[:90]}", f"{int(count.replace(',', '')) / N:,.0f}", "per request")
    t.print()


if __name__ == "__main__":
    main()
