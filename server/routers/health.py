"""GET /v1/health: the only route without a token."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..jobs import JobManager
from ..schemas import DeviceOut, ErrorOut, HealthOut
from ..state import ServerInfo, get_info, get_manager

router = APIRouter(tags=["server"])


@router.get("/health", response_model=HealthOut,
            responses={421: {"model": ErrorOut, "description": "Host header is not this server"}})
def health(manager: JobManager = Depends(get_manager), info: ServerInfo = Depends(get_info)) -> HealthOut:
    """Liveness and what runs where; the only endpoint without a token."""
    devices = [DeviceOut(**{**described, **worker}) for described, worker in
               zip(info.devices or [{}] * len(manager.engines), manager.devices())]
    return HealthOut(status="ok", version=info.version, device=info.device, torch=info.torch,
                     diffusers=info.diffusers, loaded_model=getattr(manager.engine, "loaded_model", None),
                     queue_length=manager.queue_length(), running=manager.running_id(), devices=devices)
