"""Slow and many clients: uvicorn's h11 protocol with a request-read deadline and a
connection cap (`process.uvicorn_server` serves with it).

uvicorn closes an idle keep-alive connection after KEEPALIVE_SECONDS, but a connection that
has sent part of a request (or nothing) stays open forever, and there is no limit on how
many: 1000 clients sending one header line a second would hold 1000 sockets. Here:

- REQUEST_READ_SECONDS: the request line, headers and body must all arrive within 10 s of
  the connection opening (or of the first byte of the next request on a kept-alive one);
  otherwise the connection is closed.
- MAX_CONNECTIONS: beyond 100 open connections, a new one closes the oldest connection that
  is only waiting for its request (never one being answered, such as an event stream); if
  every connection is busy, the new one is closed. A newcomer such as /v1/health always
  gets in, and an attack only churns its own sockets.
- A request head larger than 16 KiB is refused (h11's limit, 400); bodies: security.py.

TLS handshakes happen before this protocol sees a connection; asyncio bounds them (60 s).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_READ_SECONDS = 10.0
KEEPALIVE_SECONDS = 5
MAX_CONNECTIONS = 100
MAX_REQUEST_HEAD_BYTES = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with the request-read deadline and the connection cap."""

    request_read_seconds = REQUEST_READ_SECONDS
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = self.loop.time()
        self._read_deadline: asyncio.TimerHandle | None = None
        self._arm_read_deadline()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_request():
            if self._read_deadline is None:
                self._arm_read_deadline()
        else:
            self._disarm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        super().connection_lost(exc)

    def waiting_for_request(self) -> bool:
        """Nothing is being answered on this connection (it may be mid-way through a head)."""
        return (self.cycle is None or self.cycle.response_complete) and self.conn.their_state is h11.IDLE

    def _reading_request(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _arm_read_deadline(self) -> None:
        self._read_deadline = self.loop.call_later(self.request_read_seconds, self._read_too_slow)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_too_slow(self) -> None:
        self._read_deadline = None
        if self._reading_request() and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        """Enforce MAX_CONNECTIONS as this connection arrives (see the module docstring)."""
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.max_connections:
            return
        idle = [c for c in open_ if c is not self and isinstance(c, GuardedH11Protocol)
                and c.waiting_for_request()]
        victim = min(idle, key=lambda c: c._opened) if idle else self
        victim.transport.close()
