"""Router -> Workload Manager over mutual TLS with SPIFFE identities (upstream's `--mtls-*` on the
Router, `--tls-cert/--tls-key/--tls-ca` on the Workload Manager), between the real binaries: a
session-less invocation makes its session over mTLS; a client without a certificate, a Router
expecting another identity, and `--mtls-*` with an `http://` URL are refused."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import REPO, _binary, _free_port, _stop
from pki import CLIENT_AUTH, SERVER_AUTH, Pki, spiffe_id

# The checks below talk to the Workload Manager by IP, which its SPIFFE certificate does not name.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")

WM_ID = spiffe_id("agentcube", "workloadmanager")
ROUTER_ID = spiffe_id("agentcube", "agentcube-router")


def _router_identity(d: Path) -> Path:
    """The Router's key pair, as `--identity-dir` keeps it; returns the public key file."""
    d.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "private.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                                      serialization.NoEncryption()))
    public = d / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def _wait(check, proc: subprocess.Popen, log: Path, secs: float = 60) -> None:
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited: {log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"{proc.args!r} not ready: {log.read_text()[-3000:]}")


def _workload_manager(tmp: Path, redis_url: str, *tls: str) -> tuple[subprocess.Popen, int, Path]:
    """The `workload-manager` binary (local backend, the examples) with `tls` flags, trusting the
    Router key in `tmp/identity`: (process, port, log)."""
    public = _router_identity(tmp / "identity")
    port = _free_port()
    log = tmp / "wm.log"
    proc = subprocess.Popen(
        [str(_binary("workload-manager")), "--port", str(port), "--bind", "127.0.0.1", "--metrics-port", "0",
         "--manifests", str(REPO / "examples"), "--state-dir", str(tmp / "state"), "--store", redis_url,
         "--router-public-key-file", str(public), *tls],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))
    return proc, port, log


INVOKE = "/v1/namespaces/default/code-interpreters/on-demand-interpreter/invocations/api/execute"


def test_the_router_makes_sessions_over_mutual_tls_and_strangers_are_refused(stack, redis_url, scratch):
    if stack.backend != "local":
        pytest.skip("runs its own workload-manager and router")
    tmp = scratch("agentcube-mtls-")
    pki = Pki(tmp)
    wm_crt, wm_key = pki.leaf("workloadmanager", WM_ID, SERVER_AUTH)
    router_crt, router_key = pki.leaf("router", ROUTER_ID, CLIENT_AUTH)
    wm, wm_port, wm_log = _workload_manager(tmp, redis_url, "--tls-cert", str(wm_crt), "--tls-key", str(wm_key),
                                            "--tls-ca", str(pki.bundle))
    procs = [wm]

    def router(*extra: str, url: str = f"https://127.0.0.1:{wm_port}", env: dict | None = None):
        port = _free_port()
        log = tmp / f"router-{port}.log"
        p = subprocess.Popen(
            [str(_binary("router")), "--port", str(port), "--bind", "127.0.0.1", "--metrics-port", "0",
             "--identity-dir", str(tmp / "identity"), "--store", redis_url,
             "--unix-socket-dir", str(tmp / "state/private"),
             "--mtls-cert", str(router_crt), "--mtls-key", str(router_key), "--mtls-ca", str(pki.bundle), *extra],
            stdout=open(log, "w"), stderr=subprocess.STDOUT,
            env=dict(os.environ, WORKLOAD_MANAGER_URL=url, RUST_LOG="info", **(env or {})))
        procs.append(p)
        return p, f"http://127.0.0.1:{port}", log

    invoke = INVOKE
    try:
        # The Workload Manager's listener: mutual TLS, answering only clients of the CA.
        mine = (str(router_crt), str(router_key))
        _wait(lambda: requests.get(f"https://127.0.0.1:{wm_port}/health", cert=mine, verify=False, timeout=1).ok,
              wm, wm_log)
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(f"https://127.0.0.1:{wm_port}/v1/code-interpreter", verify=False, timeout=5,
                          json={"name": "on-demand-interpreter", "namespace": "default"})
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{wm_port}/health", timeout=5)

        # A session-less invocation: the Router makes the session over mTLS, then runs it.
        proc, url, log = router()
        _wait(lambda: requests.get(f"{url}/health/ready", timeout=1).ok, proc, log)
        r = requests.post(f"{url}{invoke}", json={"command": ["echo", "over mtls"]}, timeout=60)
        assert r.status_code == 200, (r.status_code, r.text, log.read_text()[-2000:])
        assert r.json()["stdout"] == "over mtls\n", r.text
        sid = r.headers["x-agentcube-session-id"]
        r = requests.post(f"{url}{invoke}", json={"command": ["true"]}, headers={"x-agentcube-session-id": sid})
        assert r.status_code == 200, r.text
        assert "Router -> Workload Manager mutual TLS" in log.read_text()

        # A Router expecting the Workload Manager under another trust domain refuses its
        # certificate, and makes no session.
        proc, url, log = router(env={"AGENTCUBE_SPIFFE_TRUST_DOMAIN": "other.example"})
        _wait(lambda: requests.get(f"{url}/health/ready", timeout=1).ok, proc, log)
        r = requests.post(f"{url}{invoke}", json={"command": ["true"]}, timeout=60)
        assert r.status_code == 500, r.text
        text = log.read_text()
        assert "not the expected SPIFFE ID spiffe://other.example/ns/agentcube/sa/workloadmanager" in text, text

        # --mtls-* with an http:// URL would send the calls in the clear: refused at start.
        proc, url, log = router(url=f"http://127.0.0.1:{wm_port}")
        assert proc.wait(30) != 0
        assert "is not https://" in log.read_text(), log.read_text()
    finally:
        for p in procs:
            _stop(p)


