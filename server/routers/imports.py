"""/v1/imports: layered PSD/ORA files back in as stacks."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from ..jobs import JobManager
from ..schemas import ErrorOut, ImportIn, JobOut
from ..state import get_manager

router = APIRouter(prefix="/imports", tags=["imports"])


@router.post("", status_code=201, response_model=JobOut,
             responses={404: {"model": ErrorOut, "description": "no such file on the server's machine"},
                        503: {"model": ErrorOut, "description": "shutting down"}})
def import_layers(body: ImportIn, manager: JobManager = Depends(get_manager)) -> JobOut:
    """Import a layered file on this machine as a new stack, before answering: a finished job
    of kind `import` whose files are fetched like any stack's (GET /v1/jobs/{id}/files/{name})
    and whose `warnings` say what the stack could not carry over (blend modes, adjustment
    layers, flattened groups, hidden layers). A file that is not there is a 404; one that is
    not a readable layered file is a 422 naming `path`."""
    return manager.import_layers(body)
