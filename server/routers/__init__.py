"""The `/v1` routes, one router per resource; `app.create_app` mounts them (all but health
behind the bearer token). Routes only translate HTTP to the job service and back."""
from __future__ import annotations

from ..schemas import ErrorOut

NOT_FOUND = {404: {"model": ErrorOut, "description": "no such job (or file)"}}
