"""`agentcube up` as an ordinary user, as a developer runs `make run` on a laptop: no root, so no
sandbox uids, cgroups or workspace quotas (the manager warns), every sandbox the user's own uid.
The rest of the suite runs the manager as root; this is the only guard of the unprivileged path,
where bubblewrap makes each sandbox's user namespace itself and namespaces and mounts are all
that keeps one sandbox (and the manager) from another."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agentcube import CodeInterpreterClient
from conftest import BACKEND, REPO, _binary, _free_port, _stop, _wait_healthy

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    BACKEND != "local" or os.geteuid() != 0,
    reason="starts its own `agentcube up` as another user (needs root to switch to it)",
)


def _sandbox_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-u", str(NOBODY), "-a", "-x", "picod|bwrap"], capture_output=True, text=True)
    return out.stdout.splitlines()


def test_agentcube_up_as_an_ordinary_user(scratch):
    tmp = scratch("agentcube-unprivileged-")
    # Only what the user could have: binaries and manifests it can read, a home of its own.
    bin_dir, manifests, home = tmp / "bin", tmp / "manifests", tmp / "home"
    for d in (bin_dir, manifests, home):
        d.mkdir()
    for name in ("agentcube", "picod"):
        shutil.copy2(_binary(name), bin_dir / name)
    shutil.copy2(REPO / "examples/code-interpreter.yaml", manifests)
    os.chown(home, NOBODY, NOBODY)
    home.chmod(0o700)
    wm, router = _free_port(), _free_port()
    log = tmp / "up.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "E2E_CANARY": "manager-canary-7f3e"}
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
         str(bin_dir / "agentcube"), "up", "--manifests", str(manifests), "--images", "host",
         "--wm-port", str(wm), "--router-port", str(router), "--metrics-port", "0",
         "--state-dir", str(home / "state")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=home, env=env)
    try:
        _wait_healthy([f"http://127.0.0.1:{wm}/health", f"http://127.0.0.1:{router}/health/ready"], [proc], [log])
        def session() -> CodeInterpreterClient:
            return CodeInterpreterClient(workload_manager_url=f"http://127.0.0.1:{wm}",
                                         router_url=f"http://127.0.0.1:{router}")

        with session() as a, session() as b:
            assert a.execute_command("id -u").strip() == str(NOBODY)
            assert a.run_code("python", "print(6 * 7)").strip() == "42"
            payload = os.urandom(3 << 20)
            (tmp / "up.bin").write_bytes(payload)
            a.upload_file(str(tmp / "up.bin"), "up.bin")
            a.download_file("up.bin", str(tmp / "down.bin"))
            assert (tmp / "down.bin").read_bytes() == payload
            a.write_file("a-secret-4b1d", "secret.txt")
            # Both sandboxes and the manager are one host uid here: only namespaces and mounts
            # stand between them. Neither a's files, nor the state directory, nor the manager's
            # environment or command line are in reach from b.
            found = b.execute_command(["sh", "-c",
                "grep -rsl --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr a-secret-4b1d / ; echo searched"])
            assert found.strip() == "searched", found
            assert "No such file" in b.execute_command(["sh", "-c", f"ls {home}/state 2>&1 || true"]), "the state directory is in reach"
            leaked = b.execute_command(["sh", "-c",
                "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c -e 'manager-canar[y]' -e '[s]tate-dir' || true"])
            assert leaked.strip() == "0", f"the manager's environment or command line is in reach ({leaked.strip()} lines)"
            pids = b.execute_command(["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
            assert int(pids) < 10, f"b sees {pids.strip()} processes: more than its own"
            assert a.execute_command("cat secret.txt") == "a-secret-4b1d"
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    deadline = time.time() + 10
    while _sandbox_processes() and time.time() < deadline:
        time.sleep(0.1)
    assert not _sandbox_processes(), "sandboxes outlived the manager"
