"""A LangChain Deep Agents sandbox backend (extra ``deepagents``): an agent made with
``create_deep_agent(model, backend=AgentcubeSandbox(client=CodeInterpreterClient()))`` has its
shell and file tools (``execute``, ``ls``, ``read_file``, ``write_file``, ``edit_file``, ``grep``,
``glob``) run in an AgentCube sandbox.

Upstream's ``langchain_agentcube.AgentcubeSandbox`` with the same constructor. Two things work
here that did not there: commands run through ``sh -c`` (Deep Agents hands over shell command
lines, and split into words their pipes, redirections and ``&&`` failed), and a path means the
same file to every tool, whatever PicoD's workspace is (upstream's uploads put ``/notes.txt``
at the workspace's ``notes.txt`` while its commands read ``/notes.txt``; its example sets PicoD's
``--workspace=/`` to line them up): paths are the sandbox's own, absolute or relative to the
workspace (the commands' working directory). Files move through the workspace: an upload lands in a staging
file there and is moved into place by a command, a download is copied out to one first.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Dict, Optional

from deepagents.backends.protocol import ExecuteResponse, FileDownloadResponse, FileUploadResponse
from deepagents.backends.sandbox import BaseSandbox

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.exceptions import AgentCubeError

# `$1` the staging file in the workspace, `$2` the agent's path.
_PLACE = 'd=$(dirname -- "$2") && mkdir -p -- "$d" && mv -f -- "$1" "$2"'
_FETCH = 'cp -- "$2" "$1"'


def _file_error(stderr: str) -> str:
    """Deep Agents' ``FileOperationError`` for a failed ``mv``/``cp``."""
    text = stderr.lower()
    if "no such file" in text:
        return "file_not_found"
    if "is a directory" in text or "omitting directory" in text:
        return "is_directory"
    if "permission denied" in text or "read-only file system" in text or "operation not permitted" in text:
        return "permission_denied"
    return "invalid_path"


class AgentcubeSandbox(BaseSandbox):
    """``client``'s sandbox as a Deep Agents backend; ``default_timeout`` (seconds) bounds a
    command that names none."""

    def __init__(self, *, client: CodeInterpreterClient, default_timeout: Optional[int] = 30 * 60) -> None:
        self._client = client
        self._default_timeout = default_timeout

    @property
    def id(self) -> str:
        return self._client.session_id or "agentcube-unknown"

    def _run(self, argv: list[str], timeout: Optional[int] = None) -> Dict[str, Any]:
        t = timeout if timeout is not None else self._default_timeout
        return self._client.execute_command_result(argv, timeout=float(t) if t is not None else None)

    def execute(self, command: str, *, timeout: Optional[int] = None) -> ExecuteResponse:
        """Runs ``command`` through ``sh -c``; stdout, then stderr's lines marked ``[stderr]``
        (as Deep Agents' local shell backend reports them)."""
        r = self._run(["sh", "-c", command], timeout)
        parts = [str(r["stdout"])] if r["stdout"] else []
        stderr = str(r["stderr"]).strip()
        if stderr:
            parts += [f"[stderr] {line}" for line in stderr.split("\n")]
        code = r["exit_code"]
        return ExecuteResponse(output="\n".join(parts) or "<no output>",
                               exit_code=code if isinstance(code, int) else None, truncated=False)

    def _staging(self) -> str:
        return f".agentcube-staging-{uuid.uuid4().hex}"

    def upload_files(self, files: list[tuple[str, bytes]]) -> list[FileUploadResponse]:
        out: list[FileUploadResponse] = []
        for path, content in files:
            out.append(FileUploadResponse(path=path, error=self._upload(path, content)))
        return out

    def _upload(self, path: str, content: bytes) -> Optional[str]:
        if not path.strip() or "\0" in path:
            return "invalid_path"
        staging = self._staging()
        fd, local = tempfile.mkstemp(prefix="agentcube-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            self._client.upload_file(local, staging)
            r = self._run(["sh", "-c", _PLACE, "sh", staging, path])
            if r["exit_code"] != 0:
                self._run(["rm", "-f", "--", staging])
                return _file_error(str(r["stderr"]))
            return None
        except (AgentCubeError, OSError) as e:
            return _file_error(str(e))
        finally:
            os.unlink(local)

    def download_files(self, paths: list[str]) -> list[FileDownloadResponse]:
        out: list[FileDownloadResponse] = []
        for path in paths:
            content, error = self._download(path)
            out.append(FileDownloadResponse(path=path, content=content, error=error))
        return out

    def _download(self, path: str) -> tuple[Optional[bytes], Optional[str]]:
        if not path.strip() or "\0" in path:
            return None, "invalid_path"
        staging = self._staging()
        r = self._run(["sh", "-c", _FETCH, "sh", staging, path])
        if r["exit_code"] != 0:
            return None, _file_error(str(r["stderr"]))
        fd, local = tempfile.mkstemp(prefix="agentcube-download-")
        os.close(fd)
        try:
            self._client.download_file(staging, local)
            with open(local, "rb") as f:
                return f.read(), None
        except (AgentCubeError, OSError) as e:
            return None, _file_error(str(e))
        finally:
            os.unlink(local)
            self._run(["rm", "-f", "--", staging])
