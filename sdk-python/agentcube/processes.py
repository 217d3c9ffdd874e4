"""Background processes in a Code Interpreter session (PicoD's ``/api/processes``, an extension
over upstream): start a program, write to its stdin, read its output (resuming where you left
off, or following it live), signal it, wait for its exit code."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional
from urllib.parse import quote

if TYPE_CHECKING:  # pragma: no cover
    from agentcube.clients.code_interpreter_data_plane import CodeInterpreterDataPlaneClient


@dataclass
class OutputChunk:
    """One piece of output: ``stream`` is ``"stdout"`` or ``"stderr"``; ``seq`` orders them."""

    seq: int
    stream: str
    data: str


@dataclass
class Process:
    """A process started with :meth:`CodeInterpreterClient.start_process` (or attached with
    :meth:`CodeInterpreterClient.attach_process`)."""

    id: str
    pid: int
    _dp: "CodeInterpreterDataPlaneClient" = field(repr=False)
    #: Sequence number after the last chunk :meth:`output` returned (where the next read starts).
    next_seq: int = 0
    #: Exit code once known (``-1`` for a process ended by a signal).
    exit_code: Optional[int] = None
    #: Chunks older than the buffer that were lost before they were read.
    missed: int = 0

    def _path(self, tail: str) -> str:
        return f"api/processes/{quote(self.id, safe='')}/{tail}"

    def write_stdin(self, data: "bytes | str") -> None:
        """Writes to the process's stdin."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        self._dp.raw_post(self._path("stdin"), raw)

    def close_stdin(self) -> None:
        """Closes stdin (the process reads end of file)."""
        self._dp.raw_post(self._path("stdin/close"), b"")

    def signal(self, signal: str = "TERM") -> None:
        """Sends ``INT``, ``TERM`` or ``KILL`` to the process group."""
        self._dp.raw_post(self._path("signal"), json.dumps({"signal": signal}).encode())

    def kill(self) -> None:
        self.signal("KILL")

    def output(self, follow: bool = False, since: Optional[int] = None) -> Iterator[OutputChunk]:
        """Output from ``since`` (default: where the last read stopped). With ``follow``, keeps
        yielding until the process ends (then :attr:`exit_code` is set). Reconnecting later
        loses nothing still in PicoD's buffer."""
        start = self.next_seq if since is None else since
        for chunk in self._chunks(start, follow, count_missed=True):
            self.next_seq = chunk.seq + 1
            yield chunk

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the process to end and returns its exit code (``TimeoutError`` when
        ``timeout`` seconds pass first; the process keeps running). The output stays unread:
        :meth:`output` afterwards still yields it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = self.next_seq
        while self.exit_code is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"process {self.id} still running after {timeout} s")
            for chunk in self._chunks(cursor, follow=deadline is None, count_missed=False):
                cursor = chunk.seq + 1
            if self.exit_code is None and deadline is not None:
                time.sleep(0.1)
        return self.exit_code

    def _chunks(self, since: int, follow: bool, count_missed: bool) -> Iterator[OutputChunk]:
        """PicoD's output events from ``since`` as chunks, noting the exit code (and, when
        ``count_missed``, output lost from the buffer)."""
        query = {"since": since, "follow": "true" if follow else "false"}
        for event in self._dp.ndjson(self._path("output"), query):
            if "missed" in event:
                self.missed += int(event["missed"]) if count_missed else 0
            elif "exit_code" in event:
                self.exit_code = int(event["exit_code"])
            else:
                yield OutputChunk(int(event["seq"]), str(event["stream"]), str(event["data"]))


def process_from(dp: "CodeInterpreterDataPlaneClient", item: Dict[str, Any]) -> Process:
    return Process(id=str(item["id"]), pid=int(item.get("pid") or 0), _dp=dp,
                   exit_code=item.get("exit_code") if not item.get("running", True) else None)


def list_processes(dp: "CodeInterpreterDataPlaneClient") -> List[Dict[str, Any]]:
    return list(dp.get_json("api/processes"))
