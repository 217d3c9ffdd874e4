"""Issue 22: the embedded default runs the definition's image. A real registry on loopback holds
an image built here (this host's Python plus a package the host does not have); `agentcube up
--images pull` runs it, and both SDKs reach it through the Router. The warm pool pulls before it
reports ready, so sessions keep starting with the registry gone."""

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import BACKEND, REPO, _free_port, _stop, start_up
from oci_registry import Layer, Registry, python_base_layer

pytestmark = pytest.mark.skipif(BACKEND != "local", reason="images of the local backend")


def _manifest(image: str) -> str:
    return f"""apiVersion: runtime.agentcube.volcano.sh/v1alpha1
kind: CodeInterpreter
metadata: {{name: imaged, namespace: default}}
spec:
  warmPoolSize: 1
  template:
    image: {image}
"""


def test_sdks_run_code_in_the_definitions_image():
    from agentcube import CodeInterpreterClient

    tmp_path = Path(tempfile.mkdtemp(prefix="agentcube-images-"))
    tmp_path.chmod(0o755)  # sandboxes run as an unprivileged user and must reach their rootfs

    registry = Registry(tmp_path, _free_port())
    nonce = uuid.uuid4().hex
    package = Layer()
    package.dir("usr/lib/python3/dist-packages/acprobe")
    package.file("usr/lib/python3/dist-packages/acprobe/__init__.py", f"VERSION = {nonce!r}\n".encode())
    registry.push("py", "3-test", [python_base_layer(), package.gz()], {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "imaged.yaml").write_text(_manifest(f"{registry.addr}/py:3-test"))
    proc, wm, router = start_up(tmp_path, None, "--images", "pull", "--insecure-registry", registry.addr,
                                manifests=manifests)
    try:
        log = next(tmp_path.glob("up-*.log"))
        # The warm pool's sandbox: pulled, unpacked and started before any session asks.
        deadline = time.time() + 60
        while not list((tmp_path / "state/sandboxes").glob("*")):
            assert time.time() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert "pulling image layer" in text and "image ready" in text, text
        registry.stop()
        for _ in range(2):  # the pooled sandbox, then one started on demand from the cache
            with CodeInterpreterClient(name="imaged", workload_manager_url=wm, router_url=router) as c:
                out = c.run_code("python", "import acprobe, os; print(acprobe.VERSION, os.path.exists('/usr/bin/bwrap'))")
                assert out.strip() == f"{nonce} False"
        # The unmodified upstream SDK, in its own venv and process.
        upstream = REPO / ".venv-upstream/bin/python"
        script = ("from agentcube import CodeInterpreterClient\n"
                  "with CodeInterpreterClient(name='imaged') as c:\n"
                  "    print(c.run_code('python', 'import acprobe; print(acprobe.VERSION)'))\n")
        env = dict(os.environ, WORKLOAD_MANAGER_URL=wm, ROUTER_URL=router)
        env.pop("PYTHONPATH", None)
        r = subprocess.run([str(upstream), "-c", script], env=env, capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0 and nonce in r.stdout, f"{r.stdout}\n{r.stderr}"
    finally:
        _stop(proc)
        shutil.rmtree(tmp_path, ignore_errors=True)
