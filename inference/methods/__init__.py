"""Generation methods: each turns a loaded model + request into `GeneratedLayers`.

The registry below is the one list of methods: `inference.request.METHODS` reads it, the
engine dispatches through it, the server reads each method's declared shape from it, and
methods never import the engine. Method modules are imported on first use (they need torch;
validating a request does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Callable, NamedTuple, Optional

from ..errors import InvalidRequest
from ..progress import WorkPlan


@dataclass
class GeneratedLayers:
    """What a method returns: uint8 arrays, back to front, plus per-layer facts."""

    background: "object"  # np.ndarray (H, W, 3) uint8
    foregrounds: list = field(default_factory=list)  # np.ndarray (H, W, 4) uint8, straight alpha
    seeds: list[int] = field(default_factory=list)  # background first
    masks: Optional[list] = None
    blended: Optional[object] = None
    timings: dict = field(default_factory=dict)


class Method(NamedTuple):
    module: str  # in this package
    function: str  # function(loaded, request, *, progress, cancel) -> GeneratedLayers
    # How many joint denoising runs cover all layers at once (harmonized: a prior pass, then
    # the main pass); 0 = layer after layer.
    joint_runs: int


_REGISTRY: dict[str, Method] = {
    "joint": Method("joint", "generate_joint", joint_runs=1),
    "independent": Method("independent", "generate_independent", joint_runs=0),
    "harmonized": Method("harmonized", "generate_harmonized", joint_runs=2),
}
METHODS: tuple[str, ...] = tuple(_REGISTRY)


def _method(name: str) -> Method:
    if name not in _REGISTRY:
        raise InvalidRequest("method", f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return _REGISTRY[name]


def method_function(name: str) -> Callable[..., GeneratedLayers]:
    """The function that runs method `name`."""
    method = _method(name)
    return getattr(import_module(f"{__name__}.{method.module}"), method.function)


def run_method(loaded, request, *, progress, cancel) -> GeneratedLayers:
    """Run `request.method` (validated against METHODS) on the loaded model."""
    return method_function(request.method)(loaded, request, progress=progress, cancel=cancel)


def work_plan(request) -> WorkPlan:
    """What `run_method(request)` will report, from the request alone (no model needed)."""
    runs = _method(request.method).joint_runs
    return WorkPlan(layers=1 + len(request.layers), steps=request.steps, joint=runs > 0, runs=max(runs, 1))


def edit_plan(layers: int, steps: int, regenerated: Optional[int] = None) -> WorkPlan:
    """What an edit of a `layers`-layer stack will report: one joint run, then decoding the
    `regenerated` layer only (`Engine.regenerate`) or every layer (`Engine.restyle`,
    `Engine.extend`)."""
    return WorkPlan(layers=layers, steps=steps, joint=True,
                    decoded=None if regenerated is None else (regenerated,))
