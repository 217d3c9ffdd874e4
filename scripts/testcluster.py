"""Starting `test-cluster` from Python (the e2e suite, `make cluster`, `make bench-kube`): the
binary prints `test-cluster ready: kubeconfig=PATH` once the control plane and the process kubelet
are up, and stops everything when its stdin closes (`--stdin`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KUBE = Path(os.environ.get("AGENTCUBE_KUBE_CACHE", REPO / ".cache/kube"))
READY = "test-cluster ready: kubeconfig="


def start(binary: Path | str, bin_dir: Path, state: Path, log: Path,
          extra: list[str] | None = None) -> tuple[subprocess.Popen[str], Path]:
    """Starts the cluster (pods run the binaries in `bin_dir`) and waits until it is ready;
    returns the process and the admin kubeconfig. Raises RuntimeError with the log's tail when it
    does not come up. Closing the process's stdin stops it."""
    proc = subprocess.Popen([str(binary), "--state-dir", str(state), "--bin-dir", str(bin_dir), "--stdin"]
                            + (extra or []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, env=dict(os.environ, AGENTCUBE_KUBE_CACHE=str(KUBE)))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY):
        proc.kill()
        raise RuntimeError(f"test cluster did not start ({line!r}): {log.read_text()[-3000:]}")
    return proc, Path(line.strip().split("=", 1)[1])


def kubectl(kubeconfig: Path | str) -> list[str]:
    """The kubectl command line for `kubeconfig` (kubectl is part of the control-plane binary)."""
    return [str(KUBE / "bin/controlplane"), "kubectl", f"--kubeconfig={kubeconfig}"]
