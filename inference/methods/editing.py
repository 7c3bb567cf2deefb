"""Editing an existing layer stack: regenerate one layer, or restyle all of them.

Regenerate (LayerDiff-style layer-specific editing): the chosen layer gets a new prompt
and/or seed and is denoised again by the layered sampler next to the *kept* layers, which
are encoded back to latents (background with the VAE, foregrounds with the transparent
encoder) and pinned: re-noised to every step's level, they give the keys/values the new
layer attends to while attending only to themselves. The blended image is regenerated too.
Restyle: every layer again with a style added to the global prompt, same seeds and boxes,
each foreground's stored mask (else its alpha) as a fixed guidance mask.
Extend (outpainting for a new camera move): every layer's canvas grows around the same
frame in one joint run; the known pixels are encoded and held in the latent at every step
(`LayeredOptions.held`), only the new margins are generated, and afterwards the old pixels
are pasted back (byte-identical away from a feathered seam of SEAM_PIXELS).

These functions only make pixels: the engine (`Engine.regenerate`/`restyle`/`extend`) loads
the model, times, and writes the new stack through its one writing path; kept files end up
byte-identical copies of the originals.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import InvalidRequest
from ..layered_sampler import HeldRegion, LayeredOptions, LayeredSampler, LayeredSettings
from ..masks import mask_to_uint8, resize_map
from ..progress import CancelToken, ProgressCallback
from ..prompts import combine_prompts, layer_seeds
from ..request import (LayerSpec, StackRequest, extension_plan, validate_layer_edit, validate_layer_index,
                       validate_prompt)
from ..sampling import job_pipeline, scale_latents, vae_scale_factor
from . import GeneratedLayers
from .joint import decode_items, joint_items


@dataclass
class SourceStack:
    """A stack to edit: its manifest, layer images and stored masks (one per foreground)."""

    folder: Path
    stack: object  # LayerStack
    images: list[np.ndarray]
    masks: list[Optional[np.ndarray]]

    @classmethod
    def load(cls, folder) -> "SourceStack":
        from ..stack import load_layer_images, load_png, load_stack

        folder = Path(folder)
        stack = load_stack(folder)
        masks = [None if layer.mask is None else load_png(folder / layer.mask, "L", stack.width, stack.height,
                                                           f"layers[{i}].mask")
                 for i, layer in enumerate(stack.layers)][1:]
        return cls(folder, stack, load_layer_images(stack, folder), masks)

    @property
    def foregrounds(self) -> int:
        return len(self.stack.layers) - 1

    def model_spec(self) -> str:
        """The model to reload: the stack's preset, or its base path when that exists."""
        base = str(self.stack.model.get("base", ""))
        if base and Path(base).exists():
            return base
        preset = str(self.stack.model.get("preset", ""))
        if base == "tiny" or preset == "tiny":
            return "tiny"
        if preset:
            return preset
        raise InvalidRequest("model", "the stack does not record its model; pass model=...")

    def request(self, **changes) -> StackRequest:
        """The request that made the stack (joint, its seeds, boxes, frame, depths and name), with
        `changes`: an edit is a new version of the same stack, so it keeps its name and depths."""
        stack = self.stack
        layers = tuple(LayerSpec(prompt=layer.prompt, seed=layer.seed, box=layer.box, name=layer.name,
                                 depth=layer.depth)
                       for layer in stack.layers[1:])
        base = dict(prompt=stack.prompt, background=stack.layers[0].prompt, layers=layers,
                    negative_prompt=stack.negative_prompt, width=stack.width, height=stack.height,
                    steps=stack.steps, guidance=stack.guidance, seed=stack.seed, method="joint",
                    background_seed=stack.layers[0].seed, background_depth=stack.layers[0].depth,
                    name=stack.name, frame=stack.frame)
        base.update(changes)
        return StackRequest(**base)


