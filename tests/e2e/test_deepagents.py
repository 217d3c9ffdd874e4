"""The LangChain Deep Agents backend (`agentcube.deepagents.AgentcubeSandbox`) against a real
sandbox, through Deep Agents' own file and shell tools (`BaseSandbox` from the real `deepagents`
package builds their commands): one path is one file to every tool, absolute or relative, and
commands are shell command lines."""

from pathlib import Path

from agentcube import CodeInterpreterClient
from agentcube.deepagents import AgentcubeSandbox


def test_deep_agents_tools_run_in_the_sandbox(stack, tmp_path: Path):
    with CodeInterpreterClient() as client:
        sb = AgentcubeSandbox(client=client)
        assert sb.id == client.session_id

        # Commands are shell lines: pipes, redirections, stderr and the exit code.
        r = sb.execute("echo abc | tr a-c x-z; echo oops >&2; exit 3")
        assert r.exit_code == 3 and r.output == "xyz\n\n[stderr] oops", r
        assert sb.execute("true").output == "<no output>"

        # An absolute path outside the workspace: written, read, edited, listed, found.
        assert sb.write("/tmp/notes/plan.md", "step one\nstep two\n").error is None
        got = sb.read("/tmp/notes/plan.md")
        assert got.error is None and got.file_data is not None, got
        assert "step one" in got.file_data["content"] and "step two" in got.file_data["content"], got
        assert sb.execute("cat /tmp/notes/plan.md").output == "step one\nstep two\n"
        e = sb.edit("/tmp/notes/plan.md", "two", "2")
        assert e.error is None and e.occurrences == 1, e
        assert sb.execute("cat /tmp/notes/plan.md").output == "step one\nstep 2\n"
        listed = sb.ls("/tmp/notes")
        assert listed.entries is not None and [f["path"] for f in listed.entries] == ["/tmp/notes/plan.md"], listed
        found = sb.grep("step 2", "/tmp/notes")
        assert [(m["path"], m["line"]) for m in found.matches or []] == [("/tmp/notes/plan.md", 2)], found
        assert [f["path"] for f in sb.glob("*.md", "/tmp/notes").matches or []] == ["/tmp/notes/plan.md"]

        # A relative path is the workspace's, the same file the SDK's file API sees.
        assert sb.write("report/summary.txt", "done").error is None
        client.download_file("report/summary.txt", str(tmp_path / "summary.txt"))
        assert (tmp_path / "summary.txt").read_text() == "done"
        [down] = sb.download_files(["report/summary.txt"])
        assert (down.content, down.error) == (b"done", None)
        blob = bytes(range(256)) * 64
        [up] = sb.upload_files([("/tmp/blob.bin", blob)])
        assert up.error is None
        [down] = sb.download_files(["/tmp/blob.bin"])
        assert down.content == blob

        # Failures are Deep Agents' error codes, and leave no staging file behind.
        [missing, directory] = sb.download_files(["/tmp/nope", "/tmp/notes"])
        assert (missing.content, missing.error) == (None, "file_not_found")
        assert directory.error == "is_directory"
        [readonly] = sb.upload_files([("/usr/planted", b"x")])
        assert readonly.error == "permission_denied", readonly
        assert sb.execute("ls -a | grep -c agentcube-staging").output.strip() == "0"
