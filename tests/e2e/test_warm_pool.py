"""Warm pool: my-interpreter (warmPoolSize 2) serves a session from the pool and refills."""

import time

import requests


def pool(stack):
    return {n for n in stack.sandboxes() if n.startswith("my-interpreter-")}


def wait_for(cond, secs=30):
    deadline = time.time() + secs
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_session_comes_from_the_pool_and_the_pool_refills(stack):
    assert wait_for(lambda: len(pool(stack)) >= 2), "pool never filled"
    before = pool(stack)
    r = requests.post(f"{stack.wm_url}/v1/code-interpreter", json={"name": "my-interpreter", "namespace": "default"})
    assert r.status_code == 200
    body = r.json()
    assert body["sandboxName"] in before, "served from the warm pool"
    # Refilled: two idle pool sandboxes besides the one now in use.
    assert wait_for(lambda: len(pool(stack) - {body["sandboxName"]}) == 2)
    url = f"{stack.router_url}/v1/namespaces/default/code-interpreters/my-interpreter/invocations/api/execute"
    out = requests.post(url, json={"command": ["echo", "warm"]}, headers={"x-agentcube-session-id": body["sessionId"]})
    assert out.json()["stdout"] == "warm\n"
    assert requests.delete(f"{stack.wm_url}/v1/code-interpreter/sessions/{body['sessionId']}").status_code == 200
    assert body["sandboxName"] not in pool(stack)
