"""Generation methods: each turns a loaded model + request into `GeneratedLayers`.

The registry below is the one list of methods: `inference.request.METHODS` reads it, the
engine dispatches through it, and methods never import the engine. Method modules are
imported on first use (they need torch; validating a request does not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import Callable, Optional

from ..errors import InvalidRequest


@dataclass
class GeneratedLayers:
    """What a method returns: uint8 arrays, back to front, plus per-layer facts."""

    background: "object"  # np.ndarray (H, W, 3) uint8
    foregrounds: list = field(default_factory=list)  # np.ndarray (H, W, 4) uint8, straight alpha
    seeds: list[int] = field(default_factory=list)  # background first
    masks: Optional[list] = None
    blended: Optional[object] = None
    timings: dict = field(default_factory=dict)


# name → (module in this package, function(loaded, request, *, progress, cancel)).
_REGISTRY: dict[str, tuple[str, str]] = {
    "joint": ("joint", "generate_joint"),
    "independent": ("independent", "generate_independent"),
    "harmonized": ("harmonized", "generate_harmonized"),
}
METHODS: tuple[str, ...] = tuple(_REGISTRY)


def method_function(name: str) -> Callable[..., GeneratedLayers]:
    """The function that runs method `name`."""
    if name not in _REGISTRY:
        raise InvalidRequest("method", f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, function = _REGISTRY[name]
    return getattr(import_module(f"{__name__}.{module}"), function)


def run_method(loaded, request, *, progress, cancel) -> GeneratedLayers:
    """Run `request.method` (validated against METHODS) on the loaded model."""
    return method_function(request.method)(loaded, request, progress=progress, cancel=cancel)
