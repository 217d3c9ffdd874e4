"""SDK unit tests: argument handling and error classification (no network)."""

import json

import pytest
import requests

from agentcube import AgentCubeError, DataPlaneError, SessionError, SessionNotFoundError, TokenAuth
from agentcube.auth import AuthProvider, resolve_auth
from agentcube.clients.code_interpreter_data_plane import (
    BODY_LIMIT,
    INLINE_MAX_BYTES,
    MULTIPART_MAX_BYTES,
    CodeInterpreterDataPlaneClient,
    command_argv,
    timeout_string,
)
from agentcube.clients.errors import raise_for_response
from agentcube.exceptions import CommandExecutionError


def test_commands_are_split_into_words_not_run_by_a_shell():
    assert command_argv("echo 'a b' c") == ["echo", "a b", "c"]
    assert command_argv(["ls", "-l"]) == ["ls", "-l"]
    assert command_argv("whoami && pwd") == ["whoami", "&&", "pwd"]


def test_timeouts_are_go_durations_like_upstream():
    assert timeout_string(None) == "120s"
    assert timeout_string(30) == "30s"
    assert timeout_string(30.0) == "30.0s"


def test_router_path_prefix_is_dropped_like_upstream():
    c = CodeInterpreterDataPlaneClient("s", name="ci", namespace="ns", router_url="http://r:1/prefix/")
    assert c.base_url == "http://r:1/v1/namespaces/ns/code-interpreters/ci/invocations/"


def _token(auth: AuthProvider | None) -> str:
    assert auth is not None
    return auth.get_token()


def test_auth_resolution(monkeypatch):
    monkeypatch.delenv("AGENTCUBE_AUTH_TOKEN", raising=False)
    assert resolve_auth(None, None) is None
    monkeypatch.setenv("AGENTCUBE_AUTH_TOKEN", "from-env")
    assert _token(resolve_auth(None, None)) == "from-env"
    assert _token(resolve_auth(None, "given")) == "given"
    monkeypatch.delenv("AGENTCUBE_AUTH_TOKEN")
    assert _token(resolve_auth(None, "t")) == "t"
    explicit = TokenAuth("x")
    assert resolve_auth(explicit, "t") is explicit
    with pytest.raises(ValueError):
        TokenAuth("")


def _response(status, body, router=True):
    r = requests.Response()
    r.status_code = status
    r._content = body.encode()
    r.url = "http://router/x"
    r.headers["content-type"] = "application/json"
    if router:
        r.headers["x-agentcube-error"] = "router"
    return r


def test_errors_say_what_went_wrong():
    raise_for_response(_response(200, "{}"), "s")
    with pytest.raises(SessionError) as e:
        raise_for_response(_response(404, '{"error":"sessions.agentcube.volcano.sh \\"s\\" not found"}'), "s")
    assert "unknown or expired" in str(e.value)
    assert isinstance(e.value, requests.HTTPError), "still catchable like upstream's raise_for_status"
    with pytest.raises(DataPlaneError) as data_plane:
        raise_for_response(_response(502, '{"error":"sandbox unreachable"}'), "s")
    assert "sandbox unreachable" in str(data_plane.value) and data_plane.value.status_code == 502
    with pytest.raises(DataPlaneError):
        raise_for_response(_response(404, '{"error":"File not found","code":404}', router=False), "s")
    with pytest.raises(DataPlaneError) as too_large:  # PicoD's specifics are in "detail"
        body = '{"error":"request body too large","detail":"maximum allowed size is 33554432 bytes"}'
        raise_for_response(_response(413, body, router=False), "s")
    assert "request body too large: maximum allowed size is 33554432 bytes" in str(too_large.value)
    with pytest.raises(SessionError) as refused:
        body = '{"error":"session limit reached (--max-sessions)","code":"SESSION_CREATE_REFUSED"}'
        raise_for_response(_response(429, body), None)
    assert "could not create a session (HTTP 429): session limit reached" in str(refused.value)
    assert refused.value.status_code == 429
    with pytest.raises(SessionError) as failed:  # upstream's 500, with why (extension)
        body = '{"error":"sandbox a-1 exited while starting (exit status: 3)","code":"SANDBOX_FAILED"}'
        raise_for_response(_response(500, body), None)
    assert "could not create a session (HTTP 500): sandbox a-1 exited while starting" in str(failed.value)
    assert issubclass(CommandExecutionError, AgentCubeError)
    err = CommandExecutionError(1, "NameError: x", ["python3", "s.py"])
    assert err.exit_code == 1 and "NameError" in str(err)


