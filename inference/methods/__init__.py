"""Generation methods: each turns a loaded model + request into GeneratedLayers."""
from __future__ import annotations

from ..errors import InvalidRequest


def run_method(loaded, request, *, progress, cancel):
    """Dispatch on `request.method` (validated against inference.request.METHODS)."""
    if request.method == "independent":
        from .independent import generate_independent

        return generate_independent(loaded, request, progress=progress, cancel=cancel)
    if request.method == "joint":
        from .joint import generate_joint

        return generate_joint(loaded, request, progress=progress, cancel=cancel)
    if request.method == "harmonized":
        from .harmonized import generate_harmonized

        return generate_harmonized(loaded, request, progress=progress, cancel=cancel)
    raise InvalidRequest("method", f"method {request.method!r} is not available")
