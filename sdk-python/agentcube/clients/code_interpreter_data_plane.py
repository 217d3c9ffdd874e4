"""Router data-plane client for Code Interpreter sessions (PicoD behind the Router, spec §6.2)."""

from __future__ import annotations

import ast
import base64
import json
import os
import shlex
import time
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Union
from urllib.parse import quote, urljoin

import requests

from agentcube.auth import AuthProvider
from agentcube.clients.errors import raise_for_response
from agentcube.clients.http import pooled_session
from agentcube.exceptions import CommandExecutionError, SessionNotFoundError

SESSION_HEADER = "x-agentcube-session-id"
DEFAULT_TIMEOUT = 120
#: PicoD's body limit (upstream's too): uploads that fit in one body under it are sent as
#: upstream sends them, larger ones are streamed (see ``_stream_upload``).
BODY_LIMIT = 32 * 1024 * 1024
#: Largest file ``upload_file`` sends as multipart (room left for the form's framing).
MULTIPART_MAX_BYTES = BODY_LIMIT - 64 * 1024
#: Largest content ``write_file`` sends as base64 in JSON.
INLINE_MAX_BYTES = MULTIPART_MAX_BYTES * 3 // 4
Command = Union[str, Sequence[str]]
OutputCallback = Callable[[str, str], None]
#: ``run_code`` languages, as upstream names them.
PYTHON_NAMES = ("python", "py", "python3")
SHELL_NAMES = ("bash", "sh")


def command_argv(command: Command) -> List[str]:
    """A string is split like a shell would split words (no shell runs it); a list is kept."""
    if isinstance(command, str):
        return shlex.split(command)
    return list(command)


def timeout_string(timeout: Optional[float]) -> str:
    """Upstream sends ``f"{t}s"``: ``"120s"`` for the default, ``"30.0s"`` for floats."""
    return f"{timeout if timeout is not None else DEFAULT_TIMEOUT}s"


def file_url_path(remote_path: str) -> str:
    """``remote_path`` as the URL path under ``api/files/``: each segment percent-encoded, so a
    name holding ``#``, ``?`` or ``%`` is itself, and ``.``/``..`` as ``%2E``/``%2E%2E`` so the
    HTTP client sends them instead of resolving them (out of the invocation's prefix); PicoD,
    whose workspace they are, resolves them there (an escape is its 403)."""
    dots = {".": "%2E", "..": "%2E%2E"}
    return "/".join(dots.get(seg, quote(seg, safe="")) for seg in remote_path.lstrip("/").split("/"))


def unescaped_newlines(code: str) -> str:
    """Python whose newlines came double-escaped (``\\n``, as models write them) made valid, as
    upstream does; code that parses, or does not parse either way, is kept."""
    try:
        ast.parse(code)
        return code
    except (SyntaxError, ValueError):
        fixed = code.replace("\\n", "\n")
        try:
            ast.parse(fixed)
            return fixed
        except (SyntaxError, ValueError):
            return code


