"""Warm pool: my-interpreter (warmPoolSize 2) serves a session from the pool and refills."""

import time

import pytest
import requests

POOL = "my-interpreter"


def wait_for(cond, secs=30):
    deadline = time.time() + secs
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    return None


def execute(stack, sid, argv):
    url = f"{stack.router_url}/v1/namespaces/default/code-interpreters/my-interpreter/invocations/api/execute"
    return requests.post(url, json={"command": argv}, headers={"x-agentcube-session-id": sid}).json()


def create(stack):
    r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json={"name": "my-interpreter", "namespace": "default"})
    assert r.status_code == 200, r.text
    return r.json()


def test_session_comes_from_the_pool_and_the_pool_refills(stack):
    if stack.backend != "local":
        pytest.skip("the cluster variant is test_claim_adopts_a_pool_pod_and_the_pool_refills")

    def pool():
        return {n for n in stack.sandboxes() if n.startswith("my-interpreter-")}

    assert wait_for(lambda: len(pool()) >= 2), "pool never filled"
    before = pool()
    body = create(stack)
    assert body["sandboxName"] in before, "served from the warm pool"
    # Refilled: two idle pool sandboxes besides the one now in use.
    assert wait_for(lambda: len(pool() - {body["sandboxName"]}) == 2)
    assert execute(stack, body["sessionId"], ["echo", "warm"])["stdout"] == "warm\n"
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{body['sessionId']}").status_code == 200
    assert body["sandboxName"] not in pool()


def pool_members(stack):
    """Unclaimed members of the pool: Sandboxes it controls (agent-sandbox v1beta1 labels them with
    a hash of the pool's name, so ownership is what identifies them)."""
    return [s for s in stack.kube_list("Sandbox")
            if any(o.get("controller") and o["kind"] == "SandboxWarmPool" and o["name"] == POOL
                   for o in s["metadata"].get("ownerReferences", []))]


def ready(obj):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def test_claim_adopts_a_pool_pod_and_the_pool_refills(stack):
    """Upstream's TestCodeInterpreterWarmPool (spec §7.4 #4), step for step."""
    if stack.backend == "local":
        pytest.skip("agent-sandbox objects exist only on a cluster")
    members = wait_for(lambda: (lambda m: m if len(m) == 2 and all(map(ready, m)) else None)(pool_members(stack)), 60)
    assert members, f"pool never reached 2 ready sandboxes: {stack.kube_list('Sandbox')}"
    pool_pods = {(p["metadata"]["name"], p["metadata"]["uid"]) for p in stack.kube_list("Pod") if p["metadata"]["name"] in {m["metadata"]["name"] for m in members}}
    assert len(pool_pods) == 2
    ci = next(c for c in stack.kube_list("CodeInterpreter") if c["metadata"]["name"] == "my-interpreter")
    body = create(stack)
    assert body["kind"] == "SandboxClaim"
    assert execute(stack, body["sessionId"], ["echo", "warm"])["stdout"] == "warm\n"
    # The Workload Manager may answer (once the claim owns the Sandbox) before agent-sandbox
    # writes the claim's status.
    claim = wait_for(lambda: next((c for c in stack.kube_list("SandboxClaim") if c["metadata"]["name"] == body["sandboxName"]
                                   and c.get("status", {}).get("sandbox", {}).get("name")), None), 10)
    assert claim, "the claim's status names its Sandbox"
    assert [(o["kind"], o["uid"]) for o in claim["metadata"]["ownerReferences"]] == [("CodeInterpreter", ci["metadata"]["uid"])]
    sandbox = next(s for s in stack.kube_list("Sandbox") if s["metadata"]["name"] == claim["status"]["sandbox"]["name"])
    assert sandbox["metadata"]["uid"] == body["sandboxId"]
    assert [o["uid"] for o in sandbox["metadata"]["ownerReferences"]] == [claim["metadata"]["uid"]], "Sandbox owned by the claim"
    pod = next(p for p in stack.kube_list("Pod") if p["metadata"]["name"] == sandbox["metadata"]["name"])
    assert [o["uid"] for o in pod["metadata"]["ownerReferences"]] == [sandbox["metadata"]["uid"]], "Pod owned by the Sandbox"
    assert (pod["metadata"]["name"], pod["metadata"]["uid"]) in pool_pods, "the pod is one of the pool's"
    refilled = wait_for(lambda: (lambda m: m if len(m) == 2 and all(map(ready, m)) else None)(pool_members(stack)), 30)
    assert refilled and sandbox["metadata"]["name"] not in {m["metadata"]["name"] for m in refilled}, "pool refilled to 2"
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{body['sessionId']}").status_code == 200
    gone = wait_for(lambda: not any(c["metadata"]["name"] == body["sandboxName"] for c in stack.kube_list("SandboxClaim"))
                    and not any(s["metadata"]["name"] == sandbox["metadata"]["name"] for s in stack.kube_list("Sandbox"))
                    and not any(p["metadata"]["name"] == pod["metadata"]["name"] for p in stack.kube_list("Pod")), 30)
    assert gone, "claim, sandbox and pod deleted"
    assert wait_for(lambda: len(pool_members(stack)) == 2), "pool back to 2"
