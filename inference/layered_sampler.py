"""The layered run: background, foregrounds and a blended item denoised together.

Every step is ONE UNet call on the batch (guidance halves × rows). The layers interact only
through attention processors (installed by the model family's adapter, `inference.families`)
and a few latent-space rules applied to each step's clean estimate x̂0: layout boxes and
self-masks confine the foregrounds toward the "empty" (transparent) latent, and early on
the blended item is pulled toward the latent alpha-over of the others. The design and its
sources are in docs/methods.md; `joint`, `harmonized` and editing configure this one sampler.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .clean_estimate import predicted_clean
from .errors import Cancelled
from .families import AttentionSetup, layered_family
from .layered_attention import AttentionCapture, KVComposite
from .masks import box_mask, confine, latent_alpha_over, latent_alpha_proxy, minmax
from .previews import offer_preview
from .progress import CancelToken, Progress, ProgressCallback
from .request import StackRequest
from .sampling import scale_latents, vae_scale_factor

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


@dataclass(frozen=True)
class LayeredSettings:
    """The request's sampling settings for one run."""

    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str = ""
    inter_layer_strength: float = 0.3
    mask_guidance: float = 0.5

    @classmethod
    def from_request(cls, request: StackRequest, **changes) -> "LayeredSettings":
        return replace(cls(width=request.width, height=request.height, steps=request.steps,
                           guidance=request.guidance, negative_prompt=request.negative_prompt,
                           inter_layer_strength=request.inter_layer_strength,
                           mask_guidance=request.mask_guidance), **changes)


@dataclass(frozen=True)
class HeldRegion:
    """Known pixels held in the latent (outpainting): inside `mask` every item's latent is
    replaced at each step by its known clean latent noised to that step's level (with the
    item's own initial noise), and by the clean latent itself at the end; outside it the
    run generates freely, so new content grows out of the known one."""

    latents: torch.Tensor  # [L, C, h, w] clean scaled latents, one per item (any value outside mask)
    mask: torch.Tensor  # [h, w] 1 = known (held), 0 = generated; the same for every item


@dataclass(frozen=True)
class LayeredOptions:
    """What `harmonized` and editing change in a run; the defaults are plain `joint`.

    `attends` overrides who sees whom in inter-layer attention ([L, L] bool), which runs on
    the first `inter_layer_end` fraction of the steps; `accumulate_capture` averages the
    attention maps over all steps instead of keeping the current one; `step_offset` and
    `total_steps` place these steps in a longer job's progress.
    """

    composite: Optional[KVComposite] = None
    capture_self: Sequence[int] = ()
    self_mask_start: float = SELF_MASK_START
    placement_end: float = PLACEMENT_END
    estimate_masks: bool = True
    attends: Optional[torch.Tensor] = None
    inter_layer_end: float = INTER_LAYER_END
    accumulate_capture: bool = False
    step_offset: int = 0
    total_steps: Optional[int] = None
    held: Optional[HeldRegion] = None  # outpainting: known latents held at every step


# ------------------------------------------------------------------ latent-space helpers
_EMPTY_CACHE: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def empty_latent(loaded, vae) -> torch.Tensor:
    """[1, C, 1, 1] UNet latent of a fully transparent pixel (what "nothing here" is).

    Encoded once per VAE from a small fully transparent image (transparent encoder, at its
    file's offset scale, when the model has one; else the VAE on zeros = premultiplied
    transparent), centre cell taken so the border padding of the convolutions does not leak in.
    """
    if vae in _EMPTY_CACHE:
        return _EMPTY_CACHE[vae]
    f = vae_scale_factor(vae)
    size = 8 * f
    param = next(vae.parameters())
    if loaded.encoder is not None:
        from .models import codecs_on_device
        from .transparent_vae import encode_transparent

        with codecs_on_device(loaded):
            z = encode_transparent(vae, loaded.encoder, torch.zeros(1, 4, size, size))
    else:
        z = vae.encode(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)).latent_dist.mean
    centre = z[:, :, 3:5, 3:5].float().mean(dim=(2, 3), keepdim=True)
    value = scale_latents(vae, centre)
    _EMPTY_CACHE[vae] = value
    return value


def clean_coefficient(scheduler, t_next, like: torch.Tensor) -> torch.Tensor:
    """Coefficient of the clean sample in the scheduler's sample at `t_next` (1 when clean)."""
    if t_next is None:
        return torch.ones((), device=like.device, dtype=like.dtype)
    ones = torch.ones(1, 1, 1, 1, device=like.device, dtype=like.dtype)
    return scheduler.add_noise(ones, torch.zeros_like(ones), t_next.reshape(1)).reshape(())