# ------------------------------------------------------------------ requests
def regenerate_request(source: SourceStack, layer_index: int, new_prompt: Optional[str], new_seed: Optional[int],
                       **settings) -> StackRequest:
    """The validated request for regenerating layer `layer_index` (0 = background)."""
    validate_layer_index("layer_index", layer_index, source.foregrounds)
    validate_layer_edit(new_prompt, new_seed, prompt_required=layer_index > 0)
    request = source.request(**settings)
    if layer_index == 0:
        request = replace(request, background=request.background if new_prompt is None else new_prompt,
                          background_seed=request.background_seed if new_seed is None else new_seed)
    else:
        old = request.layers[layer_index - 1]
        edited = replace(old, prompt=old.prompt if new_prompt is None else new_prompt,
                         seed=old.seed if new_seed is None else new_seed)
        request = replace(request, layers=request.layers[:layer_index - 1] + (edited,)
                          + request.layers[layer_index:])
    return request.validated()


def restyle_request(source: SourceStack, style: str, **settings) -> StackRequest:
    """The validated request for restyling every layer with `style`."""
    validate_prompt("style", style, required=True)
    return source.request(prompt=combine_prompts(source.stack.prompt, style), **settings).validated()


# ------------------------------------------------------------------ pixels
def regenerate_layers(loaded, source: SourceStack, request: StackRequest, layer_index: int, *,
                      progress: ProgressCallback, cancel: CancelToken) -> GeneratedLayers:
    """Layer `layer_index` (and the blended image) generated again; the others are the
    source's own pixels and masks."""
    pipe, seeds = job_pipeline(loaded.pipeline), layer_seeds(request)
    vae, unet = pipe.vae, pipe.unet
    items = joint_items(pipe, request, seeds, vae, unet, loaded.device, unet.dtype)
    lh, lw = request.height // vae_scale_factor(vae), request.width // vae_scale_factor(vae)
    for i, item in enumerate(items[:-1]):  # all but blended
        if i == layer_index:
            continue
        item.pinned = _encode_layer(loaded, vae, source.images[i]).to(unet.dtype)
        if item.role == "foreground":
            item.fixed_mask = _latent_mask(_guidance_mask(source, i), lh, lw, loaded.device)
    cancel.raise_if_cancelled()
    skip = [i for i in range(len(items) - 1) if i != layer_index]
    result, (background, foregrounds, blended), timings = _sample_and_decode(
        loaded, pipe, items, request, progress, cancel, skip=skip)
    n_fg = source.foregrounds
    masks = list(source.masks)
    if layer_index > 0:
        masks[layer_index - 1] = mask_to_uint8(result.masks[layer_index], request.height, request.width)
    return GeneratedLayers(
        background=source.images[0] if layer_index != 0 else background,
        foregrounds=[source.images[i] if i != layer_index else foregrounds[i - 1] for i in range(1, n_fg + 1)],
        seeds=seeds, masks=masks if any(m is not None for m in masks) else None, blended=blended,
        timings=timings)


def restyle_layers(loaded, source: SourceStack, request: StackRequest, *, progress: ProgressCallback,
                   cancel: CancelToken) -> GeneratedLayers:
    """Every layer again under the restyled prompt, each foreground guided by its stored mask."""
    pipe, seeds = job_pipeline(loaded.pipeline), layer_seeds(request)
    vae = pipe.vae
    items = joint_items(pipe, request, seeds, vae, pipe.unet, loaded.device, pipe.unet.dtype)
    lh, lw = request.height // vae_scale_factor(vae), request.width // vae_scale_factor(vae)
    masks = []
    for i in range(1, source.foregrounds + 1):
        mask = _guidance_mask(source, i)
        items[i].fixed_mask = _latent_mask(mask, lh, lw, loaded.device)
        masks.append(mask)
    _result, (background, foregrounds, blended), timings = _sample_and_decode(
        loaded, pipe, items, request, progress, cancel)
    return GeneratedLayers(background=background, foregrounds=foregrounds, seeds=seeds, masks=masks or None,
                           blended=blended, timings=timings)


def extend_request(source: SourceStack, margins, **settings) -> tuple[StackRequest, tuple[int, int]]:
    """The validated request for extending the stack so `margins` fit around its frame, and
    where the old canvas lands in the new one (x, y pixels). Refuses bad margins by side,
    a canvas past the cap, and margins the canvas already has."""
    stack = source.stack
    plan, offset = extension_plan("margins", stack.width, stack.height, stack.frame, margins)
    request = source.request(width=plan.width, height=plan.height, frame=plan.frame, **settings)
    return request.validated(), offset


