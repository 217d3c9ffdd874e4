"""The same SDK scenarios pass with the unmodified upstream agentcube-sdk==0.1.0 from PyPI."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_upstream_sdk_0_1_0(stack):
    python = REPO / ".venv-upstream/bin/python"
    assert python.exists(), "run `make deps` (creates .venv-upstream with agentcube-sdk==0.1.0)"
    env = dict(os.environ, WORKLOAD_MANAGER_URL=stack.wm_url, ROUTER_URL=stack.router_url)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(python), str(Path(__file__).with_name("upstream_sdk_scenarios.py"))],
                       env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "upstream SDK scenarios passed" in r.stdout
