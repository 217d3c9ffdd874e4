"""The chart's RBAC allows every request the Router and the Workload Manager really made during
this suite. On the test cluster both binaries authenticate as the chart's service accounts (`kube`:
their tokens in a kubeconfig; `cluster` via `scripts/cluster.py --e2e`: the installed chart's pods,
in-cluster) and the API server's RBAC authorizer decides; its audit log records each decision.
Named `zz` so it runs after the others, when every code path has made its calls."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "agentcube"  # both binaries run with AGENTCUBE_NAMESPACE=agentcube
EXPECTED = {
    "workload-manager": {("watch", "sandboxes"), ("create", "sandboxes"), ("create", "sandboxclaims"),
                         ("patch", "sandboxwarmpools"), ("patch", "sandboxtemplates"),
                         ("watch", "codeinterpreters"), ("watch", "secrets"), ("watch", "networkpolicies"),
                         ("patch", "networkpolicies")},
    # The Router reads its key from the chart's identity Secret, mounted: no API request at all.
    "router": set(),
}


def test_chart_rbac_allows_every_request_the_binaries_made(stack):
    if getattr(stack, "audit_log", None) is None:
        pytest.skip("needs the test cluster's audit log")
    expected = EXPECTED
    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    events = stack.audit()
    for component, sa in [("workload-manager", values["workloadmanager"]["serviceAccountName"]),
                          ("router", values["router"]["serviceAccountName"])]:
        user = f"system:serviceaccount:{NAMESPACE}:{sa}"
        made = [e for e in events if e["user"]["username"] == user]
        assert made or not expected[component], f"no request from {component} ({user}) in the audit log"
        denied = sorted({(e["verb"], e["requestURI"].split("?")[0], e.get("responseStatus", {}).get("code"))
                         for e in made
                         if e.get("annotations", {}).get("authorization.k8s.io/decision") != "allow"})
        assert not denied, f"{component} ({sa}) was refused: {denied}"
        # The log holds the requests that matter, so "nothing refused" means something.
        kinds = {(e["verb"], e.get("objectRef", {}).get("resource")) for e in made}
        assert expected[component] <= kinds, f"{component} made only {sorted(kinds, key=str)}"


READ = {"get", "list", "watch"}
# Granted but not used against agent-sandbox v1.0: the Workload Manager GETs a Sandbox's pod only
# when the Sandbox's status names no pod IP (agent-sandbox before v0.5).
FALLBACK = {("", "pods", "get")}
# A service account no binding names: what it may do, every authenticated user may (reviews of
# itself, discovery, and from Kubernetes 1.37 reading ClusterTrustBundles), so it is not the chart's.
BASELINE_USER = "system:serviceaccount:rbac-baseline:nobody"


def granted(stack, user: str, namespace: str) -> set:
    """(group, resource, verb) the API server's authorizer lets `user` do in `namespace`
    (a SelfSubjectRulesReview made as that user, through impersonation)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview", "spec": {"namespace": namespace}}
    r = subprocess.run(stack.kubectl + ["create", "--validate=false", "-f", "-", "-o", "json", f"--as={user}"], input=json.dumps(review),
                       capture_output=True, text=True, check=True)
    out = set()
    for rule in json.loads(r.stdout)["status"].get("resourceRules", []):
        for g in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                for v in rule["verbs"]:
                    out.add((g, res, v))
    return out


def used(events: list, user: str) -> set:
    out = set()
    for e in events:
        o = e.get("objectRef")
        if e["user"]["username"] != user or not o:
            continue
        res = o["resource"] + (f"/{o['subresource']}" if o.get("subresource") else "")
        out.add((o.get("apiGroup", ""), res, e["verb"]))
    return out


def test_service_accounts_are_granted_no_more_than_the_binaries_use(stack):
    """Least privilege, on the chart as installed: every write a service account may make was made
    during the suite; reads count as one (a component that lists a kind may also get and watch
    it)."""
    if stack.backend != "cluster" or getattr(stack, "audit_log", None) is None:
        pytest.skip("needs the chart installed on the test cluster (scripts/cluster.py --e2e)")
    values = yaml.safe_load((REPO / "deploy/helm/agentcube/values.yaml").read_text())
    events = stack.audit()
    for sa in (values["workloadmanager"]["serviceAccountName"], values["router"]["serviceAccountName"]):
        user = f"system:serviceaccount:{NAMESPACE}:{sa}"
        made = used(events, user)
        read_kinds = {(g, r) for g, r, v in made if v in READ}
        # A server-side apply that creates its object is a `patch` the API server also authorizes
        # as `create`.
        made |= {(g, r, "create") for g, r, v in made if v == "patch" and not r.endswith("/status")}
        # Owner references with blockOwnerDeletion need `update` on the owner's finalizers where
        # the OwnerReferencesPermissionEnforcement admission plugin is on (not here).
        if any(r == "sandboxtemplates" for _, r, _ in made):
            made.add(("runtime.agentcube.volcano.sh", "codeinterpreters/finalizers", "update"))
        extra = set()
        for ns in (NAMESPACE, "default"):
            everyone = granted(stack, BASELINE_USER, ns)
            for g, r, v in granted(stack, user, ns) - everyone:
                if (g, r, v) in made or (v in READ and (g, r) in read_kinds) or (g, r, v) in FALLBACK:
                    continue
                extra.add((ns, g or "core", r, v))
        assert not extra, f"{sa} is granted what it never used: {sorted(extra)}"
