"""Soak: 60 s of mixed traffic at a fixed rate against `agentcube up` (release, a separate
process), while 5% of the clients are hostile (slowloris headers, stalled uploads, idle
connections, malformed requests). Prints the error rate and latency of the well-behaved clients."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import requests

from harness import REPO, Table, binary, free_port, median, pct, procs, wait_http

SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
RATE = 100  # well-behaved requests per second, in total
GOOD = 76  # well-behaved clients (threads, a session and sandbox each)
HOSTILE = 1  # clients of each of the 4 hostile kinds: 4 of 80 clients, 5%


def good_client(url: str, wm: str, stop: float, lat: list[float], errors: list[float]) -> None:
    s = requests.Session()
    r = s.post(f"{wm}/v1/code-interpreter", json={"name": "soak", "namespace": "default"}).json()
    if "sessionId" not in r:
        print(f"a well-behaved client got no session: {r}", file=sys.stderr)
        errors.append(0.0)
        return
    s.headers["x-agentcube-session-id"] = r["sessionId"]
    period, nxt = GOOD / RATE, time.time()
    while nxt < stop:
        time.sleep(max(0.0, nxt - time.time()))
        t0 = time.perf_counter()
        try:
            ok = s.post(url, json={"command": ["true"]}, timeout=10).status_code == 200
        except requests.RequestException:
            ok = False
        (lat if ok else errors).append(time.perf_counter() - t0)
        nxt += period
    s.delete(f"{wm}/v1/code-interpreter/sessions/{r['sessionId']}")


def hostile(host: str, port: int, stop: float, kind: str) -> None:
    held = []
    while time.time() < stop:
        try:
            c = socket.create_connection((host, port), timeout=2)
            if kind == "slowloris":
                c.sendall(b"POST /v1/namespaces/default/code-interpreters/soak/invocations/api/execute HTTP/1.1\r\nHost: localhost\r\n")
            elif kind == "stalled-upload":
                c.sendall(b"POST /v1/namespaces/default/code-interpreters/soak/invocations/api/files HTTP/1.1\r\n"
                          b"Host: localhost\r\nContent-Length: 1000000\r\n\r\n{")
            elif kind == "malformed":
                c.sendall(b"GET /v1/namespaces/default/code-interpreters/soak/invocations/ HTTP/1.1\r\nHost: localhost\r\n"
                          b"x-agentcube-session-id: \xff\r\nConnection: close\r\n\r\n")
            held.append(c)
            if len(held) > 300:
                held.pop(0).close()
        except OSError:
            pass
        time.sleep(0.02)
    for c in held:
        c.close()


def main() -> None:
    with procs("soak") as p:
        wm, router, metrics = free_port(), free_port(), free_port()
        up = p.start([binary("agentcube"), "up", "--manifests", str(REPO / "bench/manifests"), "--wm-port", str(wm),
                      "--router-port", str(router), "--metrics-port", str(metrics), "--state-dir", str(p.tmp / "state"),
                      "--header-timeout", "5s", "--body-idle-timeout", "10s", "--default-memory-limit", "64Mi"], "up.log",
                     env={**os.environ, "RUST_LOG": "warn"})
        wm_url, router_url = f"http://127.0.0.1:{wm}", f"http://127.0.0.1:{router}"
        wait_http(f"{router_url}/health/ready", proc=up)
        url = f"{router_url}/v1/namespaces/default/code-interpreters/soak/invocations/api/execute"
        stop = time.time() + SECS
        lat: list[float] = []
        errors: list[float] = []
        threads = [threading.Thread(target=good_client, args=(url, wm_url, stop, lat, errors)) for _ in range(GOOD)]
        threads += [threading.Thread(target=hostile, args=("127.0.0.1", router, stop, kind))
                    for kind in ("slowloris", "stalled-upload", "idle", "malformed") for _ in range(HOSTILE)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        text = requests.get(f"http://127.0.0.1:{metrics}/metrics").text
        p.stop(up, sig=2)
    total = len(lat) + len(errors)
    t = Table(f"Soak: {SECS} s at {RATE} req/s from {GOOD} clients plus {4 * HOSTILE} hostile ones ({400 * HOSTILE / (GOOD + 4 * HOSTILE):.0f}%) on `agentcube up`")
    t.row("well-behaved requests", f"{total}", f"errors {len(errors)} ({100 * len(errors) / max(total, 1):.2f}%)")
    if lat:
        t.row("well-behaved latency p50 / p99", f"{median(lat) * 1e3:.2f} / {pct(lat, 0.99) * 1e3:.2f} ms")
    for name in ("header_timeouts", "idle_closed", "refused"):
        line = next((l for l in text.splitlines() if l.startswith(f"agentcube_router_connections_{name}_total")), "")
        t.row(f"router connections {name.replace('_', ' ')}", line.split()[-1] if line else "?")
    t.print()


if __name__ == "__main__":
    main()
