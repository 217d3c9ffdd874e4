"""Where a proxied request's time goes inside each proxy, from the kernel's own records rather than
end-to-end timings: wrk (keep-alive, one connection) sends `GET …/health` through the `router` binary
and through nginx (two worker processes, as the Router has two workers on two CPUs) to the same
PicoD, in alternating one-second slices, while one
`perf record -a` keeps the scheduler's and the proxies' system calls' tracepoints (`sched_switch`,
`sched_wakeup`, `raw_syscalls`, filtered to the two proxies' threads). For each proxy it then splits a
request's time into

- the critical path of a typical request: the median on-CPU time of each kind of step the proxy
  takes between a request's arrival and the write of its answer — the gap between two given system
  calls (user work), or one call (kernel work: reads, writes, which include loopback TCP handing the
  bytes to the peer and waking it, nginx's `getsockopt`) — times how often it happens per request.
  Steps after a write and before the next wait are left out (the peer is at work then), and so is
  the time a step spent preempted. Medians keep interrupts and the odd slow step out;
- user and kernel time per request as means (everything outside the event-loop waits);
- preempted: time the proxy was runnable but another task had its CPU;
- woken: time from the kernel waking the proxy (a request or an answer arrived) to it running;

and prints the median wall-clock p50 of its slices. Then, untraced, what decides saturation: CPU
time per request at 32 connections (alternating two-second wrk runs; all threads of each proxy,
as the scheduler accounts them in `/proc/<tid>/schedstat`, divided by the requests wrk completed). The slices alternate so that the machine's
drift (this VM's speed moves by a third between minutes) hits both proxies alike: every step of both
gets slower together. Tracing adds about a microsecond to each system call for both proxies (nginx
makes one more per request than the Router). Needs `perf` and access to tracepoints (root, or
`kernel.perf_event_paranoid` ≤ -1); without them it prints why and measures nothing."""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import Procs, Table, free_port, procs, wait_http, wrk
from http_proxy import NGINX, ROUTER_ENV, picod_with_session, router_cmd

SLICES = int(sys.argv[1]) if len(sys.argv) > 1 else 8  # one-second wrk runs per proxy
SAT_SLICES = 4  # two-second runs per proxy at 32 connections
ROUTER_PATH = "/v1/namespaces/default/code-interpreters/bench/invocations/health"
# Per architecture (`platform.machine()`): the system calls a proxy waits in (its event loop, its
# threads' parking), the writes, and names for the table; numbers from each kernel's syscall table.
SYSCALLS = {
    "x86_64": (
        {7, 23, 202, 232, 270, 271, 281, 441},  # poll select futex epoll_wait pselect6 ppoll epoll_pwait(2)
        {1, 20, 44, 46},  # write writev sendto sendmsg
        {0: "read", 1: "write", 19: "readv", 20: "writev", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
         47: "recvmsg", 55: "getsockopt", 54: "setsockopt", 202: "futex", 232: "epoll_wait", 281: "epoll_pwait"},
    ),
    # The generic table (no poll, select or epoll_wait there: only their p…/…pwait forms).
    "aarch64": (
        {22, 72, 73, 98, 441},  # epoll_pwait pselect6 ppoll futex epoll_pwait2
        {64, 66, 206, 211},  # write writev sendto sendmsg
        {63: "read", 64: "write", 65: "readv", 66: "writev", 206: "sendto", 207: "recvfrom", 211: "sendmsg",
         212: "recvmsg", 209: "getsockopt", 208: "setsockopt", 98: "futex", 22: "epoll_pwait"},
    ),
}
WAITS, WRITES, NAMES = SYSCALLS.get(platform.machine(), (set(), set(), {}))
LINE = re.compile(r"^\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")  # perf script -F tid,time,event,trace


@dataclass
class Split:
    """One proxy's time per request (µs), and the median wall-clock p50 of its slices."""

    typical: float
    user: float
    kernel: float
    preempted: float
    woken: float
    syscalls: dict[str, float]
    wall_p50: float


Targets = dict[str, tuple[str, dict[str, str], int]]
"""Per proxy: the URL wrk asks, its headers, the proxy's pid."""


