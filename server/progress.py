"""A job's overall progress: the share done (`fraction`, 0..1) and the time left.

The share comes from the job's `WorkPlan`, declared by the method before it runs
(`inference.methods.work_plan`): every layer gets an equal share of the work; denoising
counts DENOISE_SHARE of it and decoding the rest. A joint plan denoises all layers in one
counter (DENOISE_SHARE of the whole), then decodes the planned layers one by one. Loading
counts nothing (once per model, not per job); saving starts at SAVE_START; 1.0 only once
the job has succeeded.
"""
from __future__ import annotations

from typing import Callable, Optional

from inference.progress import Progress, WorkPlan

DENOISE_SHARE = 0.85
SAVE_START = 0.97
ETA_MIN_DONE = 0.005  # the share that must be done since work began before an ETA is given


def _unit(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def overall_fraction(plan: WorkPlan, p: Progress) -> float:
    """The whole generation job's share done, 0..1, for one progress report."""
    if p.phase == "save":
        return SAVE_START
    if p.phase not in ("denoise", "decode"):
        return 0.0
    part = _unit(p.step / p.total) if p.total else 0.0
    if plan.joint:
        if p.phase == "denoise":
            value = DENOISE_SHARE * part
        else:  # the planned decodes, in order, after the joint denoising
            decoded = plan.decoded_layers
            slot = min(sum(1 for layer in decoded if layer < (p.layer or 0)), max(len(decoded) - 1, 0))
            value = DENOISE_SHARE + (1 - DENOISE_SHARE) * (slot + part) / max(len(decoded), 1)
    else:  # layer after layer: denoise, then decode
        layers = max(plan.layers, 1)
        layer = min(max(p.layer or 0, 0), layers - 1)
        within = DENOISE_SHARE * part if p.phase == "denoise" else \
            DENOISE_SHARE + (1 - DENOISE_SHARE) * part
        value = (layer + within) / layers
    return min(SAVE_START * value, SAVE_START)


def download_fraction(p: Progress) -> float:
    return _unit(p.step / p.total) if p.total else 0.0


def is_work(p: Progress) -> bool:
    """Reports that measure the job's own speed (denoising, decoding, counted bytes)."""
    return p.phase in ("denoise", "decode") or (p.phase == "download" and bool(p.total))


def eta_seconds(fraction: float, work_start: Optional[tuple[float, float]],
                now: float) -> Optional[float]:
    """Seconds left at the speed since `work_start` (its time, its fraction); None until
    enough is done to tell."""
    if work_start is None:
        return None
    t0, f0 = work_start
    done = fraction - f0
    if done <= ETA_MIN_DONE or now <= t0:
        return None
    return round((1.0 - fraction) * (now - t0) / done, 2)


class ByteCounter:
    """Per-file byte reports (the hub reports each file from 0) → one running total."""

    def __init__(self, expected: int, forward: Callable[[Progress], None]):
        self.expected = expected
        self.forward = forward
        self.done: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def __call__(self, p: Progress) -> None:
        if p.phase != "download":
            self.forward(p)
            return
        self.done[p.message] = p.step
        self.totals[p.message] = p.total
        total = max(self.expected, sum(self.totals.values()))
        self.forward(Progress(phase="download", step=sum(self.done.values()), total=total,
                              message=p.message))
