"""Mask math for layered generation: layout boxes, attention-derived masks, latent compositing.

Everything here is plain tensor arithmetic on maps of shape [..., h, w] (latent or token
grids), kept apart from the attention processors so it can be tested on synthetic maps.

Formulas (all maps are per foreground, `minmax(x) = (x − min x) / (max x − min x)`, a
constant map normalizes to 0):

- content confidence (cross attention): `c_i = minmax(mean_heads Σ_{k ∈ layer tokens} A_ik)`
  — how much query position i listens to the words of the layer's own prompt;
- structure prior (self attention): with the head-averaged attention row `P_i·`, the
  *effective number of attended keys* `s_i = 1 / Σ_j P_ij²` (1 for a one-hot row, n for a
  uniform one); `structure_i = 1 − minmax(s)`. Object tokens attend to a compact part of
  the image, the empty (transparent) surround attends everywhere alike, so structure is
  high on the object;
- soft mask `m = minmax(structure ⊙ content)`; hard mask `m ≥ τ` (τ = 0.5 by default);
- latent alpha proxy: in LayerDiffuse's transparent latent space a transparent pixel
  encodes to a fixed "empty" latent, so `a = minmax(‖x̂0 − z_empty‖₂ over channels)` is a
  cheap per-cell estimate of coverage from the denoiser's clean estimate x̂0;
- confinement toward empty: `x̂0 ← z_empty + m ⊙ (x̂0 − z_empty)`;
- latent alpha-over (DreamLayer's blend, back to front): `z ← m_k ⊙ z_k + (1 − m_k) ⊙ z`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

EPS = 1e-8


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Normalize each map over its last two dims to [0, 1]; a constant map becomes 0."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > EPS, (x - lo) / span.clamp(min=EPS), torch.zeros_like(x))


def content_confidence(cross_probs: torch.Tensor, token_indices: Sequence[int], grid: tuple[int, int]
                       ) -> torch.Tensor:
    """c = minmax(Σ_{k ∈ tokens} A_ik), A head-averaged: `cross_probs` [heads, T, S] → [h, w]."""
    if not token_indices:
        raise ValueError("content_confidence needs at least one prompt token")
    summed = cross_probs.float().mean(dim=0)[:, list(token_indices)].sum(dim=-1)
    return minmax(summed.reshape(grid))


def attention_spread(self_probs: torch.Tensor) -> torch.Tensor:
    """s_i = 1 / Σ_j P_ij² of head-averaged rows: `self_probs` [heads, T, T] → [T]."""
    rows = self_probs.float().mean(dim=0)
    return 1.0 / (rows * rows).sum(dim=-1).clamp(min=EPS)


def structure_prior(spread: torch.Tensor) -> torch.Tensor:
    """structure = 1 − minmax(s) on a [h, w] map of attention spreads."""
    return 1.0 - minmax(spread)


def soft_mask(structure: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """m = minmax(structure ⊙ content)."""
    return minmax(structure * content)


def hard_mask(soft: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where the soft mask reaches `threshold`, else 0 (same dtype as `soft`)."""
    return (soft >= threshold).to(soft.dtype)


def box_mask(box: Optional[Sequence[float]], height: int, width: int, feather: float = 0.0,
             device=None, dtype=torch.float32) -> torch.Tensor:
    """[height, width] coverage of a normalized box (x0, y0, x1, y1), origin top-left.

    Each cell gets the fraction of its area inside the box (exact area coverage, so boxes
    not aligned to the grid still count right); `feather` (in cells) softens the edge with
    a linear ramp outside the box. None → all ones.
    """
    if box is None:
        return torch.ones(height, width, device=device, dtype=dtype)
    x0, y0, x1, y1 = (float(v) for v in box)

    def coverage(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        left, right = edges[:-1], edges[1:]
        inside = (torch.minimum(right, torch.tensor(hi)) - torch.maximum(left, torch.tensor(lo))).clamp(min=0)
        cov = inside * n
        if feather > 0:
            centers = (left + right) / 2
            dist = torch.maximum(lo - centers, centers - hi).clamp(min=0) * n
            cov = torch.maximum(cov, (1.0 - dist / feather).clamp(min=0))
        return cov.clamp(0, 1)

    rows = coverage(y0, y1, height)
    cols = coverage(x0, x1, width)
    return (rows[:, None] * cols[None, :]).to(device=device, dtype=dtype)


def resize_map(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., h, w] → [..., height, width]: area average when shrinking, bilinear when growing."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if height <= mask.shape[-2] and width <= mask.shape[-1]:
        out = F.interpolate(flat, size=(height, width), mode="area")
    else:
        out = F.interpolate(flat, size=(height, width), mode="bilinear", align_corners=False)
    return out.reshape(*lead, height, width).to(mask.dtype)


def latent_alpha_proxy(x0: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """a = minmax(‖x̂0 − z_empty‖ over channels): [B, C, h, w] → [B, h, w]."""
    # √Σ² rather than .norm(dim=1): torch's vector norm over the channel dim of a small
    # batch is ~50× slower on CPU, and this runs every denoising step.
    return minmax((x0.float() - empty.float()).square().sum(dim=1).sqrt())


def confine(x0: torch.Tensor, mask: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """z_empty + m ⊙ (x̂0 − z_empty): outside the mask the layer becomes transparent."""
    return empty + mask.to(x0.dtype) * (x0 - empty)


def latent_alpha_over(background: torch.Tensor, foregrounds: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """z = background; then for each foreground back to front z ← m ⊙ z_k + (1 − m) ⊙ z."""
    z = background
    for fg, m in zip(foregrounds, masks):
        m = m.to(z.dtype)
        z = m * fg + (1 - m) * z
    return z


def mask_to_uint8(mask: torch.Tensor, height: int, width: int):
    """A [h, w] mask in [0, 1] → (height, width) uint8 image (bilinear upsampling)."""
    import numpy as np

    full = resize_map(mask.float().clamp(0, 1), height, width).clamp(0, 1)
    return np.floor(full.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
