"""The chart's RBAC grants every request the Router and the Workload Manager really made during
this suite (read from the fake API server's audit log). Named `zz` so it runs after the others,
when every code path has made its calls."""

import os
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / ".cache/tools/helm"
NAMESPACE = "agentcube"  # the e2e stack runs both binaries with AGENTCUBE_NAMESPACE=agentcube


def rules_for(docs, service_account):
    """(namespace or None for cluster-wide, rules) of every role bound to the service account."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in b["subjects"]):
            continue
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"])]
        scope = None if b["kind"] == "ClusterRoleBinding" else b["metadata"]["namespace"]
        out.append((scope, role["rules"]))
    return out


def allowed(grants, e):
    for scope, rules in grants:
        if scope is not None and scope != e["namespace"]:
            continue
        for r in rules:
            if e["group"] in r["apiGroups"] and e["resource"] in r["resources"] and e["verb"] in r["verbs"]:
                return True
    return False


def test_chart_rbac_covers_every_request_the_binaries_made(stack, tmp_path):
    if stack.backend != "fake-cluster":
        pytest.skip("needs the fake API server's audit log")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "c"), XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "d"))
    out = subprocess.run([str(HELM), "template", "ac", str(REPO / "deploy/helm/agentcube"), "--namespace", NAMESPACE],
                         env=env, capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    audit = requests.get(f"{stack.api_url}/fake/audit").json()
    for agent, sa in [("agentcube-workload-manager/", values["workloadmanager"]["serviceAccountName"]),
                      ("agentcube-router/", values["router"]["serviceAccountName"])]:
        made = {(e["verb"], e["group"], e["resource"], e["namespace"]) for e in audit if e["user_agent"].startswith(agent)}
        assert made, f"no request from {agent} in the audit log"
        grants = rules_for(docs, sa)
        denied = sorted(m for m in made if not allowed(grants, dict(zip(("verb", "group", "resource", "namespace"), m))))
        assert not denied, f"{sa} would be forbidden: {denied}"
