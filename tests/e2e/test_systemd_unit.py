"""`deploy/systemd/agentcube.service`, the unit an operator installs to run `agentcube up` as a
system service: systemd accepts it as written, and its command — its flags, with settings from the
environment as its `EnvironmentFile` gives them — serves an SDK session and, on the `SIGTERM` of
`systemctl stop` (`KillMode=mixed`: to `agentcube` alone), removes every sandbox and exits 0 within
the unit's `TimeoutStopSec`. `make cgroup-v2` also starts and stops the unit under a real systemd
in a virtual machine (`tests/vm/systemd.sh`): there the sandboxes' cgroups go under the service's."""

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agentcube import CodeInterpreterClient
from conftest import BACKEND, REPO, _binary, _free_port, _wait_healthy

UNIT = REPO / "deploy/systemd/agentcube.service"
INSTALLED = "/usr/local/bin/agentcube"

pytestmark = pytest.mark.skipif(BACKEND != "local", reason="runs its own `agentcube up`")


def _service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit["Service"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / "agentcube.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED, str(_binary("agentcube"))))
    checked = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                             capture_output=True, text=True)
    # An unknown key or a bad value is only a warning (exit status 0): any output fails.
    assert checked.returncode == 0 and not checked.stderr.strip() and not checked.stdout.strip(), checked
    service = _service()
    assert service["Delegate"] == "yes", "sandbox cgroups need the service's cgroup handed down"
    assert service["KillMode"] == "mixed", "systemd must leave the sandboxes to agentcube's own stop"


def test_the_unit_command_serves_and_stops_cleanly(scratch) -> None:
    service = _service()
    tmp = scratch("agentcube-unit-")
    manifests, state = tmp / "manifests", tmp / "state"
    manifests.mkdir()
    shutil.copy2(REPO / "examples/code-interpreter.yaml", manifests)
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == [INSTALLED, "up"], argv
    paths = {"/etc/agentcube/manifests": str(manifests), "/var/lib/agentcube": str(state)}
    argv = [str(_binary("agentcube"))] + [paths.get(a, a) for a in argv[1:]]
    wm, router = _free_port(), _free_port()
    # What /etc/agentcube/agentcube.env would hold.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AGENTCUBE_WM_PORT": str(wm),
           "AGENTCUBE_ROUTER_PORT": str(router), "AGENTCUBE_METRICS_PORT": "0", "AGENTCUBE_IMAGES": "host"}
    log = tmp / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        _wait_healthy([f"http://127.0.0.1:{wm}/health", f"http://127.0.0.1:{router}/health/ready"], [proc], [log])
        with CodeInterpreterClient(workload_manager_url=f"http://127.0.0.1:{wm}",
                                   router_url=f"http://127.0.0.1:{router}") as ci:
            assert ci.execute_command("echo served").strip() == "served"
            assert any((state / "sandboxes").iterdir()), "no sandbox in the unit's state directory"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=int(service["TimeoutStopSec"]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert time.monotonic() - started < int(service["TimeoutStopSec"])
    sandboxes = state / "sandboxes"
    assert not sandboxes.exists() or not list(sandboxes.iterdir()), "sandboxes left after the stop"
    assert "stopped; no sandbox left running" in log.read_text(), log.read_text()[-3000:]
