"""Method `joint`: background, N foregrounds and a blended image denoised together.

Every denoising step is ONE UNet call on the batch `(guidance halves × items)`, items being
[background, foreground 1..N, blended] (CFG: 2·(N+2) rows). The layers interact only
through attention processors (`inference.layered_attention`) and a few latent-space rules:

- per-sample transparency: foreground rows get the LayerDiffuse patch as a low-rank side
  path (scale 1), background and blended rows none (scale 0) — same call;
- inter-layer attention (`request.inter_layer_strength`): self-attention queries also see
  the other items' keys/values, so light, style and layout agree. It runs during the first
  half of the steps (`INTER_LAYER_END`), while layout and light form; afterwards each layer
  refines its own detail with plain self-attention (half the cost, and late-step detail does
  not leak between layers);
- layer-specific prompts: background `combine_prompts(background, prompt)`, foreground
  `combine_prompts(layer, prompt)`; the blended item gets the layer prompts (front to
  back), then the background prompt, then the global prompt — it has to depict all of them,
  and the text order tells CLIP which nouns matter. It starts from the background's noise,
  so it shares the background's layout from the first step;
- layout box (per foreground): attention masking (its cross-attention output is zero
  outside the box) AND latent masking (its clean estimate x̂0 is pulled to the "empty"
  transparent latent outside the box after every step, so the final latent is exactly
  empty there);
- self-mask guidance: each step estimates every foreground's mask
  `m = minmax(content ⊙ alpha) ⊙ box`, content = running mean of the cross-attention mass
  on the layer's own prompt tokens (captured every `CAPTURE_EVERY`-th step from the first
  placement step on), alpha = distance of x̂0 from the empty latent (`inference.masks`). From
  30 % of the steps on, the foreground is confined toward empty by `(1 − g·(1 − m))^(1/K)`
  per step (g = `request.mask_guidance`, K = the number of steps it is applied, so the
  total attenuation over the run is `1 − g·(1 − m)` rather than compounding); from 10 % to
  50 % of the steps the blended item's x̂0 is pulled toward the latent alpha-over of the
  background and the masked foregrounds (DreamLayer's blend), with a weight falling
  linearly from 1 to 0. The final masks are saved in the stack (`mask_NN.png`).
- SD 1.5 (`layer_sd15_joint`): the adapter's processors replace ours; rows are frame
  triples (fg_k, bg, blended), see `sd15_joint_rows`; masks from the alpha proxy and boxes.

Changing x̂0 is done by moving the scheduler's next sample by `c·Δx̂0`, c being the clean
part's coefficient at the next noise level (1 for Euler-type schedulers, √ᾱ for DDIM-type),
so the predicted noise is kept.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..engine import GeneratedLayers
from ..errors import Cancelled, InvalidRequest
from ..layered_attention import (
    AttentionCapture,
    KVComposite,
    LayeredAttentionState,
    layered_attention,
    transparency_factors,
)
from ..masks import box_mask, confine, latent_alpha_over, latent_alpha_proxy, mask_to_uint8, minmax
from ..progress import CancelToken, Progress, ProgressCallback
from ..request import StackRequest
from ..sampling import decode_rgb, initial_noise, job_pipeline, scale_latents, to_uint8, vae_scale_factor
from .independent import combine_prompts, layer_seeds

SELF_MASK_START = 0.3  # fraction of steps before self-masks confine the foregrounds
PLACEMENT_START = 0.1  # the blended item is pulled to the latent blend from 10 % of the steps
PLACEMENT_END = 0.5  # ... to 50 % (the very first estimates are too blurry to place anything)
INTER_LAYER_END = 0.5  # layers see each other during the first half of the steps
CAPTURE_EVERY = 2  # cross-attention maps for the self-masks are captured every other step


@dataclass
class LayerItem:
    """One batch item of a layered run."""

    role: str  # background | foreground | blended
    prompt: str
    noise: torch.Tensor  # [1, C, h, w] initial noise (unit variance)
    box: Optional[Sequence[float]] = None
    content_tokens: list[int] = field(default_factory=list)  # layer-prompt token positions
    pinned: Optional[torch.Tensor] = None  # clean scaled latent of a kept layer (editing)
    fixed_mask: Optional[torch.Tensor] = None  # [h, w] given mask (restyle/editing)
    placement_mask: Optional[torch.Tensor] = None  # [h, w] mask for the blend, if not the fixed one


@dataclass
class LayeredResult:
    latents: torch.Tensor  # [L, C, h, w] final latents (UNet space)
    masks: dict[int, torch.Tensor]  # item index → [h, w] final soft mask (foregrounds)
    capture: Optional[AttentionCapture] = None


# ------------------------------------------------------------------ helpers
_EMPTY_CACHE: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def empty_latent(loaded, vae) -> torch.Tensor:
    """[1, C, 1, 1] UNet latent of a fully transparent pixel (what "nothing here" is).

    Encoded once per VAE from a small fully transparent image (transparent encoder when the
    model has one, else the VAE on zeros = premultiplied transparent), centre cell taken so
    the border padding of the convolutions does not leak in.
    """
    if vae in _EMPTY_CACHE:
        return _EMPTY_CACHE[vae]
    f = vae_scale_factor(vae)
    size = 8 * f
    param = next(vae.parameters())
    if loaded.encoder is not None:
        from ..transparent_vae import encode_transparent

        z = encode_transparent(vae, loaded.encoder, torch.zeros(1, 4, size, size))
    else:
        z = vae.encode(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)).latent_dist.mean
    centre = z[:, :, 3:5, 3:5].float().mean(dim=(2, 3), keepdim=True)
    value = scale_latents(vae, centre)
    _EMPTY_CACHE[vae] = value
    return value


def prompt_token_positions(tokenizer, layer_prompt: str) -> list[int]:
    """Positions of the layer prompt's tokens in `combine_prompts(layer, global)` (after BOS)."""
    ids = tokenizer(layer_prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    n = max(len(ids) - 2, 1)
    return list(range(1, min(n, tokenizer.model_max_length - 2) + 1))


def encode_item_prompts(pipe, prompts: list[str], negative: str, cfg: bool, device):
    """(context [G·L, S, D], added_cond_kwargs or None) for the layered batch."""
    n = len(prompts)
    if hasattr(pipe, "text_encoder_2"):  # SDXL family
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=[negative] * n if negative else None)
        context = torch.cat([neg, pos]) if cfg else pos
        text_embeds = torch.cat([neg_pooled, pooled]) if cfg else pooled
        return context, text_embeds
    pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, [negative] * n if negative else None)
    return (torch.cat([neg, pos]) if cfg else pos), None


