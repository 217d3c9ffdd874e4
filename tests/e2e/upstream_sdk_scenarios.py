"""The SDK scenarios as code written for upstream's SDK does them: run by the UNMODIFIED upstream
agentcube-sdk==0.1.0 in its own venv, and by this repository's SDK (a drop-in for such code),
which `SDK_UNDER_TEST` names (`upstream` or `ours`). Exits non-zero on the first failure.
Invoked by test_upstream_sdk.py."""

import json
import os
import sys
import tempfile

from agentcube import AgentRuntimeClient, CodeInterpreterClient

try:
    from agentcube.exceptions import CommandExecutionError
except ImportError:  # pragma: no cover
    CommandExecutionError = Exception


def main() -> None:
    import agentcube

    upstream = os.environ.get("SDK_UNDER_TEST", "upstream") == "upstream"
    assert ("site-packages" in agentcube.__file__) == upstream, f"not the SDK under test: {agentcube.__file__}"
    with CodeInterpreterClient() as c:
        assert "2" in c.run_code("python", "print(1+1)")
        c.run_code("python", "x = 1")
        try:
            c.run_code("python", "print(x)")
            raise AssertionError("second run_code should fail with NameError")
        except CommandExecutionError as e:
            assert "NameError" in str(e) or "NameError" in getattr(e, "stderr", ""), e
        c.write_file("import json\njson.dump([0,1,1,2,3,5,8], open('fibonacci.json','w'))\n", "gen.py")
        c.execute_command("python3 gen.py")
        with tempfile.TemporaryDirectory() as d:
            c.download_file("fibonacci.json", os.path.join(d, "f.json"))
            assert json.load(open(os.path.join(d, "f.json"))) == [0, 1, 1, 2, 3, 5, 8]
            blob = bytes(range(256)) * 50
            with open(os.path.join(d, "b.bin"), "wb") as f:
                f.write(blob)
            c.upload_file(os.path.join(d, "b.bin"), "b.bin")
            c.download_file("b.bin", os.path.join(d, "back.bin"))
            assert open(os.path.join(d, "back.bin"), "rb").read() == blob
        names = {f["name"] for f in c.list_files(".")}
        assert {"gen.py", "fibonacci.json", "b.bin"} <= names, names
    agent = AgentRuntimeClient("echo-agent")
    out = agent.invoke({"input": "upstream"}, path="echo") if "path" in AgentRuntimeClient.invoke.__code__.co_varnames else None
    if out is not None:
        assert out["output"] == "echo: upstream", out
    low_level_clients()
    print("upstream SDK scenarios passed")


def low_level_clients() -> None:
    """`agentcube.clients`, called positionally as upstream's signatures have them."""
    from agentcube.clients import AgentRuntimeDataPlaneClient, CodeInterpreterDataPlaneClient, ControlPlaneClient

    router = os.environ["ROUTER_URL"]
    cp = ControlPlaneClient(os.environ["WORKLOAD_MANAGER_URL"], None, 60, 5.0, 2, 2)
    sid = cp.create_session("my-interpreter", "default", {}, 600)
    dp = CodeInterpreterDataPlaneClient(sid, router, "default", "my-interpreter", None, 60)
    assert dp.run_code("python", "print(6*7)").strip() == "42"
    assert dp.execute_command(["echo", "low", "level"]) == "low level\n"
    try:
        dp.execute_command("false")
        raise AssertionError("a failing command raises")
    except CommandExecutionError:
        pass
    dp.write_file("text", "t.txt")
    assert any(f["name"] == "t.txt" for f in dp.list_files("."))
    dp.close()
    assert cp.delete_session(sid) is True
    cp.close()
    ar = AgentRuntimeDataPlaneClient(router, "default", "echo-agent", 60)
    resp = ar.invoke(ar.bootstrap_session_id(), {"input": "raw"})
    assert resp.status_code == 200 and resp.json()["output"] == "echo: raw", resp.text
    ar.close()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        raise
