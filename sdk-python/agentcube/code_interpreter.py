"""``CodeInterpreterClient``: one sandbox session for running code (upstream-compatible API)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional
from urllib.parse import quote

from agentcube.auth import AuthProvider, resolve_auth
from agentcube.clients.code_interpreter_data_plane import (
    CodeInterpreterDataPlaneClient,
    Command,
    OutputCallback,
    command_argv,
)
from agentcube.clients.control_plane import ControlPlaneClient
from agentcube.exceptions import CommandExecutionError
from agentcube.contexts import Context, Execution, execution_from
from agentcube.processes import Process, list_processes, process_from

log = logging.getLogger(__name__)


class CodeInterpreterClient:
    """A Code Interpreter session. Created at the Workload Manager on construction (or, with
    ``session_id``, an existing one, attached without a call), used through the Router, deleted
    by :meth:`stop` or ``with``."""

    def __init__(
        self,
        name: str = "my-interpreter",
        namespace: str = "default",
        ttl: int = 3600,
        workload_manager_url: Optional[str] = None,
        router_url: Optional[str] = None,
        auth_token: Optional[str] = None,
        verbose: bool = False,
        session_id: Optional[str] = None,
        auth: Optional[AuthProvider] = None,
    ):
        if verbose:
            logging.basicConfig(level=logging.DEBUG)
        self.name = name
        self.namespace = namespace
        self.ttl = ttl
        self._auth = resolve_auth(auth, auth_token)
        self._cp = ControlPlaneClient(workload_manager_url, auth=self._auth)
        # With ``session_id`` no call, as upstream: a session that does not exist (any more) is
        # SessionNotFoundError at the first call, with the Router's reason. (Reading it at the
        # Workload Manager first cost a round trip, needed the manager reachable, and failed
        # under its caller authentication for a caller that did not create the session.)
        created = session_id is None
        if session_id is None:
            try:
                session_id = self._cp.create_session(name=name, namespace=namespace, ttl=ttl)
            except Exception:
                self._cp.close()
                raise
        self._session_id: Optional[str] = session_id
        try:
            self._dp = CodeInterpreterDataPlaneClient(
                session_id, name=name, namespace=namespace, router_url=router_url, auth=self._auth
            )
        except Exception:
            if created:
                self._cp.delete_session(session_id)
            self._cp.close()
            raise

    @property
    def session_id(self) -> Optional[str]:
        """The session's id; ``None`` once the Router said the session no longer exists
        (:class:`SessionNotFoundError`): every later call raises that error again, and no new
        session is created behind the caller's back."""
        dp = self.__dict__.get("_dp")
        return dp.session_id if dp is not None else self._session_id

    def __enter__(self) -> "CodeInterpreterClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def execute_command(
        self, command: Command, timeout: Optional[float] = None, on_output: Optional[OutputCallback] = None
    ) -> str:
        """Runs a command (argv list, or a string split into words — no shell) and returns its
        stdout; raises :class:`CommandExecutionError` on a non-zero exit. With ``on_output``,
        output is streamed to ``on_output(stream, text)`` as it happens."""
        return self._dp.execute_command(command, timeout=timeout, on_output=on_output)

    def execute_command_result(
        self, command: Command, timeout: Optional[float] = None, on_output: Optional[OutputCallback] = None
    ) -> Dict[str, Any]:
        """Runs a command; returns ``{"stdout", "stderr", "exit_code"}`` without raising on failure."""
        if on_output is not None:
            return self._dp.execute_command_stream(command, on_output, timeout=timeout)
        return self._dp.execute_command_result(command, timeout=timeout)

    def run_code(
        self,
        language: str,
        code: str,
        timeout: Optional[float] = None,
        on_output: Optional[OutputCallback] = None,
        context: Optional[Context] = None,
    ) -> str:
        """Writes ``code`` to a script in the workspace and runs it in a fresh process (python or
        bash), as upstream: nothing survives between calls. With ``context`` (from
        :meth:`create_context`) it runs as a cell of that persistent interpreter instead. Returns
        stdout; raises :class:`CommandExecutionError` on failure."""
        if context is not None:
            ex = self.run_cell(code, context=context, timeout=timeout, on_output=on_output)
            if ex.error is not None:
                raise CommandExecutionError(ex.exit_code or 1, ex.stderr or f"{ex.error.name}: {ex.error.value}", code)
            return ex.stdout
        return self._dp.run_code(language, code, timeout=timeout, on_output=on_output)

    def write_file(self, content: str, remote_path: str) -> None:
        """Writes text to a file in the sandbox (relative to the workspace)."""
        self._dp.write_file(content, remote_path)

    def upload_file(self, local_path: str, remote_path: str) -> None:
        """Uploads a local file to the sandbox."""
        self._dp.upload_file(local_path, remote_path)

    def download_file(self, remote_path: str, local_path: str) -> None:
        """Downloads a file from the sandbox."""
        self._dp.download_file(remote_path, local_path)

    def list_files(self, path: str = ".") -> List[Dict[str, Any]]:
        """Lists a directory in the sandbox."""
        return self._dp.list_files(path)

    def create_context(self, language: str = "python", cwd: Optional[str] = None,
                       env: Optional[Dict[str, str]] = None) -> Context:
        """A persistent ``python`` interpreter or ``bash`` shell in the sandbox."""
        body: Dict[str, Any] = {"language": language}
        if cwd is not None:
            body["cwd"] = cwd
        if env:
            body["env"] = env
        made = self._dp.post_json("api/contexts", body)
        return Context(str(made["id"]), str(made["language"]), str(made.get("cwd") or "."))

    def list_contexts(self) -> List[Context]:
        return [Context(str(c["id"]), str(c["language"]), str(c.get("cwd") or "."))
                for c in self._dp.get_json("api/contexts")]

    def run_cell(self, code: str, context: Context, timeout: Optional[float] = None,
                 on_output: Optional[OutputCallback] = None) -> Execution:
        """Runs ``code`` in ``context``; returns an :class:`Execution` (output, results with
        ``.text``/``.html``/``.json``/``.png``, ``error``, ``execution_count``). A cell past its
        timeout is interrupted and the context keeps its state."""
        body: Dict[str, Any] = {"code": code}
        if timeout is not None:
            body["timeout"] = f"{timeout}s"
        events = []
        for e in self._dp.post_ndjson(f"api/contexts/{quote(context.id, safe='')}/execute", body):
            events.append(e)
            if on_output is not None and e.get("type") in ("stdout", "stderr"):
                on_output(str(e["type"]), str(e.get("data", "")))
        return execution_from(events)

    def interrupt(self, context: Context) -> None:
        """KeyboardInterrupt (Ctrl-C) in the context's running cell; its state stays."""
        self._dp.post_json(f"api/contexts/{quote(context.id, safe='')}/interrupt", {})

    def restart(self, context: Context) -> None:
        """A fresh interpreter: the context's state is cleared."""
        self._dp.post_json(f"api/contexts/{quote(context.id, safe='')}/restart", {})

    def delete_context(self, context: Context) -> None:
        # POST, not DELETE: the Router passes only GET and POST on, as upstream's does.
        self._dp.raw_post(f"api/contexts/{quote(context.id, safe='')}/delete", b"")

    def start_process(
        self, command: Command, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None
    ) -> Process:
        """Starts a background process in the sandbox (it outlives this call, has no execute
        timeout and dies with the sandbox). See :class:`agentcube.processes.Process`."""
        body: Dict[str, Any] = {"command": command_argv(command)}
        if cwd is not None:
            body["cwd"] = cwd
        if env:
            body["env"] = env
        started = self._dp.post_json("api/processes", body)
        return process_from(self._dp, started)

    def list_processes(self) -> List[Dict[str, Any]]:
        """Every process started in this session: ``id``, ``pid``, ``command``, ``running``,
        ``exit_code``."""
        return list_processes(self._dp)

    def record(self) -> Dict[str, Any]:
        """The session's record at the Workload Manager (``status``, ``expiresAt``, ...). Raises
        :class:`SessionNotFoundError` once the session has gone — at once, where the Router may
        still route a deleted session for its cache's TTL while the sandbox terminates."""
        return self._cp.get_session(str(self.session_id))

    def kill_all_processes(self) -> int:
        """Ends every process in the sandbox but its server (PicoD): what commands left running
        in the background, processes, contexts' interpreters. The way back for a session at its
        process limit (a fork bomb, servers started in a loop), where not even ``kill`` can
        start; the workspace is kept. Answers how many processes were ended. Refused (HTTP 409,
        :class:`DataPlaneError`) where the sandbox is not a process namespace of its own."""
        answer = self._dp.post_json("api/processes/kill-all", {})
        return int(answer["killed"])

    def attach_process(self, process_id: str) -> Process:
        """A handle on a process started earlier (e.g. by another client of the same session)."""
        for item in self.list_processes():
            if item["id"] == process_id:
                return process_from(self._dp, item)
        raise KeyError(f"no process {process_id} in session {self.session_id}")

    def stop(self) -> None:
        """Deletes the session (never raises) and closes connections."""
        try:
            self._dp.close()
        finally:
            if self.session_id:
                self._cp.delete_session(self.session_id)
            self._cp.close()