def clean_coefficient(scheduler, t_next, like: torch.Tensor) -> torch.Tensor:
    """Coefficient of the clean sample in the scheduler's sample at `t_next` (1 when clean)."""
    if t_next is None:
        return torch.ones((), device=like.device, dtype=like.dtype)
    ones = torch.ones(1, 1, 1, 1, device=like.device, dtype=like.dtype)
    return scheduler.add_noise(ones, torch.zeros_like(ones), t_next.reshape(1)).reshape(())


def predicted_clean(scheduler, step_output, model_input: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x̂0 from the step output, or from ᾱ_t for schedulers that do not report it."""
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is not None:
        return x0
    alpha = scheduler.alphas_cumprod.to(model_input.device)[int(round(float(t)))].to(model_input.dtype)
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return alpha.sqrt() * model_input - (1 - alpha).sqrt() * eps
    return (model_input - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def sd15_joint_rows(items: list[LayerItem], composite=None, capture_self: Sequence[int] = ()) -> list[int]:
    """Item index per batch row for SD 1.5 `layer_sd15_joint` (frames foreground, background,
    blended): one frame triple per foreground, (fg_k, bg, blended), so N = 1 is the native
    layout. For N > 1 the background and blended items appear in N triples; their noise
    predictions are averaged over the copies (`merge_rows`), so each copy has seen a
    different foreground through the cross-frame attention and the blend sees them all.
    """
    roles = [it.role for it in items]
    fgs = [i for i, r in enumerate(roles) if r == "foreground"]
    if roles.count("background") != 1 or roles.count("blended") != 1 or not fgs:
        raise InvalidRequest("layers", "SD 1.5 joint generation needs one background, one blended item and "
                                       "at least one foreground layer")
    # Kept (pinned) layers need nothing special: their latents are reset before every step and
    # their predictions unused, so through the cross-frame attention they only give context.
    if composite is not None or capture_self:
        raise InvalidRequest("method", "with SD 1.5 the harmonized method is not available (it needs "
                                       "SDXL's attention-level blending); use joint")
    bg, blend = roles.index("background"), roles.index("blended")
    return [i for fg in fgs for i in (fg, bg, blend)]


def merge_rows(eps: torch.Tensor, row_items: list[int], n_items: int) -> torch.Tensor:
    """Per-item mean of the rows that carry each item: [R, ...] → [n_items, ...]."""
    index = torch.tensor(row_items, device=eps.device)
    total = torch.zeros((n_items, *eps.shape[1:]), device=eps.device, dtype=torch.float32)
    total.index_add_(0, index, eps.float())
    counts = torch.bincount(index, minlength=n_items).to(total.dtype).view(-1, *([1] * (eps.ndim - 1)))
    return (total / counts).to(eps.dtype)


# ------------------------------------------------------------------ the sampler
def sample_layers(loaded, pipe, items: list[LayerItem], *, width: int, height: int, steps: int,
                  guidance: float, negative_prompt: str, inter_layer_strength: float, mask_guidance: float,
                  progress: ProgressCallback, cancel: CancelToken, layers: int,
                  composite: Optional[KVComposite] = None, capture_self: Sequence[int] = (),
                  self_mask_start: float = SELF_MASK_START, placement_end: float = PLACEMENT_END,
                  estimate_masks: bool = True, attends: Optional[torch.Tensor] = None,
                  inter_layer_end: float = INTER_LAYER_END,
                  accumulate_capture: bool = False, step_offset: int = 0,
                  total_steps: Optional[int] = None) -> LayeredResult:
    """Denoise all `items` together, one UNet call per step; see the module docstring.

    `attends` overrides who sees whom in inter-layer attention ([L, L] bool), which runs
    on the first `inter_layer_end` fraction of the steps; with
    `accumulate_capture` the attention maps are averaged over all steps instead of kept
    per step; `step_offset`/`total_steps` place these steps in a longer job's progress.
    """
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = loaded.device, unet.dtype
    n_items = len(items)
    roles = [it.role for it in items]
    cfg = guidance > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None
    groups = 2 if cfg else 1
    f = vae_scale_factor(vae)
    lh, lw = height // f, width // f
    cond = (groups - 1) * n_items  # first row of the conditional half

    family_sdxl = loaded.family == "sdxl"
    # SDXL: one row per item. SD 1.5 joint weights: rows are (fg_k, bg, blended) frame triples.
    row_items = list(range(n_items)) if family_sdxl else sd15_joint_rows(items, composite, capture_self)
    n_rows = len(row_items)
    with torch.inference_mode():
        context, text_embeds = encode_item_prompts(pipe, [items[r].prompt for r in row_items], negative_prompt,
                                                   cfg, device)
    added = None
    if text_embeds is not None:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=context.dtype)
        added = {"text_embeds": text_embeds.to(device), "time_ids": time_ids.repeat(groups * n_rows, 1)}

    boxes = torch.stack([box_mask(it.box, lh, lw, device=device) for it in items])
    has_box = any(it.box is not None for it in items)
    attends = torch.ones(n_items, n_items, dtype=torch.bool) if attends is None else attends.clone().bool()
    for i, it in enumerate(items):
        if it.pinned is not None:
            attends[i] = False  # kept layers only give context; they look at themselves
    capture = AttentionCapture(
        {cond + i: it.content_tokens for i, it in enumerate(items)
         if it.role == "foreground" and it.content_tokens and it.pinned is None and estimate_masks},
        self_items=[cond + i for i in capture_self])
    patch_scale = [1.0 if r == "foreground" else 0.0 for r in roles]
    if family_sdxl:
        state = LayeredAttentionState(roles, groups, (lh, lw), inter_layer_strength=inter_layer_strength,
                                      transparency_scale=patch_scale, attends=attends,
                                      regions=boxes if has_box else None, composite=composite,
                                      capture=capture if (capture.cross_tokens or capture.self_items) else None)
        processors = layered_attention(unet, state, transparency_factors(loaded.unet_patch),
                                       loaded.unet_patch.bias_deltas())
    else:
        # The adapter's per-frame LoRA is the transparency, its cross-frame attention the
        # inter-layer attention; masks come from the latent alpha proxy and boxes only.
        state = LayeredAttentionState(roles, groups, (lh, lw))
        processors = loaded.attention_sharing("joint").installed(unet)
    empty = empty_latent(loaded, vae).to(device=device, dtype=torch.float32)

    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    noise = torch.cat([it.noise for it in items]).to(device=device, dtype=dtype)
    latents = noise * scheduler.init_noise_sigma
    pinned = [(i, it.pinned.to(device=device, dtype=dtype)) for i, it in enumerate(items) if it.pinned is not None]
    fg_items = [i for i, it in enumerate(items) if it.role == "foreground" and it.pinned is None]
    all_fg = [i for i, it in enumerate(items) if it.role == "foreground"]  # back to front
    clean_pinned = {i: clean.float() for i, clean in pinned}  # kept layers are placed as they are
    bg_item = next((i for i, r in enumerate(roles) if r == "background"), None)
    blend_item = next((i for i, r in enumerate(roles) if r == "blended"), None)
    masks: dict[int, torch.Tensor] = {i: it.fixed_mask.to(device).float() * boxes[i]
                                      for i, it in enumerate(items) if it.fixed_mask is not None}
    for i, it in enumerate(items):
        if it.role == "foreground" and i not in masks:
            masks[i] = boxes[i].clone()
    content_ema: dict[int, torch.Tensor] = {}
    start_self = max(1, math.ceil(self_mask_start * steps)) if steps > 1 else steps
    end_place = max(1, math.ceil(placement_end * steps))
    start_place = min(int(PLACEMENT_START * steps), end_place - 1)
    end_inter = math.ceil(inter_layer_end * steps)

    total = total_steps or steps
    if step_offset == 0:
        progress(Progress(phase="denoise", step=0, total=total, layer=None, layers=layers))
    with processors, torch.inference_mode():
        for i, t in enumerate(timesteps):
            if cancel.cancelled:
                raise Cancelled(cancel.reason)
            for item, clean in pinned:
                latents[item:item + 1] = scheduler.add_noise(clean, noise[item:item + 1], t.reshape(1))
            if family_sdxl:
                state.set_inter_layer_strength(inter_layer_strength if i < end_inter else 0.0)
            if state.capture is not None and not accumulate_capture:
                capture.reset()
                # Masks are first used for placement at `start_place`: capture from there on,
                # every CAPTURE_EVERY-th step (the content estimate is a running mean anyway).
                capture.enabled = i >= start_place and (i - start_place) % CAPTURE_EVERY == 0
            rows = latents if family_sdxl else latents[row_items]
            model_input = torch.cat([rows] * groups) if groups > 1 else rows
            model_input = scheduler.scale_model_input(model_input, t)
            eps = unet(model_input, t, encoder_hidden_states=context, added_cond_kwargs=added,
                       return_dict=False)[0]
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            if not family_sdxl:
                eps = merge_rows(eps, row_items, n_items)
            step_input = scheduler.scale_model_input(latents, t)
            out = scheduler.step(eps, t, latents, return_dict=True)
            latents_next = out.prev_sample
            x0 = predicted_clean(scheduler, out, step_input, eps, t).float()
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            target = x0.clone()

            # Self-mask estimate per foreground.
            if estimate_masks:
                alpha = latent_alpha_proxy(x0, empty)
                for item in fg_items:
                    if items[item].fixed_mask is not None:
                        continue
                    content = capture.cross_map(cond + item, (lh, lw)) if state.capture is not None else None
                    if content is not None:
                        content = minmax(content.to(device))
                        content_ema[item] = content if item not in content_ema else 0.5 * (content_ema[item] + content)
                    if item in content_ema:
                        estimate = minmax(content_ema[item] * alpha[item])
                    else:
                        estimate = alpha[item]
                    masks[item] = estimate * boxes[item]
            # Confine foregrounds: the box always, the self-mask from `start_self` on.
            for item in fg_items:
                keep = boxes[item]
                fixed = items[item].fixed_mask is not None
                if i >= start_self or fixed:
                    # Applied every step, so take the per-step root: over the run a cell is
                    # attenuated by 1 − g·(1 − m) in total, not by that factor per step.
                    applied_steps = steps if fixed else max(steps - start_self, 1)
                    keep = keep * (1.0 - mask_guidance * (1.0 - masks[item])).clamp(min=0) ** (1.0 / applied_steps)
                target[item:item + 1] = confine(target[item:item + 1], keep, empty)
            # Place the foregrounds in the blended branch (early steps).
            if blend_item is not None and bg_item is not None and all_fg and start_place <= i < end_place:
                weight = 1.0 - (i - start_place) / (end_place - start_place)
                source = lambda k: clean_pinned[k] if k in clean_pinned else target[k:k + 1]  # noqa: E731
                place = [items[k].placement_mask.to(device) if items[k].placement_mask is not None else masks[k]
                         for k in all_fg]
                blend = latent_alpha_over(source(bg_item), [source(k) for k in all_fg], place)
                target[blend_item:blend_item + 1] = (1 - weight) * target[blend_item:blend_item + 1] + weight * blend
            delta = target - x0
            if delta.abs().max() > 0:
                coeff = clean_coefficient(scheduler, t_next, latents_next).float()
                latents_next = (latents_next.float() + coeff * delta).to(latents_next.dtype)
            latents = latents_next
            progress(Progress(phase="denoise", step=step_offset + i + 1, total=total, layer=None, layers=layers))
    if cancel.cancelled:
        raise Cancelled(cancel.reason)
    return LayeredResult(latents=latents, masks=masks, capture=capture)


# ------------------------------------------------------------------ the method
def blended_prompt(request: StackRequest) -> str:
    """Layer prompts front to back, then the background prompt, then the global prompt."""
    parts = [layer.prompt for layer in reversed(request.layers)] + [request.background, request.prompt]
    return ", ".join(p.strip() for p in parts if p and p.strip())


def joint_items(pipe, request: StackRequest, seeds: list[int], vae, unet, device, dtype) -> list[LayerItem]:
    """[background, foregrounds..., blended] items for `request` with per-layer seeds."""
    noise = lambda seed: initial_noise(seed, vae, unet, request.width, request.height, device, dtype)  # noqa: E731
    bg_noise = noise(seeds[0])
    items = [LayerItem("background", combine_prompts(request.background, request.prompt), bg_noise)]
    for i, layer in enumerate(request.layers, start=1):
        items.append(LayerItem("foreground", combine_prompts(layer.prompt, request.prompt), noise(seeds[i]),
                               box=layer.box, content_tokens=prompt_token_positions(pipe.tokenizer, layer.prompt)))
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
    device, dtype = loaded.device, unet.dtype
    seeds = layer_seeds(request)
    items = joint_items(pipe, request, seeds, vae, unet, device, dtype)
    timings = {}
    t = time.perf_counter()
    result = sample_layers(loaded, pipe, items, width=request.width, height=request.height, steps=request.steps,
                           guidance=request.guidance, negative_prompt=request.negative_prompt,
                           inter_layer_strength=request.inter_layer_strength,
                           mask_guidance=request.mask_guidance, progress=progress, cancel=cancel,
                           layers=1 + len(request.layers))
    timings["denoise"] = time.perf_counter() - t
    t = time.perf_counter()
    background, foregrounds, blended = decode_items(loaded, vae, items, result.latents, request.tta_passes,
                                                    progress, cancel)
    masks = [mask_to_uint8(result.masks[i], request.height, request.width)
             for i, it in enumerate(items) if it.role == "foreground"]
    timings["decode"] = time.perf_counter() - t
    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds,
                           masks=masks or None, blended=blended, timings=timings)