class Steps:
    """The traced steps of one proxy's threads, fed the recording's events in time order."""

    def __init__(self, tids: set[int]):
        self.tids = tids
        self.user = self.kernel = self.preempted = self.woken = 0.0
        self.calls: collections.Counter[int] = collections.Counter()
        # On-CPU durations of each kind of step on the path: gaps by (call before, call after), calls by nr.
        self.steps: dict[tuple[str, int] | tuple[str, int, int], list[float]] = collections.defaultdict(list)
        self.inside: dict[int, tuple[float, int]] = {}  # tid -> (entered at, nr) while in a system call
        self.after: dict[int, tuple[float, int]] = {}  # tid -> (left at, nr) of its last system call
        self.off_at: dict[int, float] = {}  # tid -> when it was switched out while still runnable
        self.off: dict[int, float] = collections.defaultdict(float)  # runnable-but-waiting time since its last mark
        self.woken_at: dict[int, float] = {}  # tid -> when it was woken, until it runs

    def wakeup(self, tid: int, t: float) -> None:
        self.woken_at[tid] = t

    def switch(self, prev: int, nxt: int, runnable: bool, t: float) -> None:
        if prev in self.tids and runnable:
            self.off_at[prev] = t
        if nxt in self.off_at:
            self.off[nxt] += t - self.off_at.pop(nxt)
        if nxt in self.woken_at:
            self.woken += t - self.woken_at.pop(nxt)

    def enter(self, tid: int, nr: int, t: float) -> None:
        if tid in self.after:
            left, last = self.after[tid]
            waited = self.off.pop(tid, 0.0)
            work = t - left - waited
            self.user += work
            self.preempted += waited
            if not (last in WRITES and nr in WAITS):  # after a write, before the wait: the peer is at work
                self.steps[("gap", last, nr)].append(work)
        self.inside[tid] = (t, nr)

    def exit(self, tid: int, t: float) -> None:
        if tid not in self.inside:
            return
        entered, nr = self.inside.pop(tid)
        self.calls[nr] += 1
        waited = self.off.pop(tid, 0.0)
        if nr not in WAITS:
            self.kernel += t - entered - waited
            self.preempted += waited
            self.steps[("call", nr)].append(t - entered - waited)
        self.after[tid] = (t, nr)

    def split(self, wall_p50: float) -> Split:
        """Per request: requests are counted by their writes (both proxies write each request to the
        sandbox and each answer to the client once; the system-call counts printed show it)."""
        requests = max(1, sum(v for k, v in self.calls.items() if k in WRITES) // 2)
        us = 1e6 / requests
        per = {NAMES.get(k, str(k)): v / requests for k, v in sorted(self.calls.items()) if v / requests >= 0.05}
        typical = sum(statistics.median(v) * len(v) for v in self.steps.values()) * us
        return Split(typical, self.user * us, self.kernel * us, self.preempted * us, self.woken * us, per, wall_p50)


def field(name: str, detail: str) -> int:
    """The number after `name` in a tracepoint's text (`pid=…`, `NR …`)."""
    m = re.search(rf"{name}(\d+)", detail)
    if m is None:
        raise ValueError(f"no {name!r} in {detail!r}")
    return int(m.group(1))


def replay(script: str, proxies: list[Steps]) -> None:
    """Feeds each event of a `perf script` text to the proxies it concerns."""
    owner = {tid: s for s in proxies for tid in s.tids}
    for line in script.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        tid, t, event, detail = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
        if event == "sched:sched_wakeup":
            w = field(" pid=", " " + detail)
            if w in owner:
                owner[w].wakeup(w, t)
        elif event == "sched:sched_switch":
            prev, nxt = field("prev_pid=", detail), field("next_pid=", detail)
            runnable = "prev_state=R" in detail
            for s in {owner[x] for x in (prev, nxt) if x in owner}:
                s.switch(prev, nxt, runnable, t)
        elif tid in owner and event == "raw_syscalls:sys_enter":
            owner[tid].enter(tid, field("NR ", detail), t)
        elif tid in owner and event == "raw_syscalls:sys_exit":
            owner[tid].exit(tid, t)


def unavailable() -> str | None:
    """Why tracepoints cannot be recorded here, if they cannot."""
    if platform.machine() not in SYSCALLS:
        return f"no system call table for {platform.machine()} here (x86_64 and aarch64 only)"
    if shutil.which("perf") is None:
        return "perf not found (apt-get install linux-perf)"
    probe = subprocess.run(["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "-o", "/dev/null",
                            "--", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"perf cannot record tracepoints here: {probe.stderr.strip()[:200]}"
    return None


def events(tids: set[int]) -> list[str]:
    """perf's event arguments, each filtered in the kernel to the threads `tids`."""
    def any_of(field: str) -> str:
        return " || ".join(f"{field} == {t}" for t in sorted(tids))

    return ["-e", "raw_syscalls:sys_enter", "--filter", any_of("common_pid"),
            "-e", "raw_syscalls:sys_exit", "--filter", any_of("common_pid"),
            "-e", "sched:sched_switch", "--filter", f"{any_of('prev_pid')} || {any_of('next_pid')}",
            "-e", "sched:sched_wakeup", "--filter", any_of("pid")]


def traced(p: Procs, targets: Targets) -> dict[str, Split]:
    """SLICES one-second wrk runs at one connection per target, alternating, in one recording."""
    tids = {n: threads(pid) for n, (_, _, pid) in targets.items()}
    data = p.tmp / "trace.data"
    rec = subprocess.Popen(["perf", "record", "-q", "-a", *events(set().union(*tids.values())), "-o", str(data)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # perf's own start-up, before the first request
    walls: dict[str, list[float]] = {n: [] for n in targets}
    for i in range(SLICES):
        for n in (list(targets) if i % 2 == 0 else list(reversed(targets))):
            url, headers, _ = targets[n]
            walls[n].append(wrk(url, 1, 1, headers).p50_us)
    rec.send_signal(2)
    rec.wait(timeout=120)
    script = subprocess.run(["perf", "script", "--ns", "-i", str(data), "-F", "tid,time,event,trace"],
                            capture_output=True, text=True, check=True).stdout
    steps = {n: Steps(tids[n]) for n in targets}
    replay(script, list(steps.values()))
    return {n: s.split(statistics.median(walls[n])) for n, s in steps.items()}


def threads(pid: int) -> set[int]:
    """The threads of a process and of its child processes (nginx's workers)."""
    tids = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    for t in list(tids):
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{t}/children").read_text().split():
                tids |= threads(int(child))
    return tids


def cpu_ns(pid: int) -> int:
    """On-CPU time so far of all the threads of a process and its children (the scheduler's own
    account, in ns)."""
    total = 0
    for t in threads(pid):
        with contextlib.suppress(FileNotFoundError):
            total += int(Path(f"/proc/{t}/schedstat").read_text().split()[0])
    return total


def saturated(targets: Targets) -> dict[str, tuple[float, float]]:
    """CPU per request (µs) and throughput at 32 connections: SAT_SLICES alternating runs per target,
    untraced; each target's median slice."""
    runs: dict[str, list[tuple[float, float]]] = {n: [] for n in targets}
    for i in range(SAT_SLICES):
        for n in (list(targets) if i % 2 == 0 else list(reversed(targets))):
            url, headers, pid = targets[n]
            before = cpu_ns(pid)
            run = wrk(url, 32, 2, headers, threads=2)
            runs[n].append(((cpu_ns(pid) - before) / 1e3 / max(1, run.requests), run.rps))
    med = statistics.median
    return {n: (med(c for c, _ in r), med(x for _, x in r)) for n, r in runs.items()}


def main() -> None:
    why = unavailable()
    if why:
        print(f"\n## Critical path per proxied request: not measured ({why})")
        return
    with procs("critical-path") as p:
        picod_port, redis_port, router_port, nginx_port = (free_port() for _ in range(4))
        picod_with_session(p, picod_port, redis_port)
        router = p.start(router_cmd(p, router_port, redis_port), "router.log", env=ROUTER_ENV)
        (p.tmp / "nginx.conf").write_text(NGINX.format(tmp=p.tmp, picod=picod_port, port=nginx_port, master="on",
                                                       workers=2))
        nginx = p.start(["nginx", "-c", str(p.tmp / "nginx.conf"), "-p", str(p.tmp)], "nginx.log")
        wait_http(f"http://127.0.0.1:{router_port}/health/ready", proc=router)
        wait_http(f"http://127.0.0.1:{nginx_port}/health", proc=nginx)
        targets: Targets = {
            "router": (f"http://127.0.0.1:{router_port}{ROUTER_PATH}", {"x-agentcube-session-id": "s1"}, router.pid),
            "nginx": (f"http://127.0.0.1:{nginx_port}/health", {}, nginx.pid),
        }
        for url, h, _ in targets.values():  # warm up connections and caches
            wrk(url, 1, 1, h)
        split = traced(p, targets)
        print_table(split, saturated(targets))


def print_table(split: dict[str, Split], sat: dict[str, tuple[float, float]]) -> None:
    r, n = split["router"], split["nginx"]
    t = Table(f"Critical path per proxied request: router vs nginx (GET /health, wrk c=1, kernel tracepoints; "
              f"{SLICES} alternating one-second slices each, µs per request)")
    for field, label in (("typical", "critical path of a typical request (median of each step)"),
                         ("user", "user, mean (on-CPU between system calls)"),
                         ("kernel", "kernel, mean (in system calls, waits excluded)"),
                         ("preempted", "preempted, mean (runnable, its CPU taken by another task)"),
                         ("woken", "woken, mean (wake-up to running)"),
                         ("wall_p50", "wall-clock p50 (median of the slices)")):
        a, b = getattr(r, field), getattr(n, field)
        t.row(f"{label}: router / nginx", f"{a:.1f} / {b:.1f}", f"router ÷ nginx {a / b:.2f}" if b > 0 else "")
    for name, s in split.items():
        t.row(f"{name}: system calls per request", ", ".join(f"{c} {v:.2f}" for c, v in s.syscalls.items()))
    (rc, rr), (nc, nr) = sat["router"], sat["nginx"]
    t.row("CPU per request at 32 connections (all threads, untraced): router / nginx", f"{rc:.1f} / {nc:.1f}",
          f"router ÷ nginx {rc / nc:.2f}; throughput {rr:,.0f} / {nr:,.0f} req/s")
    t.print()


if __name__ == "__main__":
    main()
