"""Runs inside a venv with an AgentCube SDK (this repo's or upstream's `agentcube-sdk` 0.1.0) and
prints per-call latencies as JSON. Modes:

- `router NAME N [SETTLE]`: `CodeInterpreterClient(name=NAME)`, then SETTLE seconds (0 by
  default) for what the session's create set off (a warm pool's refill) to finish, as it has for
  the baseline's session; N x `execute_command("true")` and N x `run_code("python", "print(1)")`
  through the Router (the SDK's own HTTP stack).
- `direct SOCKET|URL TOKEN N`: the very same HTTP calls the SDK makes, with the same
  `requests.Session`, straight to the sandbox's PicoD on its Unix socket or at `http://IP:PORT`
  (the baseline).
- `sessions NAME N [PAUSE [SETTLE]]`: N x (create a session, wait SETTLE seconds (0 by default),
  first `execute_command("true")`, stop, wait PAUSE seconds, 0.3 by default); the time from the
  constructor to the first answer, the settle time left out.
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import time

import requests
import urllib3
from requests.adapters import HTTPAdapter

WARMUP = 20


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, **kw):
        super().__init__("localhost", **kw)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._path)
        self.sock = s


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str):
        super().__init__("localhost")
        self._path = path

    def _new_conn(self):
        return _UnixConnection(self._path)


class UnixAdapter(HTTPAdapter):
    """`requests` over a Unix socket (the pool is kept, as the SDK's is over TCP)."""

    def __init__(self, path: str):
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, *a, **kw):
        return self._pool

    def get_connection(self, *a, **kw):
        return self._pool


def timed(fn, n: int) -> list:
    for _ in range(WARMUP):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def router(name: str, n: int, settle: float = 0.0) -> dict:
    from agentcube import CodeInterpreterClient

    with CodeInterpreterClient(name=name) as c:
        time.sleep(settle)
        return {
            "execute": timed(lambda: c.execute_command("true"), n),
            "run_code": timed(lambda: c.run_code("python", "print(1)"), n),
        }


def direct(target: str, token: str, n: int) -> dict:
    s = requests.Session()
    if target.startswith("http://"):
        base = target.rstrip("/")
    else:
        base = "http://picod"
        s.mount("http://picod/", UnixAdapter(target))
    s.headers.update({"Authorization": f"Bearer {token}"})

    def execute(cmd):
        r = s.post(f"{base}/api/execute", json={"command": cmd, "timeout": "120s"}, timeout=(5, 122))
        r.raise_for_status()
        return r.json()

    def run_code():
        # What the SDK's run_code does: write the script, then run it.
        name = f"script_{int(time.time() * 1000)}.py"
        r = s.post(f"{base}/api/files", json={"path": name, "content": base64.b64encode(b"print(1)").decode(),
                                                  "mode": "0644"}, timeout=(5, 120))
        r.raise_for_status()
        execute(["python3", name])

    return {"execute": timed(lambda: execute(["true"]), n), "run_code": timed(run_code, n)}


def sessions(name: str, n: int, pause: float = 0.3, settle: float = 0.0) -> dict:
    from agentcube import CodeInterpreterClient

    out, ctor, second = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        c = CodeInterpreterClient(name=name)
        ctor.append(time.perf_counter() - t0)
        time.sleep(settle)
        t1 = time.perf_counter()
        c.execute_command("true")
        out.append(ctor[-1] + time.perf_counter() - t1)
        t1 = time.perf_counter()
        c.execute_command("true")
        second.append(time.perf_counter() - t1)
        c.stop()
        time.sleep(pause)  # let a warm pool refill: a claim, not a cold start, is measured
    return {"create": out, "constructor": ctor, "second": second}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "router":
        result = router(sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:5]))
    elif mode == "direct":
        result = direct(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        result = sessions(sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:6]))
    print(json.dumps(result))
