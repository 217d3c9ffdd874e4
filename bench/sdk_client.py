"""Runs inside a venv with an AgentCube SDK (this repo's or upstream's `agentcube-sdk` 0.1.0) and
prints per-call latencies as JSON. Modes:

- `session NAME SESSION_ID N`: `CodeInterpreterClient(name=NAME, session_id=SESSION_ID)` (a live
  session: both SDKs reuse it and create nothing), then N x `execute_command("true")` and N x
  `run_code("python", "print(1)")` and N x `download_file` of a 4 MiB binary file (random bytes,
  made once in the sandbox: the kind of file an SDK's `requests`, which always asks for gzip, must
  not wait on an encoder for) through the SDK's Router URL (the SDK's own HTTP stack). The session
  is left as it was, but for that file.
- `direct SOCKET|URL TOKEN N`: the very same HTTP calls the SDK makes, with the same
  `requests.Session`, straight to the sandbox's PicoD on its Unix socket or at `http://IP:PORT`
  (the baseline).
- `sessions NAME N [PAUSE [SETTLE]]`: N x (create a session, wait SETTLE seconds (0 by default),
  first `execute_command("true")`, stop, wait PAUSE seconds, 0.3 by default); the time from the
  constructor to the first answer, the settle time left out. With `BENCH_FULL_URL` and
  `BENCH_FULL_NEEDLE` set (a metrics URL and the gauge line of a full warm pool), each session
  after the first also waits, after its pause and up to 30 s, until that line shows, then 0.3 s
  more (so the servers are as idle before the create as without the wait): a claim from a full
  pool is measured, not one from a pool still refilling; `full` counts the sessions that began so.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time
from typing import Any, Callable

import requests
import urllib3
from requests.adapters import HTTPAdapter

WARMUP = 20
DOWNLOAD = "bench-download.bin"
MAKE_DOWNLOAD = ["sh", "-c", f"test -e {DOWNLOAD} || head -c 4194304 /dev/urandom > {DOWNLOAD}"]
LOCAL = f"/tmp/agentcube-bench-{os.getpid()}.bin"


class UnixAdapter(HTTPAdapter):
    """`requests` over a Unix socket by the path it takes over TCP (requests' pool manager,
    urllib3's connection pool and connection): only the socket differs, so a call straight to a
    local PicoD costs the client what the SDK's calls to the Router cost it."""

    def __init__(self, path: str):
        self._path = path
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        path = self._path

        class Connection(urllib3.connection.HTTPConnection):
            def _new_conn(self) -> socket.socket:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.timeout)
                s.connect(path)
                return s

        class Pool(urllib3.HTTPConnectionPool):
            ConnectionCls = Connection

        self.poolmanager.pool_classes_by_scheme = {"http": Pool}


def timed(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(WARMUP):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def session(name: str, session_id: str, n: int) -> dict[str, list[float]]:
    from agentcube import CodeInterpreterClient  # type: ignore[import-not-found,unused-ignore]

    c = CodeInterpreterClient(name=name, session_id=session_id)  # not stopped: the session stays
    c.execute_command(MAKE_DOWNLOAD)
    return {
        "execute": timed(lambda: c.execute_command("true"), n),
        "run_code": timed(lambda: c.run_code("python", "print(1)"), n),
        "download": timed(lambda: c.download_file(DOWNLOAD, LOCAL), n),
    }


def direct(target: str, token: str, n: int) -> dict[str, list[float]]:
    s = requests.Session()
    if target.startswith("http://"):
        base = target.rstrip("/")
    else:
        base = "http://picod"
        s.mount("http://picod/", UnixAdapter(target))
    s.headers.update({"Authorization": f"Bearer {token}"})

    def execute(cmd: list[str]) -> object:
        r = s.post(f"{base}/api/execute", json={"command": cmd, "timeout": "120s"}, timeout=(5, 122))
        r.raise_for_status()
        return r.json()

    def run_code() -> None:
        # What the SDK's run_code does: write the script, then run it.
        name = f"script_{int(time.time() * 1000)}.py"
        r = s.post(f"{base}/api/files", json={"path": name, "content": base64.b64encode(b"print(1)").decode(),
                                                  "mode": "0644"}, timeout=(5, 120))
        r.raise_for_status()
        execute(["python3", name])

    def download() -> None:
        # What the SDKs' download_file does.
        with s.get(f"{base}/api/files/{DOWNLOAD}", stream=True, timeout=(5, 120)) as r:
            r.raise_for_status()
            with open(LOCAL, "wb") as f:
                for chunk in r.iter_content(chunk_size=8192):
                    f.write(chunk)

    execute(MAKE_DOWNLOAD)
    return {"execute": timed(lambda: execute(["true"]), n), "run_code": timed(run_code, n),
            "download": timed(download, n)}


def sessions(name: str, n: int, pause: float = 0.3, settle: float = 0.0) -> dict[str, list[float]]:
    from agentcube import CodeInterpreterClient  # type: ignore[import-not-found,unused-ignore]

    out: list[float] = []
    ctor: list[float] = []
    second: list[float] = []
    full: list[float] = []
    for i in range(n):
        if i > 0 and os.environ.get("BENCH_FULL_URL"):
            full.append(1.0 if pool_full() else 0.0)
            time.sleep(0.3)
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
    return {"create": out, "constructor": ctor, "second": second, "full": full}


def pool_full(secs: float = 30) -> bool:
    """Waits until `BENCH_FULL_URL` shows `BENCH_FULL_NEEDLE`; whether it did."""
    url, needle = os.environ["BENCH_FULL_URL"], os.environ["BENCH_FULL_NEEDLE"]
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if needle in requests.get(url, timeout=2).text:
            return True
        time.sleep(0.05)
    return False


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "session":
        result = session(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "direct":
        result = direct(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        result = sessions(sys.argv[2], int(sys.argv[3]), *map(float, sys.argv[4:6]))
    if os.path.exists(LOCAL):
        os.remove(LOCAL)
    print(json.dumps(result))
