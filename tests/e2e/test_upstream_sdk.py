"""The same SDK scenarios pass with the unmodified upstream agentcube-sdk==0.1.0 from PyPI, and
with this repository's SDK running the same code (written for upstream's)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _scenarios(stack, python: Path, sdk: str) -> None:
    env = dict(os.environ, WORKLOAD_MANAGER_URL=stack.wm_url, ROUTER_URL=stack.router_url, SDK_UNDER_TEST=sdk)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(python), str(Path(__file__).with_name("upstream_sdk_scenarios.py"))],
                       env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "upstream SDK scenarios passed" in r.stdout


def test_upstream_sdk_0_1_0(stack):
    python = REPO / ".venv-upstream/bin/python"
    assert python.exists(), "run `make deps` (creates .venv-upstream with agentcube-sdk==0.1.0)"
    _scenarios(stack, python, "upstream")


def test_our_sdk_runs_code_written_for_upstreams(stack):
    _scenarios(stack, Path(sys.executable), "ours")
