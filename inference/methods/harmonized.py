"""Method `harmonized` (after LayerFusion): one foreground, a background and their blend.

Two passes, each one batched UNet call per step:

1. **Prior pass** on the foreground model (the foreground item alone, transparency patch
   on, same seed and prompt as in pass 2). Over all its steps we average, on the latent
   grid, (a) the self-attention spread of every query `s_i = 1 / Σ_j P_ij²` (P the
   head-averaged attention row, divided by the key count so resolutions compare; only
   modules with ≤ 1024 tokens, where the T×T map is affordable) and (b) the cross-attention
   mass on the layer prompt's own tokens `Σ_{k ∈ layer tokens} A_ik`. Then
       structure = 1 − minmax(s)            (compact attention = object, diffuse = empty)
       content   = minmax(cross mass)
       m_soft    = minmax(structure ⊙ content) ⊙ box
       m_hard    = [m_soft ≥ 0.5]
2. **Main pass** on [background, foreground, blended]:
   - foreground: transparency patch on; its clean estimate is confined toward the empty
     latent with `(1 − g·(1 − m_hard))^(1/steps)` per step (g = `request.mask_guidance`;
     in total `1 − g·(1 − m_hard)`);
   - blended (starts from the background's noise): in every self-attention it attends to
     its own keys/values and to the composite `m_soft ⊙ K_fg + (1 − m_soft) ⊙ K_bg` (and
     the same for values) — foreground structure inside the mask, background outside;
     from 10 % to 50 % of the steps its clean estimate is also pulled toward the latent
     alpha-over `m_soft ⊙ x̂0_fg + (1 − m_soft) ⊙ x̂0_bg` (weight 1 → 0);
   - background: plain, attending only to itself, so it stays what the background prompt
     gives, and the blended image's surround stays consistent with it (it keeps attending
     to the background's keys outside the mask).
The saved mask (`mask_01.png`) is m_soft.
"""
from __future__ import annotations

import time

import torch

from ..engine import GeneratedLayers
from ..errors import InvalidRequest
from ..layered_attention import KVComposite
from ..masks import box_mask, hard_mask, mask_to_uint8, minmax, soft_mask, structure_prior
from ..progress import CancelToken, ProgressCallback
from ..request import StackRequest
from ..sampling import job_pipeline, vae_scale_factor
from .independent import layer_seeds
from .joint import LayerItem, decode_items, joint_items, sample_layers

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
    common = dict(width=request.width, height=request.height, steps=request.steps, guidance=request.guidance,
                  negative_prompt=request.negative_prompt, progress=progress, cancel=cancel, layers=2,
                  total_steps=2 * request.steps)
    timings = {}

    t = time.perf_counter()
    fg = items[1]
    prior_item = LayerItem("foreground", fg.prompt, fg.noise, box=fg.box, content_tokens=fg.content_tokens)
    prior = sample_layers(loaded, pipe, [prior_item], inter_layer_strength=0.0, mask_guidance=0.0,
                          capture_self=[0], accumulate_capture=True, **common)
    cond = 1 if request.guidance > 1.0 else 0
    f = vae_scale_factor(vae)
    size = (request.height // f, request.width // f)
    spread, cross = prior.capture.spread_map(cond, size), prior.capture.cross_map(cond, size)
    if spread is None or cross is None:
        raise InvalidRequest("model", "the UNet has no attention small enough to read a structure prior from")
    box = box_mask(fg.box, *spread.shape, device=spread.device)
    soft, hard = fusion_masks(spread.to(device), cross.to(device), box.to(device))
    timings["prior"] = time.perf_counter() - t

    t = time.perf_counter()
    fg.fixed_mask = hard
    fg.placement_mask = soft
    attends = torch.zeros(3, 3, dtype=torch.bool)
    attends[2] = True  # only the blended item looks at the others
    result = sample_layers(loaded, pipe, items, inter_layer_strength=request.inter_layer_strength,
                           mask_guidance=request.mask_guidance, estimate_masks=False, attends=attends,
                           composite=KVComposite(target=2, inside=1, outside=0, mask=soft),
                           step_offset=request.steps, **common)
    timings["denoise"] = time.perf_counter() - t
    t = time.perf_counter()
    background, foregrounds, blended = decode_items(loaded, vae, items, result.latents, request.tta_passes,
                                                    progress, cancel)
    timings["decode"] = time.perf_counter() - t
    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds,
                           masks=[mask_to_uint8(soft, request.height, request.width)], blended=blended,
                           timings=timings)
