"""What differs between model families in a layered run, behind one small adapter each.

The layered sampler (`inference.layered_sampler`) asks its family for: the batch row layout,
the text conditioning, and the attention processors (transparency + inter-layer attention).
A new family (e.g. a DiT) is a new module here plus one registry line, not edits in methods.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Optional, Protocol, Sequence

import torch

from ..errors import InvalidRequest


@dataclass
class RowLayout:
    """Which item each batch row carries. Identity (`rows is None`) for one row per item;
    otherwise items may appear in several rows, whose predictions are averaged per item."""

    n_items: int
    rows: Optional[list[int]] = None

    @property
    def items(self) -> list[int]:
        return list(range(self.n_items)) if self.rows is None else self.rows

    def gather(self, latents: torch.Tensor) -> torch.Tensor:
        """[items, ...] → [rows, ...]."""
        return latents if self.rows is None else latents[self.rows]

    def merge(self, eps: torch.Tensor) -> torch.Tensor:
        """[rows, ...] → [items, ...]: the mean over the rows that carry each item."""
        if self.rows is None:
            return eps
        index = torch.tensor(self.rows, device=eps.device)
        total = torch.zeros((self.n_items, *eps.shape[1:]), device=eps.device, dtype=torch.float32)
        total.index_add_(0, index, eps.float())
        counts = torch.bincount(index, minlength=self.n_items).to(total.dtype).view(-1, *([1] * (eps.ndim - 1)))
        return (total / counts).to(eps.dtype)


@dataclass
class AttentionSetup:
    """What the sampler wants from attention for one run (families use what they support)."""

    roles: Sequence[str]
    groups: int  # guidance halves
    latent_size: tuple[int, int]
    inter_layer_strength: float
    transparency_scale: Sequence[float]  # per item: 1 = LayerDiffuse transparency on
    attends: torch.Tensor  # [L, L] bool: who sees whom in inter-layer attention
    regions: Optional[torch.Tensor]  # [L, h, w] layout boxes, None without any box
    composite: object  # KVComposite or None
    capture: object  # AttentionCapture or None


class LayeredFamily(Protocol):
    """One model family's part of a layered run."""

    def row_layout(self, items: Sequence, *, composite=None, capture_self: Sequence[int] = ()) -> RowLayout:
        """The batch rows for `items`; InvalidRequest for runs the family cannot do."""

    def encode_prompts(self, pipe, prompts: list[str], negative: str, cfg: bool, device,
                       height: int, width: int) -> tuple[torch.Tensor, Optional[dict]]:
        """(context [G·R, S, D], added_cond_kwargs or None) for the rows' prompts."""

    def attention(self, loaded, unet, setup: AttentionSetup):
        """(state, context manager installing the processors for the run)."""

    def at_step(self, state, step: int, inter_layer_strength: float, inter_layer_end: int) -> None:
        """Per-step attention schedule (e.g. inter-layer attention only in early steps)."""

    def chunk_units(self, state, rows_per_group: int, groups: int) -> list[list[int]]:
        """Batch rows that must share one UNet call this step (the sampler packs these units
        into chunks when the whole batch does not fit): rows whose attention mixes."""


def guidance_halves(rows_per_group: int, groups: int) -> list[list[int]]:
    """The rows of each guidance half (unconditional first)."""
    return [list(range(g * rows_per_group, (g + 1) * rows_per_group)) for g in range(groups)]


_REGISTRY: dict[str, tuple[str, str]] = {
    "sdxl": ("sdxl", "SDXLLayered"),
    "sd15": ("sd15", "SD15Layered"),
}


def layered_family(name: str) -> LayeredFamily:
    """The adapter of family `name`."""
    if name not in _REGISTRY:
        raise InvalidRequest("model", f"layered generation does not support the {name!r} family "
                                      f"(supported: {', '.join(_REGISTRY)})")
    module, cls = _REGISTRY[name]
    return getattr(import_module(f"{__name__}.{module}"), cls)()
