"""Regression guard for the ~40 ms Nagle/delayed-ACK stall (issue 15), not a timed test: after SDK
calls over keep-alive connections, the server itself reports (by reading the socket option back on
every accepted connection) that TCP_NODELAY was set on all of them."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import requests

from agentcube import CodeInterpreterClient

REPO = Path(__file__).resolve().parents[2]


def counters(text: str, component: str) -> tuple:
    def value(name):
        m = re.search(rf"^agentcube_{component}_connections_{name}_total (\d+)", text, re.M)
        assert m, f"agentcube_{component}_connections_{name}_total missing:\n{text}"
        return int(m.group(1))
    return value("accepted"), value("nodelay")


def test_every_accepted_connection_has_tcp_nodelay(stack):
    if stack.backend != "local":
        pytest.skip("reads `agentcube up`'s own metrics")
    with CodeInterpreterClient(name="on-demand-interpreter") as c:
        for _ in range(5):
            assert c.execute_command(["echo", "x"]).strip() == "x"
    # The upstream SDK too, in its own process.
    python = REPO / ".venv-upstream/bin/python"
    env = dict(os.environ, WORKLOAD_MANAGER_URL=stack.wm_url, ROUTER_URL=stack.router_url)
    code = ("from agentcube import CodeInterpreterClient as C\n"
            "with C(name='on-demand-interpreter') as c:\n"
            "    [c.execute_command('true') for _ in range(5)]\n")
    subprocess.run([str(python), "-c", code], env=env, check=True, timeout=120, cwd="/")
    text = requests.get(stack.metrics_url, timeout=5).text
    for component in ("router", "workload_manager"):
        accepted, nodelay = counters(text, component)
        assert accepted > 0
        assert nodelay == accepted, f"{component}: {accepted - nodelay} of {accepted} connections without TCP_NODELAY"
    # Both SDKs' calls are plain requests: the Router answered them on its HTTP/1.1 fast lane.
    fast = re.search(r"^agentcube_router_http1_fast_requests_total (\d+)", text, re.M)
    assert fast, text
    assert int(fast.group(1)) >= 10
