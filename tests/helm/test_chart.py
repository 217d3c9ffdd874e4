"""The Helm chart: lint, render variants, validate every manifest, and prove the rendered args and
env are what the binaries accept (so the chart cannot drift from the code)."""

import base64
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy/helm/agentcube"
HELM = REPO / ".cache/tools/helm"
VALIDATE = REPO / ".venv/bin/kubernetes-validate"
BIN = {"agentcube-router": REPO / "target/debug/router", "workloadmanager": REPO / "target/debug/workload-manager"}

VARIANTS = {
    "defaults": [],
    "replicas": ["--set", "router.replicas=3", "--set", "workloadmanager.replicas=2"],
    "redis-secret": ["--set", "redis.secretName=my-redis", "--set", "redis.secretKey=pw"],
    "redis-password": ["--set", "redis.password=s3cret"],
    "oidc": ["--set", "router.jwt.issuerUrl=https://idp.example/realms/agentcube",
             "--set", "router.jwt.roleClaim=realm_access.roles", "--set", "router.jwt.requiredRole=sandbox:invoke"],
    "wm-auth": ["--set", "workloadmanager.auth.enabled=true",
                "--set", "workloadmanager.auth.adminGroup=system:serviceaccounts:agentcube-admins"],
    "bundled-redis": ["--set", "bundledRedis.enabled=true"],
    "bundled-redis-secret": ["--set", "bundledRedis.enabled=true", "--set", "redis.secretName=my-redis"],
    "standby-claims": ["--set", "workloadmanager.standbyClaims=2"],
    "code-interpreter-uid": ["--set", "workloadmanager.codeInterpreterUid=65532"],
    "metadata-access": ["--set", "workloadmanager.sandboxMetadataAccess=true"],
    "user-namespaces": ["--set", "workloadmanager.sandboxUserNamespaces=true"],
    "mtls": ["--set", "mtls.enabled=true", "--set", "mtls.trustDomain=example.org"],
    "store-tls": ["--set", "redis.tls.enabled=true"],
    "store-tls-files": ["--set", "redis.tls.enabled=true", "--set", "redis.tls.secretName=redis-tls",
                        "--set", "redis.tls.clientCertificate=true", "--set", "mtls.enabled=true"],
    "service-monitor": ["--set", "metrics.serviceMonitor.enabled=true"],
    "no-metrics": ["--set", "metrics.enabled=false"],
    "placement": ["--set", "bundledRedis.enabled=true", *[
        a for comp in ("router", "workloadmanager", "bundledRedis") for a in (
            "--set-json", f'{comp}.podLabels={{"team": "{comp}"}}',
            "--set-json", f'{comp}.podAnnotations={{"example.com/owner": "{comp}"}}',
            "--set-json", f'{comp}.nodeSelector={{"kubernetes.io/os": "linux", "pool": "{comp}"}}',
            "--set-json", f'{comp}.tolerations=[{{"key": "dedicated", "value": "{comp}", "effect": "NoSchedule"}}]',
            "--set-json", f'{comp}.affinity={{"podAntiAffinity": {{"preferredDuringSchedulingIgnoredDuringExecution": '
                          f'[{{"weight": 1, "podAffinityTerm": {{"topologyKey": "kubernetes.io/hostname", '
                          f'"labelSelector": {{"matchLabels": {{"team": "{comp}"}}}}}}}}]}}}}',
            "--set-json", f'{comp}.topologySpreadConstraints=[{{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", '
                          f'"whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {{"matchLabels": {{"team": "{comp}"}}}}}}]',
            "--set", f"{comp}.priorityClassName={comp.lower()}-priority")]],
    "image-map": ["--set", "router.image.repository=reg.example/router", "--set", "router.image.tag=v1",
                  "--set", "imagePullSecrets[0].name=regcred"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not HELM.exists():
        subprocess.run([str(REPO / "scripts/fetch-helm.sh")], check=True)
    d = tmp_path_factory.mktemp("helm")
    return dict(os.environ, XDG_CACHE_HOME=str(d / "c"), XDG_CONFIG_HOME=str(d / "cfg"), XDG_DATA_HOME=str(d / "data"))


def helm(env, *args):
    r = subprocess.run([str(HELM), *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"helm {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def render(env, variant, tmp_path):
    out = helm(env, "template", "ac", str(CHART), "--namespace", "agentcube", "--include-crds", *VARIANTS[variant])
    path = tmp_path / f"{variant}.yaml"
    path.write_text(out)
    return [d for d in yaml.safe_load_all(out) if d], path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_strict(env, variant):
    helm(env, "lint", "--strict", str(CHART), *VARIANTS[variant])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_validate_strict(env, variant, tmp_path):
    docs, path = render(env, variant, tmp_path)
    # kubernetes-validate knows no ServiceMonitor schema (a CRD of the Prometheus operator): validate
    # everything else strictly.
    known = [d for d in docs if d["kind"] != "ServiceMonitor"]
    path.write_text(yaml.safe_dump_all(known))
    r = subprocess.run([str(VALIDATE), "--strict", "-k", "1.33.0", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "agentcube-router") in kinds and ("Deployment", "workloadmanager") in kinds
    assert ("Secret", "picod-router-identity") in kinds
    assert (("PodDisruptionBudget", "agentcube-router") in kinds) == (variant == "replicas")
    assert (("Deployment", "ac-redis") in kinds) == ("bundledRedis.enabled=true" in VARIANTS[variant])
    assert (("ServiceMonitor", "agentcube-router") in kinds) == (variant == "service-monitor")
    wm_role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "workloadmanager")
    for review in ("tokenreviews", "subjectaccessreviews"):
        granted = any(review in r["resources"] for r in wm_role["rules"])
        assert granted == (variant == "wm-auth"), f"{review}: create only with workloadmanager.auth.enabled"
    for d in docs:
        if d["kind"] == "Deployment":
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def containers(docs):
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] in BIN:
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_args_and_env_match_the_binaries(env, variant, tmp_path):
    docs, _ = render(env, variant, tmp_path)
    seen = set()
    for name, c in containers(docs):
        seen.add(name)
        child_env = {"PATH": os.environ["PATH"]}
        for e in c.get("env", []):
            child_env[e["name"]] = e.get("value", "from-a-secret")
        r = subprocess.run([str(BIN[name]), *c.get("args", []), "--check-config"], env=child_env, capture_output=True, text=True)
        assert r.returncode == 0, f"{name} refuses the chart's args/env {c.get('args')}:\n{r.stderr}"
        known = set(r.stdout.split())
        unknown = {e["name"] for e in c.get("env", [])} - known
        assert not unknown, f"{name}: the chart sets env the binary never reads: {unknown}"
    assert seen == set(BIN)


def claim_verbs(docs):
    role = next(d for d in docs if d["kind"] == "ClusterRole" and "sandboxclaims" in str(d))
    return next(set(r["verbs"]) for r in role["rules"] if r["resources"] == ["sandboxclaims"])


def test_standby_claims_alone_grant_patching_claims(env, tmp_path):
    """Handing a standby claim to a session is a patch; without standby claims the Workload
    Manager never patches one, and is not allowed to."""
    docs, _ = render(env, "defaults", tmp_path)
    assert "patch" not in claim_verbs(docs)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert "--standby-claims=0" in args
    docs, _ = render(env, "standby-claims", tmp_path)
    assert "patch" in claim_verbs(docs)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert "--standby-claims=2" in args


def test_code_interpreter_uid_is_passed_only_when_set(env, tmp_path):
    docs, _ = render(env, "defaults", tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert not any(a.startswith("--code-interpreter-uid") for a in args)
    docs, _ = render(env, "code-interpreter-uid", tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert "--code-interpreter-uid=65532" in args


@pytest.mark.parametrize("variant, flag", [("metadata-access", "--sandbox-metadata-access"),
                                           ("user-namespaces", "--sandbox-user-namespaces")])
def test_workload_manager_switches_are_passed_only_when_set(env, tmp_path, variant, flag):
    docs, _ = render(env, "defaults", tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert flag not in args
    docs, _ = render(env, variant, tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert flag in args


def test_mtls_mounts_the_secrets_and_points_both_ends_at_each_other(env, tmp_path):
    docs, _ = render(env, "defaults", tmp_path)
    router = dict(containers(docs))["agentcube-router"]
    url = next(e["value"] for e in router["env"] if e["name"] == "WORKLOAD_MANAGER_URL")
    assert url.startswith("http://") and not any(a.startswith("--mtls") for a in router["args"])
    docs, _ = render(env, "mtls", tmp_path)
    c = dict(containers(docs))
    router, wm = c["agentcube-router"], c["workloadmanager"]
    url = next(e["value"] for e in router["env"] if e["name"] == "WORKLOAD_MANAGER_URL")
    assert url == "https://workloadmanager.agentcube.svc.cluster.local:8080", url
    for cont, flags in ((router, ["--mtls-cert", "--mtls-key", "--mtls-ca"]),
                        (wm, ["--tls-cert", "--tls-key", "--tls-ca"])):
        files = [f"/etc/agentcube/mtls/{f}" for f in ("tls.crt", "tls.key", "ca.crt")]
        assert [f"{flag}={f}" for flag, f in zip(flags, files)] == [a for a in cont["args"] if a.split("=")[0] in flags]
        assert {"name": "mtls", "mountPath": "/etc/agentcube/mtls", "readOnly": True} in cont["volumeMounts"]
    # The Router checks the Workload Manager's identity in that trust domain (the Workload
    # Manager checks only that a client's certificate chains to the CA, as upstream).
    assert {"name": "AGENTCUBE_SPIFFE_TRUST_DOMAIN", "value": "example.org"} in router["env"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    secrets = {n: [v["secret"]["secretName"] for v in p["volumes"] if v["name"] == "mtls"] for n, p in pods.items()
               if n in ("agentcube-router", "workloadmanager")}
    assert secrets == {"agentcube-router": ["agentcube-router-mtls"], "workloadmanager": ["workloadmanager-mtls"]}
    # The kubelet holds no client certificate: it can only connect.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert wm[probe].get("tcpSocket") and not wm[probe].get("httpGet"), probe


def test_with_caller_authentication_the_router_may_create_in_every_namespace(env, tmp_path):
    """The Router creates sessions for its own clients with its service account's token: it is the
    one trusted caller, named after the Router's service account in the release namespace."""
    docs, _ = render(env, "wm-auth", tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    router_sa = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "agentcube-router")
    sa = router_sa["spec"]["template"]["spec"]["serviceAccountName"]
    assert f"--auth-trusted-callers=system:serviceaccount:agentcube:{sa}" in args, args
    docs, _ = render(env, "defaults", tmp_path)
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    assert not any(a.startswith("--auth-trusted-callers") for a in args)


def test_chart_crds_are_the_generated_ones():
    for f in (REPO / "config/crd").glob("*.yaml"):
        assert (CHART / "crds" / f.name).read_text() == f.read_text(), f"{f.name}: run `make crds`"


def test_the_bundled_redis_always_has_a_password(env, tmp_path):
    """Any pod that reaches the store (a sandbox's, without a NetworkPolicy) could read and rewrite
    sessions, e.g. point another user's session at its own IP. The bundled Redis ran without a
    password unless one was given (and with `redis.secretName` alone, its clients sent one it did
    not require). Now it always requires one: given, or generated at install."""
    for variant, secret in (("bundled-redis", "ac-redis"), ("bundled-redis-secret", "my-redis")):
        docs, _ = render(env, variant, tmp_path)
        redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ac-redis")
        c = redis["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"], c["args"]
        assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]} == {"REDIS_PASSWORD": secret}
        for name, comp in containers(docs):
            by_name = {e["name"]: e for e in comp["env"]}
            assert by_name["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret, name
            assert "REDIS_PASSWORD_REQUIRED" not in by_name, name
        generated = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "ac-redis"]
        if variant == "bundled-redis":
            assert len(base64.b64decode(generated[0]["data"]["password"])) == 32
        else:
            assert not generated, "the named Secret is the user's"


def test_the_router_runs_at_info_level(env, tmp_path):
    """Upstream's chart passes `--debug` (gin's debug mode); here it turned on every library's debug
    logs (hyper's, rustls's, kube's) in every installed Router."""
    docs, _ = render(env, "defaults", tmp_path)
    router = dict(containers(docs))["agentcube-router"]
    assert "--debug" not in router["args"]


def test_store_tls_mounts_its_secret_where_the_flags_point(env, tmp_path):
    """`redis.tls` (extension): both components reach the store over TLS, reading the CA and their
    client identity from the Secret mounted where the environment says."""
    docs, _ = render(env, "store-tls", tmp_path)
    for name, c in containers(docs):
        by_name = {e["name"]: e.get("value") for e in c["env"]}
        assert by_name["AGENTCUBE_STORE_TLS"] == "true", name
        assert "AGENTCUBE_STORE_CA_FILE" not in by_name, name
    docs, _ = render(env, "store-tls-files", tmp_path)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    for name, c in containers(docs):
        files = {e["name"]: e["value"] for e in c["env"] if e["name"].endswith("_FILE")}
        assert files == {"AGENTCUBE_STORE_CA_FILE": "/etc/agentcube/store-tls/ca.crt",
                         "AGENTCUBE_STORE_CERT_FILE": "/etc/agentcube/store-tls/tls.crt",
                         "AGENTCUBE_STORE_KEY_FILE": "/etc/agentcube/store-tls/tls.key"}, name
        assert {"name": "store-tls", "mountPath": "/etc/agentcube/store-tls", "readOnly": True} in c["volumeMounts"]
        assert {"name": "store-tls", "secret": {"secretName": "redis-tls"}} in pods[name]["volumes"], name
        assert any(v["name"] == "mtls" for v in pods[name]["volumes"]), name
    for bad, says in ((["--set", "redis.tls.enabled=true", "--set", "bundledRedis.enabled=true"], "does not serve TLS"),
                      (["--set", "redis.tls.clientCertificate=true"], "needs redis.tls.secretName")):
        r = subprocess.run([str(HELM), "template", "ac", str(CHART), *bad], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and says in r.stderr, r.stderr


PLACEMENT = ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName")


def test_pods_go_where_their_values_say(env, tmp_path):
    """Operators pin the components to nodes (dedicated or tainted pools), spread replicas, give
    them a priority class, and label or annotate their pods (mesh injection, cost owners): each
    component's pod carries exactly its own values, the chart's labels stay; with none set, no
    field is written."""
    docs, _ = render(env, "placement", tmp_path)
    values = {comp: (app, {a.split("=", 1)[0].split(".", 1)[1]: a.split("=", 1)[1]
                           for a in VARIANTS["placement"] if a.startswith(comp + ".")})
              for comp, app in (("router", "agentcube-router"), ("workloadmanager", "workloadmanager"),
                                ("bundledRedis", "ac-redis"))}
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"}
    assert len(pods) == 3
    for comp, (app, given) in values.items():
        pod = pods[app]
        assert pod["metadata"]["labels"]["app"] == app
        assert pod["metadata"]["labels"]["team"] == comp
        assert pod["metadata"]["annotations"] == {"example.com/owner": comp}
        for field in PLACEMENT:
            want = given[field] if field == "priorityClassName" else yaml.safe_load(given[field])
            assert pod["spec"][field] == want, (comp, field)
    docs, _ = render(env, "bundled-redis", tmp_path)
    for d in docs:
        if d["kind"] == "Deployment":
            template = d["spec"]["template"]
            assert "annotations" not in template["metadata"], d["metadata"]["name"]
            assert not set(PLACEMENT) & set(template["spec"]), d["metadata"]["name"]
    # A pod label the chart sets itself would break the Deployment's selector or a NetworkPolicy.
    for label in ("app", "app.kubernetes.io/instance", "helm.sh/chart"):
        r = subprocess.run([str(HELM), "template", "ac", str(CHART), "--set-json",
                            f'workloadmanager.podLabels={{"{label}": "x"}}'], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and f"workloadmanager.podLabels.{label}: the chart sets this label" in r.stderr, r.stderr


def test_network_policies_let_in_the_pods_the_chart_runs(env, tmp_path):
    """Definitions' NetworkPolicies let in the pods named by --router-pod-labels and
    --manager-pod-labels: they must be the labels the chart's Router and Workload Manager pods carry
    (the manager's port probe blocked, every create on an enforcing cluster would be a 504)."""
    docs, _ = render(env, "defaults", tmp_path)
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"}
    args = next(c for n, c in containers(docs) if n == "workloadmanager")["args"]
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    for flag, deployment in (("router-pod-labels", "agentcube-router"), ("manager-pod-labels", "workloadmanager")):
        wanted = dict(kv.split("=", 1) for kv in flags[flag].split(","))
        assert wanted.items() <= pods[deployment].items(), (flag, wanted, pods[deployment])
