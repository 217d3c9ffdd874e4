"""Authentication providers: anything with ``get_token() -> str``."""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable


@runtime_checkable
class AuthProvider(Protocol):
    """Supplies a bearer token for each request."""

    def get_token(self) -> str: ...


class TokenAuth:
    """A fixed bearer token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token must not be empty")
        self._token = token

    def get_token(self) -> str:
        return self._token


def resolve_auth(auth: Optional[AuthProvider], auth_token: Optional[str]) -> Optional[AuthProvider]:
    """``auth`` wins over ``auth_token``; neither means no Authorization header."""
    if auth is not None:
        return auth
    if auth_token:
        return TokenAuth(auth_token)
    return None
