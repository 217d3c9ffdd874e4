"""The sandboxes ``agentcube-mcp``'s tools use (:class:`Sandboxes`) and the local files
``upload_file`` / ``download_file`` may touch (:class:`LocalFiles`)."""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from typing import Any, Callable, Dict, Optional, Set

from agentcube.code_interpreter import CodeInterpreterClient
from agentcube.contexts import Context
from agentcube.exceptions import SessionNotFoundError
from agentcube.mcp_compat import Ctx, mcp_session

Outcome = Dict[str, Any]

#: What a call says when the session it named (or its own) was gone and a new sandbox took its
#: place, as upstream's tools do.
RECOVERED_HINT = "Old session expired or missing; a new sandbox ran this call (its files are gone)."


class Sandboxes:
    """The sandboxes the tools use. A call without ``session_id`` uses its MCP session's own
    sandbox (made on first use, stopped when the MCP session ends, see :func:`mcp_session`; over
    stdio, ``per_session`` false, the server's one client has one); ``session_reuse`` lets that
    sandbox outlive the MCP session, to be named by its id later (until ``stop_session``, its
    idle timeout, or this server's exit). A call with ``session_id`` uses that session. A session
    that turns out gone is replaced by a new sandbox, once, and the answer says so."""

    def __init__(self, name: str, namespace: str, per_session: bool = True, ttl: int = 3600,
                 auth_token: Optional[str] = None):
        self.name, self.namespace, self.per_session = name, namespace, per_session
        self.ttl, self.auth_token = ttl, auth_token
        self.lock = threading.RLock()  # mcp 2 runs tools in worker threads
        self.own: Dict[Any, CodeInterpreterClient] = {}
        self.named: Dict[str, CodeInterpreterClient] = {}
        self.made: Set[str] = set()  # sessions this server created: stopped when it exits
        self.kept: Set[str] = set()  # own sandboxes asked to outlive their MCP session
        self.contexts: Dict[str, Context] = {}

    def _new(self) -> CodeInterpreterClient:
        client = CodeInterpreterClient(self.name, self.namespace, ttl=self.ttl, auth_token=self.auth_token)
        self.made.add(str(client.session_id))
        return client

    def _key(self, mcp_ctx: Optional[Ctx]) -> "tuple[Any, Any]":
        """The MCP session (``None`` over stdio) and the key of its own sandbox: a name kept in
        mcp 2's per-connection state (never reused by another connection), else mcp 1's session
        object's id (its entry goes when the object does, before the id can be reused)."""
        session = mcp_session(mcp_ctx) if self.per_session else None
        if session is None:
            return None, None
        state = getattr(session, "state", None)
        if isinstance(state, dict):
            return session, state.setdefault("agentcube.sandbox", uuid.uuid4().hex)
        return session, id(session)

    def get(self, mcp_ctx: Optional[Ctx], session_id: Optional[str], reuse: bool = False) -> CodeInterpreterClient:
        with self.lock:
            if session_id:
                for c in self.own.values():
                    if c.session_id == session_id:
                        break
                else:
                    if session_id not in self.named:
                        named = CodeInterpreterClient(
                            self.name, self.namespace, auth_token=self.auth_token, session_id=session_id
                        )
                        # Read at the Workload Manager once: a session that has gone is replaced
                        # at once (the Router may route it for its cache's TTL while its sandbox
                        # terminates, and the model would work on in a sandbox about to go).
                        named.record()
                        self.named[session_id] = named
                    c = self.named[session_id]
            else:
                session, key = self._key(mcp_ctx)
                c = self.own.get(key)  # type: ignore[assignment]
                if c is None or c.session_id is None:
                    c = self._new()
                    self.own[key] = c
                    if session is not None:
                        # The MCP session is gone (HTTP session ended or timed out): so is its sandbox.
                        at_end = getattr(session, "exit_stack", None)  # mcp 2's connection
                        if at_end is not None:
                            at_end.callback(self._release, key)
                        else:
                            weakref.finalize(session, self._release, key)
            if reuse:
                self.kept.add(str(c.session_id))
            return c

    def call(self, mcp_ctx: Optional[Ctx], session_id: Optional[str], reuse: bool,
             op: Callable[[CodeInterpreterClient], Outcome]) -> Outcome:
        """``op`` on the call's sandbox, its answer with the ``session_id`` to name it by; a
        session found gone is replaced once (upstream's recovery)."""
        sid = session_id
        try:
            client = self.get(mcp_ctx, session_id, reuse)
            sid = client.session_id
            return {"session_id": sid, **op(client)}
        except SessionNotFoundError:
            if not sid:
                raise
        with self.lock:
            self._forget(sid)
            client = self._new()
            if session_id:  # named from now on by its new id, as the one it replaces was
                self.named[str(client.session_id)] = client
            else:
                _, key = self._key(mcp_ctx)
                self.own[key] = client
            if reuse or session_id:
                self.kept.add(str(client.session_id))
        meta = {"session_recovered": True, "previous_session_id": sid, "hint": RECOVERED_HINT}
        return {"session_id": client.session_id, **op(client), **meta}

    def _forget(self, sid: str) -> None:
        self.contexts.pop(sid, None)
        self.named.pop(sid, None)
        self.kept.discard(sid)
        self.made.discard(sid)
        self.own = {k: c for k, c in self.own.items() if c.session_id not in (sid, None)}

    def _release(self, key: Any) -> None:
        with self.lock:
            client = self.own.pop(key, None)
            if client is None:
                return
            sid = str(client.session_id)
            if sid in self.kept:  # the model asked to come back to it by its id
                self.named[sid] = client
                return
            self._forget(sid)
        client.stop()

    def context(self, client: CodeInterpreterClient) -> Context:
        sid = str(client.session_id)
        with self.lock:
            if sid not in self.contexts:
                self.contexts[sid] = client.create_context("python")
            return self.contexts[sid]

    def stop(self, mcp_ctx: Optional[Ctx], session_id: Optional[str]) -> Outcome:
        with self.lock:
            if not session_id and self._key(mcp_ctx)[1] not in self.own:
                return {"session_id": None, "status": "no session to stop"}
            client = self.get(mcp_ctx, session_id)
            sid = str(client.session_id)
            self._forget(sid)
        client.stop()
        return {"session_id": sid, "status": "stopped"}

    def stop_all(self) -> None:
        with self.lock:
            clients = list(self.own.values()) + [c for s, c in self.named.items() if s in self.made]
            self.own.clear()
        for c in clients:
            c.stop()


