"""The chart's RBAC allows every request the Router and the Workload Manager really made during
this suite. On the `kube` backend both binaries authenticate as the chart's service accounts and
the API server's RBAC authorizer decides; its audit log records each decision. Named `zz` so it
runs after the others, when every code path has made its calls."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "agentcube"  # the e2e stack runs both binaries with AGENTCUBE_NAMESPACE=agentcube
EXPECTED = {
    "workload-manager": {("watch", "sandboxes"), ("create", "sandboxes"), ("create", "sandboxclaims"),
                         ("patch", "sandboxwarmpools"), ("patch", "sandboxtemplates"), ("get", "pods"),
                         ("watch", "codeinterpreters"), ("watch", "secrets")},
    "router": {("create", "secrets")},
}


def test_chart_rbac_allows_every_request_the_binaries_made(stack):
    if stack.backend != "kube":
        pytest.skip("needs the test cluster's audit log")
    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    events = stack.audit()
    for component, sa in [("workload-manager", values["workloadmanager"]["serviceAccountName"]),
                          ("router", values["router"]["serviceAccountName"])]:
        user = f"system:serviceaccount:{NAMESPACE}:{sa}"
        made = [e for e in events if e["user"]["username"] == user]
        assert made, f"no request from {component} ({user}) in the audit log"
        denied = sorted({(e["verb"], e["requestURI"].split("?")[0], e.get("responseStatus", {}).get("code"))
                         for e in made
                         if e.get("annotations", {}).get("authorization.k8s.io/decision") != "allow"})
        assert not denied, f"{component} ({sa}) was refused: {denied}"
        # The log holds the requests that matter, so "nothing refused" means something.
        kinds = {(e["verb"], e.get("objectRef", {}).get("resource")) for e in made}
        assert EXPECTED[component] <= kinds, f"{component} made only {sorted(kinds, key=str)}"
