"""What the HTTP clients share."""

from __future__ import annotations

import requests
import requests.adapters


def pooled_session(pool_connections: int, pool_maxsize: int) -> requests.Session:
    """A ``requests.Session`` with upstream's connection-pool sizes."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_connections, pool_maxsize=pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