class LocalFiles:
    """Where ``upload_file`` and ``download_file`` may read and write on this machine: under
    ``root`` only (relative paths are taken from it; symlinks are resolved before the check), or
    nowhere when ``root`` is ``None``."""

    def __init__(self, root: Optional[str]):
        self.root = os.path.realpath(root) if root else None

    def _inside(self, path: str) -> bool:
        assert self.root is not None
        return path == self.root or path.startswith(self.root + os.sep)

    def _joined(self, local_path: str) -> str:
        if self.root is None:
            raise PermissionError(
                "upload_file and download_file are off: start agentcube-mcp with --files-dir DIR "
                "(or AGENTCUBE_MCP_FILES_DIR) to let them use files under DIR on this machine"
            )
        return os.path.join(self.root, local_path)

    def readable(self, local_path: str) -> str:
        """The file to upload: ``local_path`` with every symlink resolved, inside the root."""
        real = os.path.realpath(self._joined(local_path))
        if not self._inside(real):
            raise PermissionError(f"{local_path!r} is outside the files directory {self.root}")
        return real

    def writable(self, local_path: str) -> str:
        """Where to download: inside the root once its directory's symlinks are resolved, and
        not itself a symlink (which would be followed out)."""
        joined = self._joined(local_path)
        parent, leaf = os.path.split(joined)
        real = os.path.join(os.path.realpath(parent), leaf)
        if leaf in ("", ".", "..") or not self._inside(real) or real == self.root:
            raise PermissionError(f"{local_path!r} is outside the files directory {self.root}")
        if os.path.islink(real):
            raise PermissionError(f"{local_path!r} is a symlink; not written through")
        return real
