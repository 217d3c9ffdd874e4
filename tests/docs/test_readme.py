"""The README's configuration reference against the binaries: every flag each binary accepts is
documented in its README section (or in the sections every server shares: listener limits,
admission, store), by its name or its environment variable; every flag `agentcube up`'s table
lists exists, with the variable the binary reads. So a flag added, renamed or removed in the code
cannot leave the README behind."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target/debug"
README = (REPO / "README.md").read_text()
SHARED = ("### Listener limits", "### Admission", "### Store")
# Binary, README section. Each binary's own section, plus the shared ones.
BINARIES = {
    "agentcube up": (["agentcube", "up"], "### `agentcube up`"),
    "workload-manager": (["workload-manager"], "### `workload-manager`"),
    "router": (["router"], "### `router`"),
    "picod": (["picod"], "### `picod`"),
}


@dataclass(frozen=True)
class Flag:
    name: str
    env: str | None


def section(title: str) -> str:
    """The README's text from the heading that starts with `title` to the next heading of the same
    or a higher level."""
    found = re.search(rf"^{re.escape(title)}", README, re.M)
    assert found, f"no README heading {title!r}"
    body = README.index("\n", found.start())
    level = title.split(" ", 1)[0]
    end = re.compile(r"^#{2,%d} " % len(level), re.M).search(README, body)
    return README[found.start():end.start() if end else len(README)]


def flags(argv: list[str]) -> list[Flag]:
    """What `--help` lists: each option's long name and the environment variable clap reads."""
    out = subprocess.run([str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for m in re.finditer(r"^\s+(?:-\w, )?(--[a-z0-9-]+)(.*?)(?=^\s+(?:-\w, )?--|\Z)", out, re.M | re.S):
        env = re.search(r"\[env: ([A-Z0-9_]+)[=\]]", m.group(2))
        found.append(Flag(m.group(1), env.group(1) if env else None))
    return [f for f in found if f.name not in ("--help", "--version")]


def mentioned(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_every_flag_is_documented(binary: str) -> None:
    argv, title = BINARIES[binary]
    docs = section(title) + "".join(section(t) for t in SHARED)
    listed = flags(argv)
    assert len(listed) > 5, f"{binary} --help parsed into {listed}"
    missing = [f.name for f in listed if not mentioned(docs, f.name) and not (f.env and mentioned(docs, f.env))]
    assert not missing, f"{binary}: flags the README does not document under {title!r}: {missing}"


def test_agentcube_up_table_names_real_flags_and_their_variables() -> None:
    actual = {f.name: f for f in flags(BINARIES["agentcube up"][0])}
    rows = re.findall(r"^\| (`--[^|]+) \| ([^|]*) \|", section("### `agentcube up`"), re.M)
    assert len(rows) > 10, rows
    for names, envs in rows:
        names_in_row = re.findall(r"`(--[a-z0-9-]+)`", names)
        envs_in_row = re.findall(r"`([A-Z0-9_]+)`", envs)
        assert names_in_row, names
        for i, name in enumerate(names_in_row):
            assert name in actual, f"the README's `agentcube up` table lists {name}, which `agentcube up` does not take"
            if envs_in_row:
                want = envs_in_row[min(i, len(envs_in_row) - 1)]
                assert actual[name].env == want, f"{name}: the README says {want}, the binary reads {actual[name].env}"


def value_paths(tree: dict[str, object], prefix: str = "") -> set[str]:
    """Every key path of a values file (`router.jwt.issuerUrl`), maps included."""
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        paths.add(path)
        if isinstance(value, dict):
            paths |= value_paths(value, path)
    return paths


def test_every_chart_value_the_readme_names_exists() -> None:
    import yaml

    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    paths = value_paths(values)
    tops = "|".join(re.escape(k) for k in values)
    named = set(re.findall(rf"`((?:{tops})\.[A-Za-z0-9_.]*[A-Za-z0-9_])", README))
    assert len(named) > 20, named
    unknown = sorted(n for n in named if n not in paths)
    assert not unknown, f"the README names chart values that values.yaml does not have: {unknown}"