def test_a_workload_manager_over_https_is_trusted_by_the_systems_cas(stack, redis_url, scratch):
    """Upstream's plain `--enable-tls` Workload Manager: a Router without `--mtls-*` reaches an
    `https://` URL checked against the system's CA certificates (here the test CA, through
    `SSL_CERT_FILE`), host name included; without that CA it makes no session."""
    if stack.backend != "local":
        pytest.skip("runs its own workload-manager and router")
    tmp = scratch("agentcube-https-")
    pki = Pki(tmp)
    crt, key = pki.leaf("workloadmanager", WM_ID, SERVER_AUTH, dns=("localhost",))
    wm, wm_port, wm_log = _workload_manager(tmp, redis_url, "--enable-tls", "--tls-cert", str(crt), "--tls-key", str(key))
    procs = [wm]
    try:
        _wait(lambda: requests.get(f"https://localhost:{wm_port}/health", verify=str(pki.bundle), timeout=1).ok,
              wm, wm_log)
        for trusted, want in ((True, 200), (False, 500)):
            port = _free_port()
            log = tmp / f"router-{port}.log"
            env = dict(os.environ, WORKLOAD_MANAGER_URL=f"https://localhost:{wm_port}", RUST_LOG="info")
            if trusted:
                env["SSL_CERT_FILE"] = str(pki.bundle)
            else:
                env.pop("SSL_CERT_FILE", None)
            proc = subprocess.Popen(
                [str(_binary("router")), "--port", str(port), "--bind", "127.0.0.1", "--metrics-port", "0",
                 "--identity-dir", str(tmp / "identity"), "--store", redis_url,
                 "--unix-socket-dir", str(tmp / "state/private")],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: requests.get(f"{url}/health/ready", timeout=1).ok, proc, log)
            r = requests.post(f"{url}{INVOKE}", json={"command": ["echo", "over https"]}, timeout=60)
            assert r.status_code == want, (trusted, r.status_code, r.text, log.read_text()[-2000:])
            if trusted:
                assert r.json()["stdout"] == "over https\n", r.text
            else:
                assert "UnknownIssuer" in log.read_text(), log.read_text()[-2000:]
    finally:
        for p in procs:
            _stop(p)
