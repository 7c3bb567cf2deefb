"""Generation methods: each turns a loaded model + request into GeneratedLayers."""
from __future__ import annotations

from typing import Optional

from ..errors import InvalidRequest
from ..progress import WorkPlan

# Each method's shape: how many joint denoising runs cover all layers at once (harmonized: a
# prior pass, then the main pass); 0 = layer after layer. Keys: inference.request.METHODS.
JOINT_RUNS = {"independent": 0, "joint": 1, "harmonized": 2}


def work_plan(request) -> WorkPlan:
    """What `run_method(request)` will report, from the request alone (no model needed)."""
    runs = JOINT_RUNS[request.method]
    return WorkPlan(layers=1 + len(request.layers), steps=request.steps, joint=runs > 0,
                    runs=max(runs, 1))


def edit_plan(layers: int, steps: int, regenerated: Optional[int] = None) -> WorkPlan:
    """What an edit of a `layers`-layer stack will report: one joint run, then decoding the
    `regenerated` layer only (editing.regenerate_layer) or every layer (restyle_stack)."""
    return WorkPlan(layers=layers, steps=steps, joint=True,
                    decoded=None if regenerated is None else (regenerated,))


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
