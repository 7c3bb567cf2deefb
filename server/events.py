"""Server-sent events of a job: its snapshots, pushed from worker threads, framed for the
stream on the event loop."""
from __future__ import annotations

import asyncio
from typing import Optional

from .schemas import TERMINAL_STATES, JobOut

SSE_KEEPALIVE_SECONDS = 15.0


class SnapshotQueue:
    """Snapshots handed over from any thread to the stream's event loop, without blocking."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, snapshot: Optional[JobOut]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, snapshot)
        except RuntimeError:  # the loop is closed: the server is gone
            pass


async def status_stream(first: JobOut, updates: asyncio.Queue, unsubscribe,
                        keepalive_seconds: float):
    """The SSE body: the current status, then one event per change, until terminal."""
    try:
        snapshot: Optional[JobOut] = first
        last_version = -1
        while True:
            if snapshot is None:  # the server is closing
                return
            if snapshot.version > last_version:
                last_version = snapshot.version
                yield f"id: {last_version}\nevent: status\ndata: {snapshot.model_dump_json()}\n\n"
                if snapshot.status in TERMINAL_STATES:
                    return
            try:
                snapshot = await asyncio.wait_for(updates.get(), keepalive_seconds)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
    finally:
        unsubscribe()