def extend_layers(loaded, source: SourceStack, request: StackRequest, offset: tuple[int, int], *,
                  progress: ProgressCallback, cancel: CancelToken) -> GeneratedLayers:
    """Every layer on the larger canvas in one joint run, the old canvas held in the latent;
    then the old pixels (and stored masks) pasted back inside it with a feathered seam."""
    pipe, seeds = job_pipeline(loaded.pipeline), layer_seeds(request)
    vae, unet = pipe.vae, pipe.unet
    f = vae_scale_factor(vae)
    ox, oy = offset
    if ox % f or oy % f:
        raise InvalidRequest("margins", f"the old canvas would start at ({ox}, {oy}) pixels, not on the "
                                        f"VAE's {f}-pixel latent cells")
    items = joint_items(pipe, request, seeds, vae, unet, loaded.device, unet.dtype)
    blend_source = _blend_source(source)
    held = _held_region(loaded, vae, [*source.images, blend_source], request, offset, f)
    cancel.raise_if_cancelled()
    result, (background, foregrounds, blended), timings = _sample_and_decode(
        loaded, pipe, items, request, progress, cancel, options=LayeredOptions(held=held))
    masks = []
    for i, item in enumerate(items):
        if item.role == "foreground":
            mask = mask_to_uint8(result.masks[i], request.height, request.width)
            stored = source.masks[i - 1]
            masks.append(mask if stored is None else paste_known(mask, stored, offset))
    return GeneratedLayers(
        background=paste_known(background, source.images[0], offset),
        foregrounds=[paste_known(fg, old, offset) for fg, old in zip(foregrounds, source.images[1:])],
        seeds=seeds, masks=masks or None, timings=timings,
        blended=paste_known(blended, blend_source, offset) if source.stack.blended else None)


SEAM_PIXELS = 4  # the feathered border inside the old canvas where new and old pixels mix


def paste_known(new: np.ndarray, old: np.ndarray, offset: tuple[int, int], seam: int = SEAM_PIXELS) -> np.ndarray:
    """`new` with `old` pasted at `offset` (x, y): exactly the old pixels from `seam` pixels
    inside every border of the old canvas that faces generated pixels, a linear ramp toward
    the new ones across those `seam` pixels (RGBA mixes premultiplied, so a clear pixel's
    colour does not bleed in)."""
    ox, oy = offset
    h, w = old.shape[:2]
    out = new.copy()
    region = new[oy:oy + h, ox:ox + w]
    weight = np.minimum(_seam_ramp(w, ox > 0, ox + w < new.shape[1], seam)[None, :],
                        _seam_ramp(h, oy > 0, oy + h < new.shape[0], seam)[:, None])
    if old.ndim == 2 or old.shape[2] != 4:
        wgt = weight if old.ndim == 2 else weight[..., None]
        mixed = old * wgt + region * (1 - wgt)
    else:
        a_old, a_new = old[..., 3:] / 255.0, region[..., 3:] / 255.0
        wgt = weight[..., None]
        alpha = a_old * wgt + a_new * (1 - wgt)
        colour = (old[..., :3] * a_old * wgt + region[..., :3] * a_new * (1 - wgt)) / np.maximum(alpha, 1e-12)
        mixed = np.concatenate([colour, alpha * 255.0], axis=2)
    mixed = np.clip(np.floor(mixed + 0.5), 0, 255).astype(np.uint8)
    exact = weight >= 1.0
    if old.ndim == 3:
        exact = exact[..., None]
    out[oy:oy + h, ox:ox + w] = np.where(exact, old, mixed)
    return out


def _seam_ramp(length: int, at_start: bool, at_end: bool, seam: int) -> np.ndarray:
    """Per pixel along one axis of the old canvas: 1 inside, (d + 1) / (seam + 1) for the
    pixel d from a border facing generated pixels (d < seam)."""
    distance = np.full(length, float(seam))
    index = np.arange(length, dtype=np.float64)
    if at_start:
        distance = np.minimum(distance, index)
    if at_end:
        distance = np.minimum(distance, length - 1 - index)
    return np.minimum(1.0, (distance + 1) / (seam + 1))


