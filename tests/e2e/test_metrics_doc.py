"""The README's metrics table against what `agentcube up` serves on `/metrics` (the Router's and
the Workload Manager's together): every family it exposes is documented, and every Router or
Workload Manager family the table lists without labels is exposed (a labelled one only shows
once it has a sample). So a metric added, renamed or dropped in the
code cannot leave the table behind."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import requests

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# Families only the Kubernetes backend or PicoD serve (not `agentcube up`'s endpoint).
ELSEWHERE = ("agentcube_picod_", "agentcube_workload_manager_standby_claims_ready")
# What the table's shared row stands for: every listener's counters, under each prefix.
LISTENER_PREFIXES = ("agentcube_router", "agentcube_workload_manager")


def expand(name: str) -> list[str]:
    """`a_{b,c}_total` → `a_b_total`, `a_c_total`; a leading `*_` → each listener prefix."""
    parts = re.split(r"\{([^}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    names = ["".join(c) for c in itertools.product(*choices)]
    if name.startswith("*_"):
        return [f"{prefix}{n[1:]}" for n in names for prefix in LISTENER_PREFIXES]
    return names


def documented() -> dict[str, bool]:
    """The table's families, each with whether it has labels (its row's second column names
    some): a labelled family shows on `/metrics` only once it has a sample."""
    start = README.index("### Metrics\n")
    table = README[start:README.index("\n## ", start)]
    names = {}
    for names_cell, kind_cell in re.findall(r"^\| (.*?) \| (.*?) \|", table, re.M):
        for code in re.findall(r"`(agentcube_[a-z0-9_{},]+|\*_[a-z0-9_{},]+)`", names_cell):
            names.update(dict.fromkeys(expand(code), "`" in kind_cell))
    return names


def exposed(text: str) -> set[str]:
    """The families of an OpenMetrics text, counters under their sample name (`…_total`)."""
    families = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        families.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return families


def test_the_metrics_table_matches_what_agentcube_up_serves(stack) -> None:
    if stack.backend != "local":
        pytest.skip("reads `agentcube up`'s own metrics endpoint")
    served = {n for n in exposed(requests.get(stack.metrics_url, timeout=5).text) if n.startswith("agentcube_")}
    assert len(served) > 20, served
    docs = documented()
    undocumented = sorted(served - docs.keys())
    assert not undocumented, f"served on /metrics but not in the README's table: {undocumented}"
    missing = sorted(n for n, labelled in docs.items()
                     if n not in served and not labelled and not n.startswith(ELSEWHERE))
    assert not missing, f"in the README's table but not served by `agentcube up`: {missing}"