class CodeInterpreterDataPlaneClient:
    """Calls PicoD through the Router for one session. Takes upstream's arguments, in upstream's
    order (``session_id, router_url, namespace, cr_name, base_url, timeout, connect_timeout,
    pool_connections, pool_maxsize``); ``name`` is ``cr_name``'s other spelling, and the Router
    URL, namespace and name default to ``ROUTER_URL``, ``default`` and ``my-interpreter``."""

    def __init__(
        self,
        session_id: str,
        router_url: Optional[str] = None,
        namespace: Optional[str] = None,
        cr_name: Optional[str] = None,
        base_url: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = 5.0,
        pool_connections: int = 10,
        pool_maxsize: int = 10,
        *,
        name: Optional[str] = None,
        auth: Optional[AuthProvider] = None,
    ):
        self.session_id: Optional[str] = session_id
        self._gone: Optional[str] = None
        self.cr_name = cr_name or name or "my-interpreter"
        if base_url:
            self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        else:
            base = router_url or os.getenv("ROUTER_URL")
            if not base:
                raise ValueError("Router URL must be provided via 'router_url' or the ROUTER_URL environment variable.")
            # As upstream: an absolute path, so a path prefix in ROUTER_URL is dropped.
            path = f"/v1/namespaces/{namespace or 'default'}/code-interpreters/{self.cr_name}/invocations/"
            self.base_url = urljoin(base, path)
        self.auth = auth
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.session = pooled_session(pool_connections, pool_maxsize)

    def _check(self, resp: requests.Response) -> None:
        """Raises for an error answer; a session the Router does not know is forgotten."""
        try:
            raise_for_response(resp, self.session_id)
        except SessionNotFoundError:
            self._gone, self.session_id = self.session_id, None
            raise

    def _headers(self, json_body: bool = False) -> Dict[str, str]:
        if self.session_id is None:
            # Never a request without the header: the Router would make a new session.
            raise SessionNotFoundError(f"session {self._gone} no longer exists: create a new CodeInterpreterClient")
        h = {SESSION_HEADER: self.session_id}
        if json_body:
            h["Content-Type"] = "application/json"
        if self.auth:
            h["Authorization"] = f"Bearer {self.auth.get_token()}"
        return h

    def _url(self, path: str) -> str:
        return urljoin(self.base_url, path)

    def execute_command(
        self, command: Command, timeout: Optional[float] = None, on_output: Optional[OutputCallback] = None
    ) -> str:
        """Runs a command (argv list, or a string split into words — no shell) and returns its
        stdout; raises :class:`CommandExecutionError` on a non-zero exit. With ``on_output``,
        output is streamed to ``on_output(stream, text)`` as it happens."""
        if on_output is not None:
            result = self.execute_command_stream(command, on_output, timeout=timeout)
        else:
            result = self.execute_command_result(command, timeout=timeout)
        if result["exit_code"] != 0:
            raise CommandExecutionError(result["exit_code"], result["stderr"], command)
        return str(result["stdout"])

    def run_code(
        self, language: str, code: str, timeout: Optional[float] = None, on_output: Optional[OutputCallback] = None
    ) -> str:
        """Writes ``code`` to a script in the workspace and runs it in a fresh process (python or
        bash), as upstream: nothing survives between calls. Returns stdout; raises
        :class:`CommandExecutionError` on failure."""
        lang = language.lower()
        stamp = int(time.time() * 1000)
        if lang in PYTHON_NAMES:
            code = unescaped_newlines(code)
            # -u: unbuffered, so on_output sees each line as it is printed.
            script, argv = f"script_{stamp}.py", ["python3", "-u"]
        elif lang in SHELL_NAMES:
            script, argv = f"script_{stamp}.sh", ["bash"]
        else:
            raise ValueError(f"unsupported language {language!r}: use python or bash")
        self.write_file(code, script)
        return self.execute_command(argv + [script], timeout=timeout, on_output=on_output)

    def execute_command_result(self, command: Command, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Runs a command; returns ``{"stdout", "stderr", "exit_code"}`` whatever the exit code."""
        t = timeout if timeout is not None else self.timeout
        body = {"command": command_argv(command), "timeout": timeout_string(t)}
        resp = self.session.post(
            self._url("api/execute"),
            data=json.dumps(body),
            headers=self._headers(json_body=True),
            timeout=(self.connect_timeout, t + 2),
        )
        self._check(resp)
        data = resp.json()
        return {
            "stdout": data.get("stdout") or "",
            "stderr": data.get("stderr") or "",
            "exit_code": data.get("exit_code", -1),
        }

    def execute_command_stream(
        self, command: Command, on_output: OutputCallback, timeout: Optional[float] = None
    ) -> Dict[str, Any]:
        """Runs a command and calls ``on_output(stream, text)`` (``stream`` is ``"stdout"`` or
        ``"stderr"``) as output arrives. Returns the same dict as :meth:`execute_command_result`."""
        t = timeout if timeout is not None else self.timeout
        body = {"command": command_argv(command), "timeout": timeout_string(t)}
        headers = self._headers(json_body=True)
        headers["Accept"] = "application/x-ndjson"
        out: Dict[str, List[str]] = {"stdout": [], "stderr": []}
        exit_code = -1
        with self.session.post(
            self._url("api/execute"), data=json.dumps(body), headers=headers, stream=True,
            timeout=(self.connect_timeout, t + 2),
        ) as resp:
            self._check(resp)
            for line in resp.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type")
                if kind in ("stdout", "stderr"):
                    out[kind].append(event.get("data", ""))
                    on_output(kind, event.get("data", ""))
                elif kind == "exit":
                    exit_code = event.get("exit_code", -1)
        return {"stdout": "".join(out["stdout"]), "stderr": "".join(out["stderr"]), "exit_code": exit_code}

    def write_file(self, content: str, remote_path: str) -> None:
        """Writes text (UTF-8) to ``remote_path`` in the sandbox."""
        self.write_bytes(content.encode("utf-8"), remote_path)

    def write_bytes(self, content: bytes, remote_path: str) -> None:
        if len(content) > INLINE_MAX_BYTES:
            self._stream_upload(content, remote_path)
            return
        body = {"path": remote_path, "content": base64.b64encode(content).decode("ascii"), "mode": "0644"}
        resp = self.session.post(
            self._url("api/files"), data=json.dumps(body), headers=self._headers(json_body=True),
            timeout=(self.connect_timeout, self.timeout),
        )
        self._check(resp)

    def upload_file(self, local_path: str, remote_path: str) -> None:
        """Uploads a local file: multipart, as upstream, when it fits PicoD's 32 MiB body limit;
        a larger file is streamed (an extension of PicoD's: the file is never all in memory, on
        either side)."""
        with open(local_path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MULTIPART_MAX_BYTES:
                self._stream_upload(f, remote_path)
                return
            files = {"file": (os.path.basename(local_path), f)}
            data = {"path": remote_path, "mode": "0644"}
            resp = self.session.post(
                self._url("api/files"), files=files, data=data, headers=self._headers(), timeout=self.timeout
            )
        self._check(resp)

    def _stream_upload(self, data: Union[bytes, BinaryIO], remote_path: str) -> None:
        """``POST api/files?path=…`` with the raw bytes (``application/octet-stream``): PicoD
        writes them to disk as they come and puts the file in place once complete."""
        headers = self._headers()
        headers["Content-Type"] = "application/octet-stream"
        resp = self.session.post(
            self._url("api/files"), params={"path": remote_path, "mode": "0644"}, data=data,
            headers=headers, timeout=(self.connect_timeout, self.timeout),
        )
        self._check(resp)

    def download_file(self, remote_path: str, local_path: str) -> None:
        """Downloads ``remote_path`` to ``local_path`` (parent directories are created)."""
        url = self._url(f"api/files/{file_url_path(remote_path)}")
        with self.session.get(url, headers=self._headers(), stream=True, timeout=(self.connect_timeout, self.timeout)) as resp:
            self._check(resp)
            parent = os.path.dirname(os.path.abspath(local_path))
            os.makedirs(parent, exist_ok=True)
            with open(local_path, "wb") as f:
                for chunk in resp.iter_content(chunk_size=8192):
                    if chunk:
                        f.write(chunk)

    def list_files(self, path: str = ".") -> List[Dict[str, Any]]:
        resp = self.session.get(
            self._url("api/files"), params={"path": path}, headers=self._headers(),
            timeout=(self.connect_timeout, self.timeout),
        )
        self._check(resp)
        files: List[Dict[str, Any]] = resp.json().get("files", [])
        return files

    def post_json(self, path: str, body: Dict[str, Any]) -> Any:
        """POSTs JSON to a PicoD route; returns the JSON answer."""
        resp = self.session.post(
            self._url(path), data=json.dumps(body), headers=self._headers(json_body=True),
            timeout=(self.connect_timeout, self.timeout),
        )
        self._check(resp)
        return resp.json()

    def raw_post(self, path: str, data: bytes) -> Any:
        """POSTs raw bytes to a PicoD route; returns the JSON answer."""
        resp = self.session.post(
            self._url(path), data=data, headers=self._headers(), timeout=(self.connect_timeout, self.timeout)
        )
        self._check(resp)
        return resp.json()

    def get_json(self, path: str) -> Any:
        resp = self.session.get(self._url(path), headers=self._headers(), timeout=(self.connect_timeout, self.timeout))
        self._check(resp)
        return resp.json()

    def post_ndjson(self, path: str, body: Dict[str, Any], timeout: Optional[float] = None) -> Iterator[Dict[str, Any]]:
        """POSTs JSON asking for NDJSON; yields each decoded line as it arrives."""
        headers = self._headers(json_body=True)
        headers["Accept"] = "application/x-ndjson"
        with self.session.post(
            self._url(path), data=json.dumps(body), headers=headers, stream=True,
            timeout=(self.connect_timeout, timeout),
        ) as resp:
            self._check(resp)
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def ndjson(self, path: str, params: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """GETs an NDJSON stream, one decoded line at a time (no read timeout: it may follow)."""
        with self.session.get(
            self._url(path), params=params, headers=self._headers(), stream=True, timeout=(self.connect_timeout, None)
        ) as resp:
            self._check(resp)
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        self.session.close()
