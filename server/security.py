"""Who may talk to the server: a bearer token, loopback Host names, bounded bodies.

The server listens on loopback, but any local process, and any web page the user opens
(through DNS rebinding: a hostile name that resolves to 127.0.0.1), can reach a loopback
port. So every endpoint but /v1/health needs the token the add-on got from us, the Host
header must name this server (a rebinding page sends its own host name), and there is no
CORS: browsers never let another origin read our answers.
"""
from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from fastapi import HTTPException, Request

TOKEN_ENV = "MULTIPLANE_TOKEN"
MAX_BODY_BYTES = 256 * 1024  # a full request is a few KiB; this only stops abuse
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def resolve_token(explicit: Optional[str] = None) -> tuple[str, Optional[Path]]:
    """(token, token file or None): the given token, else $MULTIPLANE_TOKEN, else a new one
    written to a file only this user can read (its path goes into the ready line)."""
    token = explicit or os.environ.get(TOKEN_ENV) or ""
    if token:
        if len(token) < 16:
            raise ValueError(f"the API token must be at least 16 characters (set {TOKEN_ENV})")
        return token, None
    token = secrets.token_urlsafe(32)
    return token, write_token_file(token)


def write_token_file(token: str) -> Path:
    """Write `token` into a new 0600 file in a new 0700 folder (never readable by others,
    not even for an instant: the mode is given when the file is created)."""
    folder = Path(tempfile.mkdtemp(prefix="multiplane-"))
    path = folder / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token)
    return path


def remove_token_file(path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
        if path.parent.name.startswith("multiplane-"):
            shutil.rmtree(path.parent, ignore_errors=True)
    except OSError:
        pass


def allowed_hosts(bound_host: str, port: int) -> frozenset[str]:
    """Host header values accepted: loopback names and the bound address, with our port."""
    names = set(LOOPBACK_NAMES)
    host = bound_host.strip()
    if host and host not in ("0.0.0.0", "::", "[::]"):
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    return frozenset(f"{name}:{port}".lower() for name in names)


class HostGuard:
    """ASGI middleware: reject foreign Host headers (421) and oversized bodies (413)."""

    def __init__(self, app, hosts: Iterable[str], max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if scope["type"] == "websocket":  # none are served; refuse foreign ones all the same
            if host not in self.hosts:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        if host not in self.hosts:
            shown = host or "(none)"
            return await _reject(send, 421, f"Host header {shown!r} is not this server; "
                                            f"use http://127.0.0.1:<port> (DNS-rebinding defence)")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return await _reject(send, 400, "malformed Content-Length header")
            if too_big:
                return await _reject(send, 413, f"request body larger than {self.max_body_bytes} bytes")
        return await self.app(scope, receive, send)


async def _reject(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """FastAPI dependency: `Authorization: Bearer <token>`, compared in constant time."""

    def __init__(self, token: str):
        self._token = token.encode()

    def __call__(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
