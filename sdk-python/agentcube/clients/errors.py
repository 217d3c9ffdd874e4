"""Turns Router and sandbox answers into clear exceptions."""

from __future__ import annotations

import requests

from agentcube.exceptions import HTTPDataPlaneError, HTTPSessionError, HTTPSessionNotFoundError


# Router codes of a session it could not create: refused (a cap, say), or its sandbox could not
# start or was not ready in time (the Workload Manager's words: which sandbox, and why).
CREATE_FAILURES = ("SESSION_CREATE_REFUSED", "SANDBOX_FAILED", "SANDBOX_TIMEOUT")


def raise_for_response(resp: requests.Response, session_id: str | None) -> None:
    """Raises ``SessionError`` for an unknown/expired session or one the Router could not create
    (a session cap, a sandbox that could not start), ``DataPlaneError`` for an unreachable sandbox or another Router error;
    returns for 2xx. Both subclass the SDK's base error, and the original ``requests.HTTPError``
    is chained for callers that expect it."""
    if resp.ok:
        return
    try:
        resp.raise_for_status()
    except requests.HTTPError as http_error:
        detail = _detail(resp)
        router_made = resp.headers.get("x-agentcube-error") == "router"
        if resp.status_code == 404 and router_made and _code(resp) == "SESSION_NOT_FOUND":
            reason = _field(resp, "reason")
            why = f"has ended: {reason}" if reason else "is unknown or expired (reclaimed by idle timeout, deleted, or its sandbox died)"
            raise HTTPSessionNotFoundError(f"session {session_id} {why}: {detail}", resp.status_code, resp) from http_error
        # A Router without the code (upstream before PR #460) says it in the message only.
        if resp.status_code == 404 and _code(resp) is None and "sessions.agentcube.volcano.sh" in detail:
            raise HTTPSessionNotFoundError(
                f"session {session_id} is unknown or expired (reclaimed by idle timeout, deleted, or its sandbox died): {detail}",
                resp.status_code,
                resp,
            ) from http_error
        if router_made and _code(resp) in CREATE_FAILURES:
            raise HTTPSessionError(
                f"the Router could not create a session (HTTP {resp.status_code}): {detail}", resp.status_code, resp
            ) from http_error
        if resp.status_code == 409 and router_made:
            raise HTTPSessionError(f"session {session_id} belongs to another runtime: {detail}", 409, resp) from http_error
        if resp.status_code in (502, 503, 504) and router_made:
            raise HTTPDataPlaneError(f"sandbox unreachable (HTTP {resp.status_code}): {detail}", resp.status_code, resp) from http_error
        raise HTTPDataPlaneError(f"HTTP {resp.status_code} from {resp.url}: {detail}", resp.status_code, resp) from http_error


def _code(resp: requests.Response) -> str | None:
    return _field(resp, "code")


def _field(resp: requests.Response, name: str) -> str | None:
    """A string field of a JSON object body, if there is one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    value = body.get(name) if isinstance(body, dict) else None
    return value if isinstance(value, str) else None


def _detail(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        text = str(body.get("error") or body.get("message") or body)
        # PicoD puts the specifics in "detail" (the 413's limit, why a token was refused).
        return f"{text}: {body['detail']}" if isinstance(body.get("detail"), str) else text
    return str(body)