def test_a_session_the_router_does_not_know_is_session_not_found_and_an_app_404_is_not():
    body = '{"error":"sessions.agentcube.volcano.sh \\"s\\" not found","code":"SESSION_NOT_FOUND"}'
    with pytest.raises(SessionNotFoundError) as e:
        raise_for_response(_response(404, body), "s")
    assert isinstance(e.value, SessionError) and isinstance(e.value, requests.HTTPError)
    assert e.value.status_code == 404
    # With why it ended, when the Router knows (extension).
    ended = body[:-1] + ',"reason":"it was idle for longer than its sessionTimeout (15m0s)"}'
    with pytest.raises(SessionNotFoundError) as e:
        raise_for_response(_response(404, ended), "s")
    assert "session s has ended: it was idle for longer than its sessionTimeout (15m0s)" in str(e.value)
    # The same body from the application in the sandbox (no Router marker) stays an HTTP error.
    with pytest.raises(DataPlaneError) as app:
        raise_for_response(_response(404, body, router=False), "s")
    assert not isinstance(app.value, SessionError)
    with pytest.raises(DataPlaneError) as app:
        raise_for_response(_response(404, '{"error":"no such file"}'), "s")
    assert not isinstance(app.value, SessionNotFoundError)


class _Router(requests.adapters.BaseAdapter):
    """A Router answering every request with 404 SESSION_NOT_FOUND, counting requests."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def send(self, request, *args, **kw):
        self.requests.append(request)
        body = '{"error":"sessions.agentcube.volcano.sh \\"gone\\" not found","code":"SESSION_NOT_FOUND"}'
        r = _response(404, body)
        r.request, r.url = request, request.url
        return r

    def close(self):
        pass


def test_a_client_forgets_a_session_that_is_gone_and_never_makes_a_new_one():
    c = CodeInterpreterDataPlaneClient("gone", name="ci", namespace="ns", router_url="http://r:1")
    router = _Router()
    c.session.mount("http://", router)
    with pytest.raises(SessionNotFoundError):
        c.execute_command_result(["true"])
    assert c.session_id is None, "the stale id is cleared"
    with pytest.raises(SessionNotFoundError) as e:
        c.execute_command_result(["true"])
    assert "gone" in str(e.value)
    assert len(router.requests) == 1, "no request without a session header (that would create a session)"


class _PicoD(requests.adapters.BaseAdapter):
    """PicoD behind the Router, accepting every upload; records how each was sent."""

    def __init__(self):
        super().__init__()
        self.sent = []
        self.bodies = []

    def send(self, request, *args, **kw):
        body = request.body
        self.bodies.append(body)
        size = len(body) if isinstance(body, (bytes, str)) else None  # None: a file object, streamed
        self.sent.append((request.headers.get("Content-Type", "").split(";")[0], size, request.url))
        r = _response(200, "{}", router=False)
        r.request, r.url = request, request.url
        return r

    def close(self):
        pass


def test_uploads_go_as_upstream_sends_them_while_they_fit_one_body_and_are_streamed_past_it(tmp_path):
    c = CodeInterpreterDataPlaneClient("s", name="ci", namespace="ns", router_url="http://r:1")
    picod = _PicoD()
    c.session.mount("http://", picod)
    for size in (MULTIPART_MAX_BYTES, MULTIPART_MAX_BYTES + 1):
        with open(tmp_path / "f", "wb") as f:
            f.truncate(size)
        c.upload_file(str(tmp_path / "f"), "dir/f")
    c.write_file("x" * INLINE_MAX_BYTES, "t")
    c.write_file("x" * (INLINE_MAX_BYTES + 1), "t")
    (multipart, m_size, _), (raw, r_size, r_url), (json_ct, j_size, _), (raw2, _, r2_url) = picod.sent
    assert multipart == "multipart/form-data" and m_size is not None and m_size <= BODY_LIMIT
    assert raw == "application/octet-stream" and r_size is None, "a file past the limit is streamed"
    assert r_url.endswith("/api/files?path=dir%2Ff&mode=0644"), r_url
    assert json_ct == "application/json" and j_size is not None and j_size <= BODY_LIMIT
    assert raw2 == "application/octet-stream" and r2_url.endswith("/api/files?path=t&mode=0644")


def test_low_level_clients_take_upstreams_arguments_in_upstreams_order():
    from agentcube.clients import AgentRuntimeDataPlaneClient, ControlPlaneClient

    dp = CodeInterpreterDataPlaneClient("s", "http://r:1/p/", "ns", "ci", None, 30)
    assert dp.base_url == "http://r:1/v1/namespaces/ns/code-interpreters/ci/invocations/"
    assert CodeInterpreterDataPlaneClient("s", base_url="http://x/inv").base_url == "http://x/inv/"
    picod = _PicoD()
    dp.session.mount("http://", picod)
    dp.execute_command_result(["true"])
    assert json.loads(picod.bodies[-1])["timeout"] == "30s", "the client's own timeout is the default"
    cp = ControlPlaneClient("http://wm:1", "tok", 60, 5.0, 2, 2)
    assert cp._headers() == {"Authorization": "Bearer tok"} and cp.timeout == (5.0, 60)
    ar = AgentRuntimeDataPlaneClient("http://r:1", "ns", "echo", 60)
    assert ar.base_url == "http://r:1/v1/namespaces/ns/agent-runtimes/echo/invocations/"
