"""Exceptions raised by the SDK (same names as upstream ``agentcube.exceptions``)."""

from __future__ import annotations

from typing import Optional, Sequence, Union


class AgentCubeError(Exception):
    """Base class of every SDK error."""


class CommandExecutionError(AgentCubeError):
    """A command ran in the sandbox and exited with a non-zero code."""

    def __init__(self, exit_code: int, stderr: str, command: Union[str, Sequence[str], None] = None):
        self.exit_code = exit_code
        self.stderr = stderr
        self.command = command
        super().__init__(f"command {command!r} failed with exit code {exit_code}: {stderr}")


class SessionError(AgentCubeError):
    """The session cannot be used: unknown or expired (the Router answered 404), or it could not
    be created."""

    def __init__(self, message: str, status_code: Optional[int] = None):
        self.status_code = status_code
        super().__init__(message)


class SessionNotFoundError(SessionError):
    """The Router has no such session (`404` with code `SESSION_NOT_FOUND`): it expired, was
    deleted or never existed. The client forgets the session id; create a new client to go on."""


class DataPlaneError(AgentCubeError):
    """The sandbox could not be reached (Router 502/503/504) or answered an unexpected error."""

    def __init__(self, message: str, status_code: Optional[int] = None):
        self.status_code = status_code
        super().__init__(message)


try:  # Upstream's clients raised requests.HTTPError; ours are catchable as either.
    import requests as _requests

    class HTTPSessionError(SessionError, _requests.HTTPError):
        """A :class:`SessionError` that is also a ``requests.HTTPError``."""

        def __init__(
            self, message: str, status_code: Optional[int] = None, response: Optional[_requests.Response] = None
        ):
            SessionError.__init__(self, message, status_code)
            self.response = response
            self.request = getattr(response, "request", None)

    class HTTPSessionNotFoundError(SessionNotFoundError, HTTPSessionError):
        """A :class:`SessionNotFoundError` that is also a ``requests.HTTPError``."""

    class HTTPDataPlaneError(DataPlaneError, _requests.HTTPError):
        """A :class:`DataPlaneError` that is also a ``requests.HTTPError``."""

        def __init__(
            self, message: str, status_code: Optional[int] = None, response: Optional[_requests.Response] = None
        ):
            DataPlaneError.__init__(self, message, status_code)
            self.response = response
            self.request = getattr(response, "request", None)
except ImportError:  # pragma: no cover
    HTTPSessionError = SessionError  # type: ignore[misc,assignment]
    HTTPSessionNotFoundError = SessionNotFoundError  # type: ignore[misc,assignment]
    HTTPDataPlaneError = DataPlaneError  # type: ignore[misc,assignment]
