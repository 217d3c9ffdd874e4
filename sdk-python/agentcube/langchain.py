"""LangChain tools over a Code Interpreter sandbox (extra ``langchain``; needs ``langchain-core``).

- :func:`python_tool` — runs Python in the session's persistent context (variables survive
  between calls, like a notebook); returns output and the last expression's value, or the error.
- :func:`shell_tool` — runs a shell command in the sandbox (upstream's ``execute_command_result``
  underneath: the exit code and stderr are in the answer, nothing raises).

Both speak langchain-core's tool interface (``tool.invoke(...)``, or any agent that takes tools).
"""

from __future__ import annotations

from typing import Optional

from langchain_core.tools import BaseTool, StructuredTool

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.contexts import Context


def python_tool(client: CodeInterpreterClient, name: str = "python") -> BaseTool:
    """A tool running Python cells in one persistent context of ``client``'s sandbox."""
    holder: dict[str, Optional[Context]] = {"ctx": None}

    def run(code: str) -> str:
        """Runs Python code in a persistent interpreter in a sandbox (state is kept between
        calls). Returns printed output and the value of the last expression."""
        if holder["ctx"] is None:
            holder["ctx"] = client.create_context("python")
        ctx = holder["ctx"]
        assert ctx is not None
        ex = client.run_cell(code, context=ctx)
        parts = [ex.stdout + ex.stderr] + [r.text for r in ex.results if r.text and not r.png]
        text = "\n".join(p.rstrip("\n") for p in parts if p)
        if ex.error is not None:
            return f"{text}\n{ex.error.name}: {ex.error.value}".strip()
        return text or "(no output)"

    return StructuredTool.from_function(run, name=name)


def shell_tool(client: CodeInterpreterClient, name: str = "shell") -> BaseTool:
    """A tool running shell commands (``sh -c``) in ``client``'s sandbox."""

    def run(command: str) -> str:
        """Runs a shell command in a sandbox. Returns stdout, stderr and the exit code."""
        r = client.execute_command_result(["sh", "-c", command])
        out = str(r["stdout"])
        if r["stderr"]:
            out += f"\n[stderr]\n{r['stderr']}"
        if r["exit_code"] != 0:
            out += f"\n[exit code {r['exit_code']}]"
        return out

    return StructuredTool.from_function(run, name=name)
