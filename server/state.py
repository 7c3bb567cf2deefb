"""What the routes depend on: the job service and the server's fixed facts, which
`app.create_app` keeps on `app.state`; routes receive them with `Depends`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastapi import Request

from .jobs import JobManager


@dataclass
class ServerInfo:
    """Facts for /v1/health that do not change while the process runs."""

    version: str
    device: dict = field(default_factory=dict)  # the first worker's device
    devices: list[dict] = field(default_factory=list)  # every worker's, in worker order
    torch: Optional[str] = None
    diffusers: Optional[str] = None


def get_manager(request: Request) -> JobManager:
    return request.app.state.manager


def get_info(request: Request) -> ServerInfo:
    return request.app.state.info


def get_keepalive_seconds(request: Request) -> float:
    return request.app.state.keepalive_seconds