def pack_chunks(units: Sequence[Sequence[int]], max_rows: int) -> list[list[int]]:
    """Units of rows (each must stay in one call) packed in order into chunks of at most
    `max_rows` rows; a unit larger than that is a chunk of its own."""
    chunks: list[list[int]] = []
    for unit in units:
        if chunks and len(chunks[-1]) + len(unit) <= max_rows:
            chunks[-1].extend(unit)
        else:
            chunks.append(list(unit))
    return chunks


# ------------------------------------------------------------------ the sampler
class LayeredSampler:
    """One layered run over `items` (see the module docstring); call it once."""

    def __init__(self, loaded, pipe, items: list[LayerItem], settings: LayeredSettings,
                 options: LayeredOptions = LayeredOptions()):
        self.loaded, self.pipe, self.items = loaded, pipe, items
        self.settings, self.options = settings, options
        self.family = layered_family(loaded.family)
        self.unet, self.vae, self.scheduler = pipe.unet, pipe.vae, pipe.scheduler
        self.device = loaded.device
        self.roles = [it.role for it in items]
        unet = self.unet
        self.cfg = settings.guidance > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None
        self.groups = 2 if self.cfg else 1
        f = vae_scale_factor(self.vae)
        self.latent_size = (settings.height // f, settings.width // f)
        self.cond = (self.groups - 1) * len(items)  # first row of the conditional half
        roles = self.roles
        self.background = roles.index("background") if "background" in roles else None
        self.blended = roles.index("blended") if "blended" in roles else None
        self.foregrounds = [i for i, r in enumerate(roles) if r == "foreground"]  # back to front
        # The foregrounds this run generates (kept layers of an edit are only placed).
        self.generated = [i for i in self.foregrounds if items[i].pinned is None]

    def __call__(self, *, progress: ProgressCallback, cancel: CancelToken, layers: int) -> LayeredResult:
        st, opt, items = self.settings, self.options, self.items
        scheduler = self.scheduler

        # 1. Batch rows and their text conditioning.
        self.layout = self.family.row_layout(items, composite=opt.composite, capture_self=opt.capture_self)
        with torch.inference_mode():
            self.context, self.added = self.family.encode_prompts(
                self.pipe, [items[r].prompt for r in self.layout.items], st.negative_prompt, self.cfg,
                self.device, st.height, st.width)

        # 2. Layout boxes, attention capture for the self-masks, and the family's processors.
        self.boxes = torch.stack([box_mask(it.box, *self.latent_size, device=self.device) for it in items])
        self.capture = self._attention_capture()
        self.state, processors = self.family.attention(self.loaded, self.unet, self._attention_setup())
        self.empty = empty_latent(self.loaded, self.vae).to(device=self.device, dtype=torch.float32)

        # 3. Timesteps and initial latents; kept (pinned) layers and their clean latents.
        scheduler.set_timesteps(st.steps, device=self.device)
        timesteps = scheduler.timesteps
        dtype = self.unet.dtype
        self.noise = torch.cat([it.noise for it in items]).to(device=self.device, dtype=dtype)
        latents = self.noise * scheduler.init_noise_sigma
        self.pinned = {i: it.pinned.to(device=self.device, dtype=dtype) for i, it in enumerate(items)
                       if it.pinned is not None}

        # 4. Masks (given ones, else the boxes) and the step schedule.
        self.masks = {i: it.fixed_mask.to(self.device).float() * self.boxes[i]
                      for i, it in enumerate(items) if it.fixed_mask is not None}
        for i, it in enumerate(items):
            if it.role == "foreground" and i not in self.masks:
                self.masks[i] = self.boxes[i].clone()
        self.content_ema: dict[int, torch.Tensor] = {}
        steps = st.steps
        self.start_self = max(1, math.ceil(opt.self_mask_start * steps)) if steps > 1 else steps
        self.end_place = max(1, math.ceil(opt.placement_end * steps))
        self.start_place = min(int(PLACEMENT_START * steps), self.end_place - 1)
        self.end_inter = math.ceil(opt.inter_layer_end * steps)

        # 5. Denoising: one batched UNet call per step, then the latent-space rules on x̂0.
        total = opt.total_steps or steps
        if opt.step_offset == 0:
            progress(Progress(phase="denoise", step=0, total=total, layer=None, layers=layers))
        with processors, self._lean_activations(), torch.inference_mode():
            for i, t in enumerate(timesteps):
                if cancel.cancelled:
                    raise Cancelled(cancel.reason)
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
                latents = self._pin_kept_layers(latents, t)
                latents = self._hold_known_region(latents, t)
                self._schedule_attention(i)
                eps = self._predict_noise(latents, t)
                step_input = scheduler.scale_model_input(latents, t)
                out = scheduler.step(eps, t, latents, return_dict=True)
                x0 = predicted_clean(scheduler, out, step_input, eps, t).float()
                target = x0.clone()
                if opt.estimate_masks:
                    self._estimate_masks(x0)
                self._confine_foregrounds(i, target)
                self._place_in_blend(i, target)
                latents = self._move_to_target(out.prev_sample, target - x0, t_next)
                offer_preview(opt.step_offset + i + 1, total, x0, self.roles, self.empty)  # 5b. live preview
                progress(Progress(phase="denoise", step=opt.step_offset + i + 1, total=total, layer=None,
                                  layers=layers))
        if cancel.cancelled:
            raise Cancelled(cancel.reason)
        latents = self._hold_known_region(latents, None)
        return LayeredResult(latents=latents, masks=self.masks, capture=self.capture)

    # -- set-up ----------------------------------------------------------------------------
    def _attention_capture(self) -> AttentionCapture:
        """Cross-attention maps of the foregrounds whose masks are estimated (and self-attention
        spread of `capture_self` items, for harmonized's structure prior)."""
        cond, opt = self.cond, self.options
        return AttentionCapture(
            {cond + i: it.content_tokens for i, it in enumerate(self.items)
             if it.role == "foreground" and it.content_tokens and it.pinned is None and opt.estimate_masks},
            self_items=[cond + i for i in opt.capture_self])

    def _attention_setup(self) -> AttentionSetup:
        n = len(self.items)
        attends = torch.ones(n, n, dtype=torch.bool) if self.options.attends is None \
            else self.options.attends.clone().bool()
        for i, it in enumerate(self.items):
            if it.pinned is not None:
                attends[i] = False  # kept layers only give context; they look at themselves
        capture = self.capture
        return AttentionSetup(
            roles=self.roles, groups=self.groups, latent_size=self.latent_size,
            inter_layer_strength=self.settings.inter_layer_strength,
            transparency_scale=[1.0 if r == "foreground" else 0.0 for r in self.roles], attends=attends,
            regions=self.boxes if any(it.box is not None for it in self.items) else None,
            composite=self.options.composite,
            capture=capture if (capture.cross_tokens or capture.self_items) else None)

    # -- one step ----------------------------------------------------------------------------
    def _pin_kept_layers(self, latents: torch.Tensor, t) -> torch.Tensor:
        """Kept layers re-enter every step at this noise level (they give context only)."""
        for item, clean in self.pinned.items():
            latents[item:item + 1] = self.scheduler.add_noise(clean, self.noise[item:item + 1], t.reshape(1))
        return latents

    def _hold_known_region(self, latents: torch.Tensor, t) -> torch.Tensor:
        """Outpainting: the known region re-enters at this step's noise level (t None: clean)."""
        held = self.options.held
        if held is None:
            return latents
        clean = held.latents.to(device=self.device, dtype=latents.dtype)
        known = clean if t is None else self.scheduler.add_noise(clean, self.noise, t.reshape(1))
        mask = held.mask.to(device=self.device, dtype=latents.dtype)
        return latents * (1 - mask) + known * mask

    def _schedule_attention(self, i: int) -> None:
        self.family.at_step(self.state, i, self.settings.inter_layer_strength, self.end_inter)
        if self.state.capture is not None and not self.options.accumulate_capture:
            self.capture.reset()
            # Masks are first used for placement at `start_place`: capture from there on,
            # every CAPTURE_EVERY-th step (the content estimate is a running mean anyway).
            self.capture.enabled = i >= self.start_place and (i - self.start_place) % CAPTURE_EVERY == 0

    def _predict_noise(self, latents: torch.Tensor, t) -> torch.Tensor:
        """The guided noise prediction per item, from one UNet call on all rows."""
        rows = self.layout.gather(latents)
        model_input = torch.cat([rows] * self.groups) if self.groups > 1 else rows
        model_input = self.scheduler.scale_model_input(model_input, t)
        eps = self._denoise_chunked(model_input, t)
        if self.cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + self.settings.guidance * (text - uncond)
        return self.layout.merge(eps)

    def _denoise_chunked(self, model_input: torch.Tensor, t) -> torch.Tensor:
        """The UNet's prediction for every row, in as many calls as memory wants.

        The family says which rows must share a call this step (a guidance half while its
        items see each other); those units are packed into chunks of at most `max_rows`
        rows, the attention state is told each chunk's rows, and the predictions are put
        back in row order: the same result as one call (docs/methods.md, "Chunked UNet").
        """
        rows = model_input.shape[0]
        max_rows = self._max_rows(rows)
        chunks = [] if max_rows >= rows else pack_chunks(
            self.family.chunk_units(self.state, rows // self.groups, self.groups), max_rows)
        if len(chunks) <= 1:
            return self.unet(model_input, t, encoder_hidden_states=self.context, added_cond_kwargs=self.added,
                             return_dict=False)[0]
        # The state describes one row per item; SD 1.5's frame triples have their own processors.
        select = self.state.select_rows if self.layout.rows is None else (lambda rows=None: None)
        eps = None
        try:
            for chunk in chunks:
                select(chunk)
                index = torch.tensor(chunk, device=model_input.device)
                part = self.unet(model_input[index], t, encoder_hidden_states=self.context[index],
                                 added_cond_kwargs=None if self.added is None else
                                 {k: v[index] for k, v in self.added.items()}, return_dict=False)[0]
                eps = part.new_empty((rows, *part.shape[1:])) if eps is None else eps
                eps[index] = part
        finally:
            select(None)
        return eps

    def _max_rows(self, rows: int) -> int:
        """Rows per UNet call: the engine's `max_batch` if set, else what the memory model
        says fits the device's free memory (decided once per run, with `_lean`)."""
        if getattr(self, "_rows_per_call", None) is None:
            from .memory_model import unet_call_plan

            self._rows_per_call, self._lean = unet_call_plan(
                self.unet, self.latent_size, self.device, rows, context_tokens=self.context.shape[1],
                offloaded=getattr(self.loaded, "offloaded", False),
                max_batch=getattr(self.loaded, "max_batch", None),
                lean=getattr(self.loaded, "lean_activations", "auto"))
        return self._rows_per_call

    def _lean_activations(self):
        """The UNet under lean activations for the denoising loop when the plan says so
        (`inference.lean_unet`: exact, no FLOPs; docs/methods.md, "Chunked UNet")."""
        import contextlib

        from .lean_unet import lean_activations

        self._max_rows(self.groups * len(self.layout.items))
        return lean_activations(self.unet) if self._lean else contextlib.nullcontext()

    def _estimate_masks(self, x0: torch.Tensor) -> None:
        """Self-mask per generated foreground: content (own-token cross attention, running
        mean) × alpha (distance of x̂0 from the empty latent), inside its box."""
        alpha = latent_alpha_proxy(x0, self.empty)
        for item in self.generated:
            if self.items[item].fixed_mask is not None:
                continue
            content = self.capture.cross_map(self.cond + item, self.latent_size) \
                if self.state.capture is not None else None
            if content is not None:
                content = minmax(content.to(self.device))
                ema = self.content_ema
                ema[item] = content if item not in ema else 0.5 * (ema[item] + content)
            estimate = minmax(self.content_ema[item] * alpha[item]) if item in self.content_ema else alpha[item]
            self.masks[item] = estimate * self.boxes[item]

    def _confine_foregrounds(self, i: int, target: torch.Tensor) -> None:
        """The box always, the self-mask from `start_self` on (given masks from the start)."""
        steps, guidance = self.settings.steps, self.settings.mask_guidance
        for item in self.generated:
            keep = self.boxes[item]
            fixed = self.items[item].fixed_mask is not None
            if i >= self.start_self or fixed:
                # Applied every step, so take the per-step root: over the run a cell is
                # attenuated by 1 − g·(1 − m) in total, not by that factor per step.
                applied_steps = steps if fixed else max(steps - self.start_self, 1)
                keep = keep * (1.0 - guidance * (1.0 - self.masks[item])).clamp(min=0) ** (1.0 / applied_steps)
            target[item:item + 1] = confine(target[item:item + 1], keep, self.empty)

    def _place_in_blend(self, i: int, target: torch.Tensor) -> None:
        """Early steps: pull the blended item's x̂0 toward the latent alpha-over of the
        background and the masked foregrounds (weight 1 → 0 from start to end of placement)."""
        bg, blend, foregrounds = self.background, self.blended, self.foregrounds
        if blend is None or bg is None or not foregrounds or not self.start_place <= i < self.end_place:
            return
        weight = 1.0 - (i - self.start_place) / (self.end_place - self.start_place)

        def source(k: int) -> torch.Tensor:  # kept layers are placed as they are
            return self.pinned[k].float() if k in self.pinned else target[k:k + 1]

        place = [self.items[k].placement_mask.to(self.device) if self.items[k].placement_mask is not None
                 else self.masks[k] for k in foregrounds]
        composite = latent_alpha_over(source(bg), [source(k) for k in foregrounds], place)
        target[blend:blend + 1] = (1 - weight) * target[blend:blend + 1] + weight * composite

    def _move_to_target(self, latents_next: torch.Tensor, delta: torch.Tensor, t_next) -> torch.Tensor:
        """Move the scheduler's next sample by c·Δx̂0 (c: the clean part's coefficient at the
        next noise level), so the changed clean estimate is reached and the noise kept."""
        if delta.abs().max() > 0:
            coeff = clean_coefficient(self.scheduler, t_next, latents_next).float()
            latents_next = (latents_next.float() + coeff * delta).to(latents_next.dtype)
        return latents_next
