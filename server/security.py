"""Who may talk to the server: a bearer token, loopback Host names, bounded bodies.

The server listens on loopback, but any local process, and any web page the user opens
(through DNS rebinding: a hostile name that resolves to 127.0.0.1), can reach a loopback
port. So every endpoint but /v1/health needs the token the add-on got from us, the Host
header must name this server (a rebinding page sends its own host name; names for LANs,
tunnels and proxies are added with --allow-host), and there is no CORS: browsers never let
another origin read our answers. All three are checked on the request head, before any
body byte is read, and bodies are counted as they arrive (`HostGuard`).
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


ALLOW_HOSTS_ENV = "MULTIPLANE_ALLOW_HOSTS"  # comma-separated, like repeated --allow-host


def allowed_hosts(bound_host: str, port: int, extra_names: Iterable[str] = ()) -> frozenset[str]:
    """Host header values accepted: loopback names and the bound address, with our port, and
    each name of `extra_names` (--allow-host): a LAN name, an SSH tunnel's local end, the
    public name a proxy forwards. "NAME" is accepted bare (a proxy on the default port sends
    no port) and with our port; "NAME:PORT" exactly."""
    names = set(LOOPBACK_NAMES)
    host = bound_host.strip()
    if host and host not in ("0.0.0.0", "::", "[::]"):
        names.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    accepted = {f"{name}:{port}".lower() for name in names}
    for name in extra_names:
        name = check_host_name(name)
        has_port = name.rsplit(":", 1)[-1].isdigit() and (not name.startswith("[") or "]:" in name)
        accepted |= {name} if has_port else {name, f"{name}:{port}"}
    return frozenset(accepted)


def check_host_name(name: str) -> str:
    """A Host header value as given to --allow-host: a name or address, optionally :port."""
    value = name.strip().lower()
    if not value or any(c in value for c in "/ \t@?#") or value.count(":") > 1 and not value.startswith("["):
        raise ValueError(f"--allow-host {name!r} must be a host name or address, optionally with "
                         f":port (e.g. gpu.lan, gpu.example.com, 127.0.0.1:9000, [fe80::1]); no "
                         f"scheme or path")
    return value


def allow_hosts_from_env() -> list[str]:
    return [n for n in (os.environ.get(ALLOW_HOSTS_ENV) or "").split(",") if n.strip()]


class HostGuard:
    """ASGI middleware, the first thing a request meets: the Host header (421), the bearer
    token (401) and the body size (413), in that order, all before the app reads one body
    byte. A body is counted as it arrives (chunked bodies have no Content-Length), and the
    413 goes out the moment the limit is passed, closing the connection: a client streaming
    300 MB costs the server at most one 64 KiB read buffer.

    `token`: required on every path but `public_paths` (exact paths, or prefixes ending in
    "/"); None leaves tokens to the routes (`BearerAuth`).
    """

    def __init__(self, app, hosts: Iterable[str], max_body_bytes: int = MAX_BODY_BYTES, *,
                 token: Optional[str] = None, public_paths: Iterable[str] = ()):
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.max_body_bytes = max_body_bytes
        self._token = token.encode() if token else None
        self.public_paths = tuple(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if scope["type"] == "websocket":  # none are served; refuse foreign ones all the same
            if host not in self.hosts:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope, headers, host)
        if refusal is not None:
            status, detail, extra = refusal
            if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
                extra = [*extra, (b"connection", b"close")]  # the body stays unread: drop it
            return await _reject(send, status, detail, extra)
        counted = _CountedBody(receive, send, self.max_body_bytes, self._too_large())
        try:
            return await self.app(scope, counted.receive, counted.send)
        except Exception:
            if not counted.refused:
                raise
            # The app failed reading a body we cut off; the client already has its 413.

    def _refusal(self, scope, headers: dict, host: str):
        """(status, detail, extra headers) of a request refused on its head alone, or None."""
        if host not in self.hosts:
            return 421, (f"Host header {host or '(none)'!r} is not this server; use its loopback "
                         f"address or a name given with --allow-host (DNS-rebinding defence)"), []
        if self._token is not None and not self._is_public(scope.get("path", "")):
            refusal = token_refusal(headers.get(b"authorization", b"").decode("latin-1"), self._token)
            if refusal:
                return 401, refusal, [(b"www-authenticate", b"Bearer")]
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return 400, "malformed Content-Length header", []
            if too_big:
                return 413, self._too_large(), []
        return None

    def _is_public(self, path: str) -> bool:
        return any(path == p or (p.endswith("/") and path.startswith(p)) for p in self.public_paths)

    def _too_large(self) -> str:
        return (f"request body larger than {self.max_body_bytes} bytes (a full request is a few "
                f"KiB; send less)")


class _CountedBody:
    """One request's `receive`/`send`, counting body bytes: past the limit the client gets a
    413 (connection closed), the app sees the client gone, and what it sends is dropped."""

    def __init__(self, receive, send, limit: int, message: str):
        self._receive, self._send = receive, send
        self.limit, self.message = limit, message
        self.received = 0
        self.refused = False
        self.response_started = False

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.refused = True
                if not self.response_started:
                    await _reject(self._send, 413, self.message, [(b"connection", b"close")])
                return {"type": "http.disconnect"}
        return message

    async def send(self, message):
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)


async def _reject(send, status: int, detail: str, extra_headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


def token_refusal(header: str, token: bytes) -> Optional[str]:
    """Why an `Authorization` header value does not carry `token` (None: it does); compared
    in constant time. The one check behind the guard and `BearerAuth`."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "missing bearer token: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), token):
        return "wrong bearer token"
    return None


class BearerAuth:
    """FastAPI dependency: `Authorization: Bearer <token>` (the guard checks it first, before
    any body is read; this keeps a route safe even if mounted without the guard)."""

    def __init__(self, token: str):
        self._token = token.encode()

    def __call__(self, request: Request) -> None:
        refusal = token_refusal(request.headers.get("authorization", ""), self._token)
        if refusal:
            raise HTTPException(401, refusal, headers={"WWW-Authenticate": "Bearer"})
