"""Shared pieces of the benchmarks: processes started in their own process group and always reaped,
free ports, readiness waits, wrk runs, percentiles and one result table. Benchmarks print; they
never fail on numbers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
RELEASE = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release"
ROUTER_KEY = (REPO / "crates/picod/tests/data/router.key.pem").read_text()
ROUTER_PUB = (REPO / "crates/picod/tests/data/router.pub.pem").read_text()
# The benchmark manifests name images this machine need not reach: sandboxes run on the host's /usr.
os.environ.setdefault("AGENTCUBE_IMAGES", "host")


def binary(name: str) -> str:
    path = RELEASE / name
    if not path.exists():
        raise SystemExit(f"{path} missing: `make bench` builds the release binaries first")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, secs: float = 30, proc: subprocess.Popen[Any] | None = None) -> None:
    import requests

    deadline = time.time() + secs
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer in {secs} s")


@dataclass
class Procs:
    """Processes of one benchmark, each in its own process group, all killed on exit."""

    tmp: Path
    started: list[subprocess.Popen[Any]] = field(default_factory=list)

    def start(self, args: Sequence[str], log: str, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[Any]:
        out = open(self.tmp / log, "w")
        p = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        self.started.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any], sig: int = signal.SIGTERM, secs: float = 30) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(secs)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def close(self) -> None:
        for p in reversed(self.started):
            self.stop(p)
            # Whatever else is left in its group (an nginx worker, a sandbox).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


@contextlib.contextmanager
def procs(name: str) -> Iterator[Procs]:
    tmp = Path(tempfile.mkdtemp(prefix=f"agentcube-bench-{name}-"))
    tmp.chmod(0o755)
    p = Procs(tmp)
    try:
        yield p
    finally:
        p.close()
        if os.environ.get("BENCH_KEEP"):
            print(f"(BENCH_KEEP: {tmp} kept)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def pct(values: Sequence[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round((len(v) - 1) * p)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --- wrk -------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    requests: int = 0  # completed in the run (wrk's count)


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _latency(text: str, label: str) -> float:
    m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, connections: int, secs: int, headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        threads: int = 1) -> WrkResult:
    """Runs wrk (keep-alive) against url; a POST of `body` as JSON when given."""
    args = ["wrk", "--latency", "-t", str(threads), "-c", str(connections), "-d", f"{secs}s"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    script = None
    if body is not None:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(json.dumps(body))}\n")
        script.close()
        args += ["-s", script.name]
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=secs + 60).stdout
    if script:
        os.unlink(script.name)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:
        raise SystemExit(f"wrk printed no rate: {out}")
    rps = float(rate.group(1))
    errs = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    return WrkResult(rps, _latency(out, "50%"), _latency(out, "99%"), errs + (int(non2xx.group(1)) if non2xx else 0),
                     int(done.group(1)) if done else 0)


# --- output ----------------------------------------------------------------------------------

class Table:
    """One result table: rows of (metric, value, goal/baseline note)."""

    def __init__(self, title: str):
        self.title = title
        self.rows: list[tuple[str, str, str]] = []

    def row(self, metric: str, value: str, note: str = "") -> None:
        self.rows.append((metric, value, note))

    def print(self) -> None:
        w = max([len(r[0]) for r in self.rows] + [6])
        print(f"\n## {self.title}\n")
        print(f"| {'metric'.ljust(w)} | value | note |")
        print(f"|{'-' * (w + 2)}|-------|------|")
        for m, v, n in self.rows:
            print(f"| {m.ljust(w)} | {v} | {n} |")


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    return f"{os.cpu_count()} vCPU ({cpu}), {mem}, kernel {os.uname().release}"


if __name__ == "__main__":
    print(f"machine: {machine()}")
