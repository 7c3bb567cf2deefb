"""Method `joint`: background, N foregrounds and a blended image denoised together.

One `LayeredSampler` run over [background, foreground 1..N, blended] — per-layer prompts,
per-sample transparency, inter-layer attention, layout boxes, self-mask guidance — then one
decode of every item. PSDiffusion/LayerDiff-style, training-free on the LayerDiffuse
weights (those papers' models have no public weights). Design notes: docs/methods.md.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from ..layered_sampler import LayeredSampler, LayeredSettings, LayerItem
from ..masks import mask_to_uint8
from ..progress import CancelToken, Progress, ProgressCallback
from ..prompts import blended_prompt, combine_prompts, layer_seeds, prompt_token_positions
from ..request import StackRequest
from ..sampling import decode_rgb, initial_noise, job_pipeline, to_uint8, vae_scale_factor
from . import GeneratedLayers


def joint_items(pipe, request: StackRequest, seeds: list[int], vae, unet, device, dtype) -> list[LayerItem]:
    """[background, foregrounds..., blended] items for `request` with per-layer seeds; the
    blended item starts from the background's noise, so it shares its layout from the start.
    Boxes are mapped from the request's frame to the canvas the sampler works on."""
    noise = lambda seed: initial_noise(seed, vae, unet, request.width, request.height, device, dtype)  # noqa: E731
    bg_noise = noise(seeds[0])
    items = [LayerItem("background", combine_prompts(request.background, request.prompt), bg_noise)]
    for i, layer in enumerate(request.layers, start=1):
        items.append(LayerItem("foreground", combine_prompts(layer.prompt, request.prompt), noise(seeds[i]),
                               box=request.canvas_box(layer.box), content_tokens=prompt_token_positions(pipe.tokenizer, layer.prompt)))
    items.append(LayerItem("blended", blended_prompt(request), bg_noise.clone()))
    return items


DECODE_BATCH_PIXELS = 1024 * 1024  # latents decoded per VAE call while their pixels fit this


def decode_items(loaded, vae, items: list[LayerItem], latents: torch.Tensor, tta_passes: int,
                 progress: ProgressCallback, cancel: CancelToken, skip: Sequence[int] = ()):
    """(background, foregrounds, blended) uint8 arrays; items in `skip` give None.

    The VAE decodes several items per call while they fit `DECODE_BATCH_PIXELS` (small
    images: one call instead of one per layer; 1024² ones: one at a time, as memory wants);
    the foregrounds of a call then go through the transparent decoder together.
    """
    from ..models import codecs_on_device
    from ..transparent_vae import decode_transparent

    layer_of = {i: n for n, i in enumerate(i for i, it in enumerate(items) if it.role != "blended")}
    layers = len(layer_of)
    wanted = [i for i, it in enumerate(items) if it.role == "blended" or i not in skip]
    per_call = max(1, DECODE_BATCH_PIXELS // (latents.shape[-2] * latents.shape[-1] * vae_scale_factor(vae) ** 2))
    fg_slot = {i: n for n, i in enumerate(i for i, it in enumerate(items) if it.role == "foreground")}
    background, foregrounds, blended = None, [None] * len(fg_slot), None
    for start in range(0, len(wanted), per_call):
        cancel.raise_if_cancelled()
        chunk = wanted[start:start + per_call]
        for i in chunk:
            if items[i].role == "background":
                progress(Progress(phase="decode", step=0, total=1, layer=layer_of[i], layers=layers))
        pixels, z = decode_rgb(vae, latents[chunk])
        for n, i in enumerate(chunk):
            if items[i].role == "blended":
                blended = to_uint8(pixels[n:n + 1])
            elif items[i].role == "background":
                background = to_uint8(pixels[n:n + 1])
                progress(Progress(phase="decode", step=1, total=1, layer=layer_of[i], layers=layers))
        fg = [n for n, i in enumerate(chunk) if items[i].role == "foreground"]
        if not fg:
            continue
        single = len(fg) == 1  # one layer reports each TTA pass; a batch reports per layer when done
        with codecs_on_device(loaded):  # host → device for the decode under model offload
            rgba = decode_transparent(loaded.decoder, pixels[fg], z[fg], passes=tta_passes, cancel=cancel,
                                      progress=progress if single else None, layer=layer_of[chunk[fg[0]]],
                                      layers=layers)
        for row, n in enumerate(fg):
            foregrounds[fg_slot[chunk[n]]] = to_uint8(rgba[row:row + 1])
            if not single:
                progress(Progress(phase="decode", step=tta_passes, total=tta_passes, layer=layer_of[chunk[n]],
                                  layers=layers))
    return background, foregrounds, blended


def generate_joint(loaded, request: StackRequest, *, progress: ProgressCallback,
                   cancel: CancelToken) -> GeneratedLayers:
    pipe = job_pipeline(loaded.pipeline)
    unet, vae = pipe.unet, pipe.vae
    seeds = layer_seeds(request)
    items = joint_items(pipe, request, seeds, vae, unet, loaded.device, unet.dtype)
    timings = {}
    t = time.perf_counter()
    result = LayeredSampler(loaded, pipe, items, LayeredSettings.from_request(request))(
        progress=progress, cancel=cancel, layers=1 + len(request.layers))
    timings["denoise"] = time.perf_counter() - t
    t = time.perf_counter()
    background, foregrounds, blended = decode_items(loaded, vae, items, result.latents, request.tta_passes,
                                                    progress, cancel)
    masks = [mask_to_uint8(result.masks[i], request.height, request.width)
             for i, it in enumerate(items) if it.role == "foreground"]
    timings["decode"] = time.perf_counter() - t
    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds,
                           masks=masks or None, blended=blended, timings=timings)
