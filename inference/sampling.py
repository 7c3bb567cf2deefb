"""Shared denoising and decoding steps used by every method.

Kept apart from the methods so that `independent`, `joint` and editing produce latents and
pixels the same way (same noise, same upcasting, same clipping).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .clean_estimate import CleanEstimateScheduler
from .errors import Cancelled
from .memory_model import tiled_decode_when_short
from .previews import collecting, layer_preview_name, offer_preview
from .progress import CancelToken, Progress, ProgressCallback


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell, from the VAE's depth (8 for every SD VAE; never hard-coded)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def initial_noise(seed: int, vae, unet, width: int, height: int, device, dtype) -> torch.Tensor:
    """Seeded starting noise drawn on the CPU so a seed means the same image on every device."""
    f = vae_scale_factor(vae)
    shape = (1, unet.config.in_channels, height // f, width // f)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def job_pipeline(pipeline):
    """A pipeline sharing the loaded modules but with its own scheduler (schedulers hold state)."""
    scheduler = pipeline.scheduler.__class__.from_config(pipeline.scheduler.config)
    components = {**pipeline.components, "scheduler": scheduler}
    pipe = pipeline.__class__(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoise(pipe, *, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
            guidance: float, noise: torch.Tensor, progress: ProgressCallback,
            cancel: CancelToken, layer: int, layers: int,
            empty: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the pipeline's sampler to the final latent (scaled, as the UNet sees it).

    Cancel is checked after every step and raises out of the sampler, so a cancelled job
    stops within one step and never reaches the VAE. Live previews (previews.py) show the
    current clean estimate x̂0: while previews are collected the pipeline runs with a
    `CleanEstimateScheduler` that keeps it; `empty`, a transparent pixel's latent, lets a
    foreground's preview estimate its alpha.
    """
    role = "background" if layer == 0 else "foreground"
    scheduler = pipe.scheduler
    estimate = CleanEstimateScheduler(scheduler) if collecting() else None

    def on_step_end(_pipe, step, _timestep, kwargs):
        if cancel.cancelled:
            raise Cancelled(cancel.reason)
        if estimate is not None:
            offer_preview(step + 1, steps, estimate.clean, [role], empty, [layer_preview_name(layer)])
        progress(Progress(phase="denoise", step=step + 1, total=steps, layer=layer, layers=layers))
        return kwargs

    progress(Progress(phase="denoise", step=0, total=steps, layer=layer, layers=layers))
    if estimate is not None:
        pipe.scheduler = estimate
    try:
        out = pipe(prompt=prompt, negative_prompt=negative_prompt or None, width=width, height=height,
                   num_inference_steps=steps, guidance_scale=guidance, latents=noise,
                   output_type="latent", callback_on_step_end=on_step_end, return_dict=False)
    finally:
        pipe.scheduler = scheduler
    return out[0]


def _latent_stats(vae, like: torch.Tensor):
    """(mean, std) as [1, C, 1, 1] tensors when the VAE defines them (SD3/Flux-style), else None."""
    cfg = vae.config
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is None or std is None:
        return None
    return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1))


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """From the UNet's latent space back to the VAE's (`z / scaling_factor`, or mean/std)."""
    stats = _latent_stats(vae, latents)
    if stats is not None:
        mean, std = stats
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latent → UNet latent (the inverse of `unscale_latents`)."""
    stats = _latent_stats(vae, z)
    if stats is not None:
        mean, std = stats
        return (z - mean) * vae.config.scaling_factor / std
    return z * vae.config.scaling_factor


@torch.inference_mode()
def decode_rgb(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode UNet latents to RGB in [0, 1]; returns (pixels, unscaled latents) in float32.

    The SDXL VAE overflows in fp16 (`force_upcast`), so decoding runs in float32 then.
    """
    z = unscale_latents(vae, latents)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        decode_dtype = next(vae.post_quant_conv.parameters()).dtype if vae.post_quant_conv is not None \
            else vae.dtype
        with tiled_decode_when_short(vae, z, decode_dtype):
            image = vae.decode(z.to(decode_dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    pixels = (image.float() * 0.5 + 0.5).clamp(0, 1)
    return pixels, z.float()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] float in [0, 1] → (H, W, C) uint8, rounding half up like PIL does."""
    arr = image[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return np.floor(arr * 255.0 + 0.5).astype(np.uint8)
