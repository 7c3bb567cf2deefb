"""Editing an existing layer stack: regenerate one layer, or restyle all of them.

`regenerate_layer` (LayerDiff-style layer-specific editing): the chosen layer gets a new
prompt and/or seed and is denoised again, in the same batched joint sampler, next to the
*kept* layers. The kept layers are encoded back to latents (the background with the VAE,
foregrounds with the transparent encoder) and enter the batch as pinned items: before
every step their latent is set to `add_noise(clean, their noise, t)`, so at every UNet
call they provide the keys/values the regenerated layer attends to (inter-layer
attention), while they themselves attend only to themselves. The blended image is
regenerated too, placed with the kept layers' masks (stored `mask_NN.png`, else alpha).
Kept layer files (images and masks) are byte-identical copies of the originals.

`restyle_stack`: every layer again with a style prompt added to the global prompt,
keeping the layout: the stored per-layer seeds (same initial noise), boxes, and each
foreground's stored mask (else its alpha) used as a fixed guidance mask (confinement with
`mask_guidance`, placement in the blended image). The masks are kept as they were.

Both write a NEW stack folder (`out_dir` must not exist) atomically; the source stack is
never modified.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidRequest
from ..masks import mask_to_uint8, resize_map
from ..progress import CancelToken, Progress, ProgressCallback, ignore_progress
from ..request import LayerSpec, StackRequest, validate_prompt, validate_seed
from ..sampling import job_pipeline, vae_scale_factor
from .independent import combine_prompts
from .joint import decode_items, joint_items, sample_layers, scale_latents


def _stack_model_spec(stack) -> str:
    """The model spec to reload for a stack: its preset, or its base path when that exists."""
    base = str(stack.model.get("base", ""))
    if base and Path(base).exists():
        return base
    preset = str(stack.model.get("preset", ""))
    if base == "tiny" or preset == "tiny":
        return "tiny"
    if preset:
        return preset
    raise InvalidRequest("model", "the stack does not record its model; pass model=...")


def _request_from_stack(stack, **changes) -> StackRequest:
    layers = tuple(LayerSpec(prompt=layer.prompt, seed=layer.seed, box=layer.box, name=layer.name)
                   for layer in stack.layers[1:])
    base = dict(prompt=stack.prompt, background=stack.layers[0].prompt, layers=layers,
                negative_prompt=stack.negative_prompt, width=stack.width, height=stack.height,
                steps=stack.steps, guidance=stack.guidance, seed=stack.seed, method="joint",
                background_seed=stack.layers[0].seed, name=stack.name)
    base.update(changes)
    return StackRequest(**base)


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
        from ..transparent_vae import encode_transparent

        z = encode_transparent(vae, loaded.encoder, pixels)
    return scale_latents(vae, z.float())


def _load_source(stack_dir):
    from ..stack import load_layer_images, load_png, load_stack

    stack = load_stack(stack_dir)
    images = load_layer_images(stack, stack_dir)
    masks = [None if layer.mask is None else load_png(Path(stack_dir) / layer.mask, "L", stack.width,
                                                      stack.height, f"layers[{i}].mask")
             for i, layer in enumerate(stack.layers)][1:]
    return stack, images, masks


def _ensure_copies(src: Path, dest: Path, names: list[str]) -> None:
    """Make kept files byte-identical to the source (re-encoding may differ across Pillow versions)."""
    for name in names:
        if (src / name).read_bytes() != (dest / name).read_bytes():
            tmp = dest / f".{name}.copy"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dest / name)


def _write(out_dir: Path, loaded, stack, request: StackRequest, seeds, background, foregrounds, masks,
           blended, timings, cancel) -> object:
    from ..stack import LayerStack, StackLayer, write_stack

    layers = [StackLayer(name=stack.layers[0].name, kind="background", prompt=request.background,
                         seed=seeds[0], file="background.png")]
    for i, spec in enumerate(request.layers, start=1):
        layers.append(StackLayer(name=spec.name or f"layer_{i:02d}", kind="foreground", prompt=spec.prompt,
                                 seed=seeds[i], file=f"layer_{i:02d}.png",
                                 box=list(spec.box) if spec.box else None, depth=stack.layers[i].depth))
    new = LayerStack(name=out_dir.name, method="joint", width=request.width, height=request.height,
                     prompt=request.prompt, negative_prompt=request.negative_prompt, seed=request.seed,
                     steps=request.steps, guidance=float(request.guidance), model=loaded.describe(),
                     layers=layers, timings={k: round(v, 4) for k, v in timings.items()})
    return write_stack(out_dir, new, background, foregrounds, masks=masks, blended=blended, cancel=cancel)


def _load_joint_items(engine, stack, request: StackRequest, seeds: list[int], model: Optional[str],
                      progress: ProgressCallback, cancel: CancelToken):
    """(loaded, pipe, items): the stack's model (or `model`) and the joint items for `request`,
    before the caller pins or masks the layers it keeps. Call with the engine lock held."""
    loaded = engine.load(model or _stack_model_spec(stack), progress, cancel)
    pipe = job_pipeline(loaded.pipeline)
    unet = pipe.unet
    items = joint_items(pipe, request, seeds, pipe.vae, unet, loaded.device, unet.dtype)
    return loaded, pipe, items


def _sample_and_decode(loaded, pipe, items, request: StackRequest, progress: ProgressCallback,
                       cancel: CancelToken, skip: Sequence[int] = ()):
    """Denoise all layers jointly, then decode those not in `skip`: (sample result,
    (background, foregrounds, blended), timings with "denoise" and "decode")."""
    t = time.perf_counter()
    result = sample_layers(loaded, pipe, items, width=request.width, height=request.height,
                           steps=request.steps, guidance=request.guidance,
                           negative_prompt=request.negative_prompt,
                           inter_layer_strength=request.inter_layer_strength,
                           mask_guidance=request.mask_guidance, progress=progress, cancel=cancel,
                           layers=1 + len(request.layers))
    timings = {"denoise": time.perf_counter() - t}
    t = time.perf_counter()
    decoded = decode_items(loaded, pipe.vae, items, result.latents, request.tta_passes, progress, cancel,
                           skip=skip)
    timings["decode"] = time.perf_counter() - t
    return result, decoded, timings


def regenerate_layer(engine, stack_dir, layer_index: int, out_dir, *, new_prompt: Optional[str] = None,
                     new_seed: Optional[int] = None, model: Optional[str] = None, tta_passes: int = 8,
                     inter_layer_strength: float = 0.3, mask_guidance: float = 0.5,
                     progress: ProgressCallback = ignore_progress, cancel: Optional[CancelToken] = None):
    """Regenerate layer `layer_index` (0 = background) of the stack at `stack_dir` into `out_dir`.

    Returns the written LayerStack. Other layers' files are byte-identical copies.
    """
    stack_dir, out_dir = Path(stack_dir), Path(out_dir)
    cancel = cancel or CancelToken()
    if out_dir.exists():
        raise InvalidRequest("out", f"{out_dir} already exists; choose a new folder")
    stack, images, stored_masks = _load_source(stack_dir)
    n_fg = len(stack.layers) - 1
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index <= n_fg:
        raise InvalidRequest("layer_index", f"must be 0 (background) .. {n_fg}, got {layer_index!r}")
    if new_prompt is not None:
        validate_prompt("new_prompt", new_prompt, required=layer_index > 0)
    if new_seed is not None:
        validate_seed("new_seed", new_seed)
    if new_prompt is None and new_seed is None:
        raise InvalidRequest("new_prompt", "give a new prompt and/or a new seed for the layer")

    request = _request_from_stack(stack, tta_passes=tta_passes, inter_layer_strength=inter_layer_strength,
                                  mask_guidance=mask_guidance)
    if layer_index == 0:
        request = replace(request, background=request.background if new_prompt is None else new_prompt,
                          background_seed=request.background_seed if new_seed is None else new_seed)
    else:
        old = request.layers[layer_index - 1]
        edited = replace(old, prompt=old.prompt if new_prompt is None else new_prompt,
                         seed=old.seed if new_seed is None else new_seed)
        request = replace(request, layers=request.layers[:layer_index - 1] + (edited,)
                          + request.layers[layer_index:])
    request = request.validated()
    seeds = [request.background_seed] + [layer.seed for layer in request.layers]

    with engine.lock:
        t0 = time.perf_counter()
        loaded, pipe, items = _load_joint_items(engine, stack, request, seeds, model, progress, cancel)
        vae, unet = pipe.vae, pipe.unet
        lh, lw = request.height // vae_scale_factor(vae), request.width // vae_scale_factor(vae)
        for i, item in enumerate(items[:-1]):  # all but blended
            if i == layer_index:
                continue
            item.pinned = _encode_layer(loaded, vae, images[i]).to(unet.dtype)
            if item.role == "foreground":
                mask = stored_masks[i - 1] if stored_masks[i - 1] is not None else images[i][..., 3]
                item.fixed_mask = _latent_mask(mask, lh, lw, loaded.device)
        cancel.raise_if_cancelled()
        skip = [i for i in range(len(items) - 1) if i != layer_index]
        result, (background, foregrounds, blended), timings = _sample_and_decode(
            loaded, pipe, items, request, progress, cancel, skip=skip)
        background = images[0] if layer_index != 0 else background
        foregrounds = [images[i] if i != layer_index else foregrounds[i - 1] for i in range(1, n_fg + 1)]
        masks = list(stored_masks)
        if layer_index > 0:
            masks[layer_index - 1] = mask_to_uint8(result.masks[layer_index], request.height, request.width)
        timings["total"] = time.perf_counter() - t0
        cancel.raise_if_cancelled()
        progress(Progress(phase="save", layers=1 + n_fg))
        written = _write(out_dir, loaded, stack, request, seeds, background, foregrounds,
                         masks if any(m is not None for m in masks) else None, blended, timings, cancel)
    kept = [layer.file for i, layer in enumerate(written.layers) if i != layer_index]
    kept += [written.layers[i].mask for i in range(1, n_fg + 1)
             if i != layer_index and written.layers[i].mask is not None]
    _ensure_copies(stack_dir, out_dir, kept)
    return written


def restyle_stack(engine, stack_dir, style: str, out_dir, *, model: Optional[str] = None, tta_passes: int = 8,
                  inter_layer_strength: float = 0.3, mask_guidance: float = 0.8,
                  progress: ProgressCallback = ignore_progress, cancel: Optional[CancelToken] = None):
    """All layers of the stack again with `style` added to the global prompt, same layout."""
    stack_dir, out_dir = Path(stack_dir), Path(out_dir)
    cancel = cancel or CancelToken()
    validate_prompt("style", style, required=True)
    if out_dir.exists():
        raise InvalidRequest("out", f"{out_dir} already exists; choose a new folder")
    stack, images, stored_masks = _load_source(stack_dir)
    n_fg = len(stack.layers) - 1
    request = _request_from_stack(stack, prompt=combine_prompts(stack.prompt, style), tta_passes=tta_passes,
                                  inter_layer_strength=inter_layer_strength,
                                  mask_guidance=mask_guidance).validated()
    seeds = [request.background_seed] + [layer.seed for layer in request.layers]
    with engine.lock:
        t0 = time.perf_counter()
        loaded, pipe, items = _load_joint_items(engine, stack, request, seeds, model, progress, cancel)
        vae = pipe.vae
        lh, lw = request.height // vae_scale_factor(vae), request.width // vae_scale_factor(vae)
        masks = []
        for i in range(1, n_fg + 1):
            mask = stored_masks[i - 1] if stored_masks[i - 1] is not None else images[i][..., 3]
            items[i].fixed_mask = _latent_mask(mask, lh, lw, loaded.device)
            masks.append(mask)
        _result, (background, foregrounds, blended), timings = _sample_and_decode(
            loaded, pipe, items, request, progress, cancel)
        timings["total"] = time.perf_counter() - t0
        cancel.raise_if_cancelled()
        progress(Progress(phase="save", layers=1 + n_fg))
        return _write(out_dir, loaded, stack, request, seeds, background, foregrounds,
                      masks or None, blended, timings, cancel)
