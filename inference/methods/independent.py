"""Method `independent`: every layer is its own sampling run.

The background comes from the base model; each foreground from the transparency-patched
UNet and is decoded to straight RGBA by the transparent decoder. Layers do not see each
other (that is the `joint` method's job); this method is the baseline and the fallback.
"""
from __future__ import annotations

import time

from ..layered_sampler import empty_latent
from ..previews import collecting
from ..progress import CancelToken, Progress, ProgressCallback
from ..prompts import combine_prompts, layer_seeds
from ..request import StackRequest
from ..sampling import decode_rgb, denoise, initial_noise, job_pipeline, to_uint8
from . import GeneratedLayers


def generate_independent(loaded, request: StackRequest, *, progress: ProgressCallback,
                         cancel: CancelToken) -> GeneratedLayers:
    pipe = job_pipeline(loaded.pipeline)
    unet, vae = pipe.unet, pipe.vae
    device, dtype = loaded.device, unet.dtype
    seeds = layer_seeds(request)
    n_layers = 1 + len(request.layers)
    common = dict(negative_prompt=request.negative_prompt, width=request.width,
                  height=request.height, steps=request.steps, guidance=request.guidance,
                  progress=progress, cancel=cancel, layers=n_layers)
    timings = {"denoise": 0.0, "decode": 0.0}

    t = time.perf_counter()
    latents = denoise(pipe, prompt=combine_prompts(request.background, request.prompt),
                      noise=initial_noise(seeds[0], vae, unet, request.width, request.height, device, dtype),
                      layer=0, **common)
    timings["denoise"] += time.perf_counter() - t
    cancel.raise_if_cancelled()
    t = time.perf_counter()
    progress(Progress(phase="decode", step=0, total=1, layer=0, layers=n_layers))
    pixels, _ = decode_rgb(vae, latents)
    background = to_uint8(pixels)
    progress(Progress(phase="decode", step=1, total=1, layer=0, layers=n_layers))
    timings["decode"] += time.perf_counter() - t

    foregrounds = []
    # A transparent pixel's latent, for the live previews' alpha estimate (encoded once per VAE).
    empty = empty_latent(loaded, vae) if collecting() and request.layers else None
    for i, layer in enumerate(request.layers, start=1):
        cancel.raise_if_cancelled()
        t = time.perf_counter()
        with loaded.transparency(pipe.unet):
            latents = denoise(pipe, prompt=combine_prompts(layer.prompt, request.prompt),
                              noise=initial_noise(seeds[i], vae, unet, request.width, request.height,
                                                  device, dtype),
                              layer=i, empty=empty, **common)
        timings["denoise"] += time.perf_counter() - t
        t = time.perf_counter()
        foregrounds.append(decode_foreground(loaded, vae, latents, request.tta_passes, progress,
                                             cancel, layer=i, layers=n_layers))
        timings["decode"] += time.perf_counter() - t

    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds,
                           timings=timings)


def decode_foreground(loaded, vae, latents, passes: int, progress: ProgressCallback,
                      cancel: CancelToken, *, layer: int, layers: int):
    """Latent → straight RGBA uint8 through the VAE and the transparent decoder."""
    from ..models import codecs_on_device
    from ..transparent_vae import decode_transparent

    pixels, z = decode_rgb(vae, latents)
    with codecs_on_device(loaded):
        rgba = decode_transparent(loaded.decoder, pixels, z, passes=passes, cancel=cancel,
                                  progress=progress, layer=layer, layers=layers)
    return to_uint8(rgba)
