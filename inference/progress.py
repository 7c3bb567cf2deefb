"""Progress reporting and cooperative cancellation shared by the CLI, the server and tests."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .errors import Cancelled

PHASES = ("download", "load", "denoise", "decode", "save")


@dataclass(frozen=True)
class Progress:
    """One progress report.

    `layer` is the index into the stack's layers (0 = background) or None for work that is
    not per layer (loading, saving). `step`/`total` count units inside the phase (denoising
    steps, decode passes, downloaded bytes).
    """

    phase: str
    step: int = 0
    total: int = 0
    layer: Optional[int] = None
    layers: int = 0
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class WorkPlan:
    """The work a job will report, declared from the request before it starts, so that a
    front end turns reports into a share of the whole job without guessing the method's shape.

    `joint`: every layer is denoised together, `runs` runs of `steps` steps (reported with
    layer None and one step counter over all runs), then the `decoded` layers are decoded in
    order. Otherwise each layer, background first, is denoised (`steps`) and decoded in turn.
    """

    layers: int  # in the stack, background included
    steps: int  # denoising steps per run
    joint: bool = False
    runs: int = 1
    decoded: Optional[tuple[int, ...]] = None  # layers decoded, in order; None = all of them

    @property
    def decoded_layers(self) -> tuple[int, ...]:
        return tuple(range(self.layers)) if self.decoded is None else self.decoded


def ignore_progress(_: Progress) -> None:
    pass


class CancelToken:
    """Thread-safe flag checked at every denoising step and between phases."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)
