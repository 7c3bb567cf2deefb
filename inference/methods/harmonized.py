"""Method `harmonized` (after LayerFusion): one foreground, a background and their blend.

Two `LayeredSampler` runs: a prior pass on the foreground alone reads a soft/hard mask from
its attention (self-attention spread × own-token cross attention); the main pass confines
the foreground by the hard mask and blends at the attention level (the blended item attends
to a mask-composite of foreground and background keys/values). Training-free, on the
LayerDiffuse weights. Design notes: docs/methods.md.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..errors import InvalidRequest
from ..layered_attention import KVComposite
from ..layered_sampler import LayeredOptions, LayeredSampler, LayeredSettings, LayerItem
from ..masks import box_mask, hard_mask, mask_to_uint8, minmax, soft_mask, structure_prior
from ..progress import CancelToken, ProgressCallback
from ..prompts import layer_seeds
from ..request import StackRequest
from ..sampling import job_pipeline, vae_scale_factor
from . import GeneratedLayers
from .joint import decode_items, joint_items

HARD_THRESHOLD = 0.5


def fusion_masks(spread: torch.Tensor, cross: torch.Tensor, box: torch.Tensor,
                 threshold: float = HARD_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """(m_soft, m_hard) from averaged self-attention spread and cross-attention mass maps."""
    soft = soft_mask(structure_prior(spread), minmax(cross)) * box
    return soft, hard_mask(soft, threshold)


def generate_harmonized(loaded, request: StackRequest, *, progress: ProgressCallback,
                        cancel: CancelToken) -> GeneratedLayers:
    if len(request.layers) != 1:
        raise InvalidRequest("layers", "method 'harmonized' blends exactly one foreground layer")
    pipe = job_pipeline(loaded.pipeline)
    unet, vae = pipe.unet, pipe.vae
    device, dtype = loaded.device, unet.dtype
    seeds = layer_seeds(request)
    items = joint_items(pipe, request, seeds, vae, unet, device, dtype)  # [bg, fg, blended]
    settings = LayeredSettings.from_request(request)
    run = dict(progress=progress, cancel=cancel, layers=2)
    timings = {}

    # 1. Prior pass: the foreground alone, its attention maps averaged over all steps.
    t = time.perf_counter()
    fg = items[1]
    prior_item = LayerItem("foreground", fg.prompt, fg.noise, box=fg.box, content_tokens=fg.content_tokens)
    prior = LayeredSampler(loaded, pipe, [prior_item], replace(settings, inter_layer_strength=0.0, mask_guidance=0.0),
                           LayeredOptions(capture_self=[0], accumulate_capture=True,
                                          total_steps=2 * request.steps))(**run)
    cond = 1 if request.guidance > 1.0 else 0
    f = vae_scale_factor(vae)
    size = (request.height // f, request.width // f)
    spread, cross = prior.capture.spread_map(cond, size), prior.capture.cross_map(cond, size)
    if spread is None or cross is None:
        raise InvalidRequest("model", "the UNet has no attention small enough to read a structure prior from")
    box = box_mask(fg.box, *spread.shape, device=spread.device)
    soft, hard = fusion_masks(spread.to(device), cross.to(device), box.to(device))
    timings["prior"] = time.perf_counter() - t

    # 2. Main pass: foreground confined by the hard mask; only the blended item looks at the
    #    others, through the mask-composite of their keys/values.
    t = time.perf_counter()
    fg.fixed_mask = hard
    fg.placement_mask = soft
    attends = torch.zeros(3, 3, dtype=torch.bool)
    attends[2] = True
    result = LayeredSampler(loaded, pipe, items, settings, LayeredOptions(
        estimate_masks=False, attends=attends, composite=KVComposite(target=2, inside=1, outside=0, mask=soft),
        step_offset=request.steps, total_steps=2 * request.steps))(**run)
    timings["denoise"] = time.perf_counter() - t
    t = time.perf_counter()
    background, foregrounds, blended = decode_items(loaded, vae, items, result.latents, request.tta_passes,
                                                    progress, cancel)
    timings["decode"] = time.perf_counter() - t
    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds,
                           masks=[mask_to_uint8(soft, request.height, request.width)], blended=blended,
                           timings=timings)
