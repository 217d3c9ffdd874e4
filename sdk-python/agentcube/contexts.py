"""Stateful code contexts in a Code Interpreter session (PicoD's ``/api/contexts``, an extension
over upstream, whose ``run_code`` stays stateless): variables survive between cells, the last
expression's value and ``display(...)`` come back as results, matplotlib figures as PNG."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Context:
    """A persistent interpreter (``python``) or shell (``bash``) in the sandbox."""

    id: str
    language: str
    cwd: str = "."


@dataclass
class Result:
    """One result of a cell, in the MIME forms the object offered."""

    data: Dict[str, Any]

    @property
    def text(self) -> Optional[str]:
        return self.data.get("text/plain")

    @property
    def html(self) -> Optional[str]:
        return self.data.get("text/html")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    @property
    def png(self) -> Optional[bytes]:
        raw = self.data.get("image/png")
        return base64.b64decode(raw) if raw else None

    def save(self, path: str) -> None:
        """Writes the PNG (or, without one, the text) to ``path``."""
        png = self.png
        if png is not None:
            with open(path, "wb") as f:
                f.write(png)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.text or json.dumps(self.data))


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: List[str] = field(default_factory=list)


@dataclass
class Execution:
    """What one cell did: its output, results, error (``None`` on success) and count."""

    stdout: str = ""
    stderr: str = ""
    results: List[Result] = field(default_factory=list)
    error: Optional[ExecutionError] = None
    execution_count: int = 0
    exit_code: int = 0
    duration: float = 0.0


def execution_from(events: List[Dict[str, Any]]) -> Execution:
    """An :class:`Execution` from a cell's NDJSON events."""
    ex = Execution()
    for e in events:
        kind = e.get("type")
        if kind == "stdout":
            ex.stdout += str(e.get("data", ""))
        elif kind == "stderr":
            ex.stderr += str(e.get("data", ""))
        elif kind == "result":
            ex.results.append(Result(dict(e.get("data") or {})))
        elif kind == "error":
            ex.error = ExecutionError(str(e.get("name", "")), str(e.get("value", "")), list(e.get("traceback") or []))
        elif kind == "end":
            ex.execution_count = int(e.get("execution_count") or 0)
            ex.exit_code = int(e.get("exit_code") or 0)
            ex.duration = float(e.get("duration") or 0.0)
    return ex