def _blend_source(source: SourceStack) -> np.ndarray:
    """What the blended item holds: the stack's blended image, else its composite."""
    from ..stack import alpha_over, load_png

    if source.stack.blended is None:
        return alpha_over(source.images)
    return load_png(source.folder / source.stack.blended, "RGB", source.stack.width, source.stack.height, "blended")


def _held_region(loaded, vae, images: list[np.ndarray], request: StackRequest, offset: tuple[int, int],
                 f: int) -> HeldRegion:
    """Each item's known pixels encoded (VAE / transparent encoder) into its place on the new
    latent canvas, and the mask of those cells."""
    ox, oy = offset[0] // f, offset[1] // f
    lh, lw = request.height // f, request.width // f
    latents, mask = None, torch.zeros(lh, lw)
    for i, image in enumerate(images):
        z = _encode_layer(loaded, vae, image)[0]
        if latents is None:
            latents = torch.zeros(len(images), z.shape[0], lh, lw, dtype=z.dtype, device=z.device)
        latents[i, :, oy:oy + z.shape[1], ox:ox + z.shape[2]] = z
        mask[oy:oy + z.shape[1], ox:ox + z.shape[2]] = 1.0
    return HeldRegion(latents=latents, mask=mask.to(latents.device))


def keep_byte_identical(src: Path, dest: Path, names: list[str]) -> None:
    """Make kept files byte-identical to the source (re-encoding may differ across Pillow versions)."""
    for name in names:
        if (src / name).read_bytes() != (dest / name).read_bytes():
            tmp = dest / f".{name}.copy"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dest / name)


# ------------------------------------------------------------------ internals
def _guidance_mask(source: SourceStack, index: int) -> np.ndarray:
    """Foreground `index`'s stored mask, else its alpha."""
    stored = source.masks[index - 1]
    return stored if stored is not None else source.images[index][..., 3]


def _latent_mask(mask_u8: np.ndarray, lh: int, lw: int, device) -> torch.Tensor:
    """Full-size uint8 mask → [lh, lw] float in [0, 1] (area average)."""
    mask = torch.from_numpy(mask_u8.astype(np.float32) / 255.0)
    return resize_map(mask, lh, lw).to(device)


@torch.no_grad()
def _encode_layer(loaded, vae, image: np.ndarray) -> torch.Tensor:
    """A stored layer back to a UNet latent [1, C, h, w]."""
    param = next(vae.parameters())
    pixels = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    if image.shape[2] == 3:
        z = vae.encode((pixels * 2 - 1).to(device=param.device, dtype=param.dtype)).latent_dist.mean
    else:
        if loaded.encoder is None:
            raise InvalidRequest("model", "editing needs the model's transparent (offset) encoder to "
                                          "re-encode the kept foreground layers; this model has none")
        from ..models import codecs_on_device
        from ..transparent_vae import encode_transparent

        with codecs_on_device(loaded):
            z = encode_transparent(vae, loaded.encoder, pixels)
    return scale_latents(vae, z.float())


def _sample_and_decode(loaded, pipe, items, request: StackRequest, progress: ProgressCallback,
                       cancel: CancelToken, skip=(), options: LayeredOptions = LayeredOptions()):
    """Denoise all layers jointly, then decode those not in `skip`: (sample result,
    (background, foregrounds, blended), timings with "denoise" and "decode")."""
    t = time.perf_counter()
    result = LayeredSampler(loaded, pipe, items, LayeredSettings.from_request(request), options)(
        progress=progress, cancel=cancel, layers=1 + len(request.layers))
    timings = {"denoise": time.perf_counter() - t}
    t = time.perf_counter()
    decoded = decode_items(loaded, pipe.vae, items, result.latents, request.tta_passes, progress, cancel,
                           skip=skip)
    timings["decode"] = time.perf_counter() - t
    return result, decoded, timings
