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
