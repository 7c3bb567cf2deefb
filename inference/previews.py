"""Live previews: a cheap picture of each layer while it is being denoised.

Every few steps the samplers offer their current clean estimate x̂0 (UNet latents) through
`offer_preview()` (the layered sampler from its own steps, the independent method's pipeline
through a `clean_estimate.CleanEstimateScheduler`), which does nothing unless a collector
is installed for the running job with `collect_previews()` (the server does so per job).
No VAE runs: a fixed linear map takes the 4 latent channels to RGB (the approximation
preview tools use for SD-family latents), and a foreground's alpha is estimated from how
far each latent pixel is from the latent of a fully transparent pixel. The collector gets small PNGs (latent resolution,
1/8 of the image) per layer: the background, each foreground over a checkerboard, and the
blended image (the sampler's own blended row where the method has one, else the previews
composited). Cost: a few small tensor ops and PNG encodes per refresh (bench/previews.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

# latent channels → RGB in [-1, 1] for SD 1.5 / SDXL-style 4-channel latents (UNet scale).
LATENT_RGB = {
    "sdxl": ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
             (-0.3165, -0.2492, -0.2188)),
    "sd15": ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
             (-0.2120, -0.2616, -0.7177)),
}
LATENT_RGB_BIAS = {"sdxl": (0.1084, -0.0175, -0.0011), "sd15": (0.0, 0.0, 0.0)}
REFRESHES = 8  # previews per denoising run at most (plus its last step)
CHECKER_CELL = 4  # latent pixels
ALPHA_SOFTNESS = 0.5  # share of a layer's largest distance from "empty" that reads as opaque

Publish = Callable[[int, int, dict[str, bytes]], None]  # (step, total, {layer name: PNG})

_collector: contextvars.ContextVar[Optional["PreviewCollector"]] = contextvars.ContextVar(
    "multiplane_preview_collector", default=None)


class PreviewCollector:
    """Receives a job's previews: `publish(step, total, pngs)` on the refreshing steps."""

    def __init__(self, publish: Publish, refreshes: int = REFRESHES):
        self.publish = publish
        self.family = "sdxl"  # the loaded model's, set by the engine (`use_family`)
        self.refreshes = max(1, refreshes)

    def due(self, step: int, total: int) -> bool:
        """Every total/refreshes steps, and the last one (1-based steps)."""
        return step == total or step % max(1, math.ceil(total / self.refreshes)) == 0


@contextlib.contextmanager
def collect_previews(collector: Optional[PreviewCollector]) -> Iterator[None]:
    """Send the previews of everything run inside (on this thread) to `collector`."""
    token = _collector.set(collector)
    try:
        yield
    finally:
        _collector.reset(token)


def use_family(family: str) -> None:
    """The loaded model's family decides the latent → RGB map of this job's previews."""
    collector = _collector.get()
    if collector is not None:
        collector.family = family if family in LATENT_RGB else "sd15"


def collecting() -> bool:
    """Whether this thread's job collects previews (so callers skip preparing for them)."""
    return _collector.get() is not None


def row_names(roles: Sequence[str]) -> list[str]:
    """Preview names of a layered run's rows: "background", "layer_01"… (back to front), "blended"."""
    names, foreground = [], 0
    for role in roles:
        if role == "foreground":
            foreground += 1
            names.append(f"layer_{foreground:02d}")
        else:
            names.append(role)
    return names


def layer_preview_name(layer: int) -> str:
    """The preview name of stack layer `layer` (0 = background)."""
    return "background" if layer == 0 else f"layer_{layer:02d}"


def offer_preview(step: int, total: int, x0: torch.Tensor, roles: Sequence[str],
                  empty: Optional[torch.Tensor] = None, names: Optional[Sequence[str]] = None) -> None:
    """Offer x̂0 rows [N, 4, h, w] (roles "background", "foreground", "blended"; names
    default to `row_names(roles)`) at a 1-based step; a no-op without a collector or off
    its refresh steps."""
    collector = _collector.get()
    if collector is None or not collector.due(step, total):
        return
    names = list(names) if names is not None else row_names(roles)
    collector.publish(step, total, preview_pngs(x0, names, roles, empty, collector.family))


def latent_rgb(x0: torch.Tensor, family: str = "sdxl") -> np.ndarray:
    """[N, 4, h, w] latents → [N, h, w, 3] float RGB in 0..1 (the cheap linear map)."""
    factors = torch.tensor(LATENT_RGB[family], dtype=torch.float32, device=x0.device)
    bias = torch.tensor(LATENT_RGB_BIAS[family], dtype=torch.float32, device=x0.device)
    rgb = torch.einsum("nchw,cr->nhwr", x0[:, :4].float(), factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()


def alpha_estimate(x0: torch.Tensor, empty: Optional[torch.Tensor]) -> np.ndarray:
    """[N, h, w] alpha in 0..1: distance of each latent pixel from the latent of a fully
    transparent pixel, relative to the row's largest (fully opaque everywhere without `empty`)."""
    if empty is None:
        return np.ones((x0.shape[0], *x0.shape[2:]), np.float32)
    distance = (x0.float() - empty.to(x0.device).float()).norm(dim=1)
    scale = distance.flatten(1).amax(dim=1).clamp_min(1e-6).view(-1, 1, 1) * ALPHA_SOFTNESS
    return (distance / scale).clamp(0.0, 1.0).cpu().numpy()


def checkerboard(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    cells = ((y // CHECKER_CELL + x // CHECKER_CELL) % 2).astype(np.float32)
    return (0.4 + 0.2 * cells)[..., None].repeat(3, axis=2)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(rgb * 255.0).astype(np.uint8), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def preview_pngs(x0: torch.Tensor, names: Sequence[str], roles: Sequence[str],
                 empty: Optional[torch.Tensor], family: str = "sdxl") -> dict[str, bytes]:
    """{name: PNG} per row, plus "blended" when no row is the blended image."""
    rgb = latent_rgb(x0, family)
    alpha = alpha_estimate(x0, empty)
    board = checkerboard(*rgb.shape[1:3])
    pngs, composite = {}, None
    for index, (name, role) in enumerate(zip(names, roles)):
        if role == "foreground":
            a = alpha[index][..., None]
            pngs[name] = _png(rgb[index] * a + board * (1.0 - a))
            if composite is not None:
                composite = rgb[index] * a + composite * (1.0 - a)
        else:
            pngs[name] = _png(rgb[index])
            if role == "background":
                composite = rgb[index]
    if "blended" not in roles and composite is not None and len(names) > 1:
        pngs["blended"] = _png(composite)
    return pngs
