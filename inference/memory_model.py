"""Peak memory of a UNet call or a decode, traced on the meta device (no data, no compute).

`LiveBytes` watches every tensor the traced code allocates and when the last reference to
its storage dies, so its `peak` is the most activation bytes alive at once. Weights exist
before tracing starts and are never counted there; `weight_bytes` counts them by dtype.
Attention (`scaled_dot_product_attention`) is one op here, as in the fused kernels of CUDA
and the CPU (flash / memory-efficient): only its output is allocated, never the T×T scores.

The engine uses this to size the UNet chunks of a layered run (`rows_that_fit`), and
`bench/memory_model.py` to print SDXL's peaks at 1024². Design notes: docs/methods.md.
"""
from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024 ** 3


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Dispatch mode counting the bytes of the storages allocated inside it and still alive.

    An op's output is a new allocation unless its storage is one of the op's inputs' (views,
    in-place ops, `out=`); storages the mode did not see allocated (weights, inputs) are
    never counted. `peak` is the high-water mark of `live`.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage key → [tracked tensors alive, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        key = _storage_key(t)
        entry = self._refs.get(key)
        if entry is None:
            if key in inputs:
                return  # a view or in-place result of something allocated outside the mode
            entry = self._refs[key] = [0, t.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated and alive at once while `fn()` runs (its result included)."""
    with torch.inference_mode():
        mode = LiveBytes()
        with mode:
            result = fn()
        peak = mode.peak
        del result
    return peak


def weight_bytes(modules: Iterable[nn.Module]) -> dict[str, int]:
    """Parameter and buffer bytes of `modules` by dtype (each tensor counted once)."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            name = str(t.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + t.numel() * t.element_size()
    return by_dtype


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (e.g. the transparency factors beside the UNet)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ the UNet's activations
_ACTIVATION_CACHE: dict = {}
HEADROOM = 1 * GIB  # kept free beside the modelled peak (allocator rounding, kernel workspaces)
TILE_LATENT = 64  # latent cells per VAE tile (512 px) when a decode does not fit


def usable_memory(free: int) -> int:
    """Of `free` bytes, what the modelled activations may take: all but max(10 %, HEADROOM)."""
    return int(free - max(0.1 * free, HEADROOM))


def unet_meta_inputs(config, batch: int, latent_size: tuple[int, int], dtype, context_tokens: int = 77) -> dict:
    """Meta-device inputs of one UNet call of `batch` rows (SDXL's added conditioning too)."""
    meta = dict(device="meta", dtype=dtype)
    inputs = dict(sample=torch.empty(batch, config["in_channels"], *latent_size, **meta),
                  timestep=torch.tensor(500, device="meta"),
                  encoder_hidden_states=torch.empty(batch, context_tokens, config["cross_attention_dim"], **meta))
    if config.get("addition_embed_type") == "text_time":
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text, **meta),
                                       "time_ids": torch.empty(batch, 6, **meta)}
    return inputs


def meta_unet(config, dtype):
    """The UNet of `config` on the meta device (shapes only: built in a second for SDXL)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    return unet.to(dtype)


def unet_activation_model(config, latent_size: tuple[int, int], dtype, context_tokens: int = 77,
                          unet=None, lean: bool = False) -> tuple[int, int]:
    """(bytes per batch row, fixed bytes) of one UNet call's activation peak at this size.

    Plain calls grow linearly with the batch and with no fixed part (SDXL at 1024²: 0.154
    GiB per row at 1, 2, 5 and 10 rows), so one trace at batch 1 on a meta copy gives the
    per-row bytes. With `lean` (`inference.lean_unet`: feed-forwards in token pieces,
    ResNet blocks row by row) one piece's transients are a fixed part, so the call is
    traced at batch 2 and 4 under the real context manager: slope and intercept. Cached per
    config, size, dtype and lean: the first job of a size pays it (SDXL 1024² on one CPU
    core: 1.4 s plain, 3.1 s lean). `unet`: a meta UNet to trace instead (e.g. with layered
    processors installed).
    """
    key = (repr(sorted(dict(config).items())), tuple(latent_size), dtype, context_tokens, lean)
    if unet is None and key in _ACTIVATION_CACHE:
        return _ACTIVATION_CACHE[key]
    model = unet if unet is not None else meta_unet(config, dtype)

    def peak(batch: int) -> int:
        return traced_peak(lambda: model(**unet_meta_inputs(config, batch, latent_size, dtype, context_tokens)))

    if lean:
        from .lean_unet import lean_activations

        with lean_activations(model):  # at 2 and 4 rows: small canvases split their FFs from 3 rows on
            two, four = peak(2), peak(4)
        per_row = max((four - two) // 2, 1)
        result = (per_row, max(two - 2 * per_row, 0))
    else:
        result = (peak(1), 0)
    if unet is None:
        _ACTIVATION_CACHE[key] = result
    return result


def free_memory(device) -> Optional[int]:
    """Bytes a new allocation can get on `device`: CUDA's free memory plus what torch holds
    cached but unused, the CPU's available RAM; None where it cannot be asked (MPS)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def unet_rows_that_fit(unet, latent_size: tuple[int, int], device, *, context_tokens: int = 77,
                       offloaded: bool = False, lean: bool = False) -> Optional[int]:
    """How many batch rows one UNet call (`lean`: under lean activations) may carry in the
    device's free memory (≥ 1); None when the free memory is unknown. With model offload
    the UNet's own weights still have to come onto the device when it runs, so they are
    taken off the free memory first."""
    free = free_memory(device)
    if free is None:
        return None
    dtype = unet.dtype
    if offloaded and next(unet.parameters()).device.type != torch.device(device).type:
        free -= sum(weight_bytes([unet]).values())
    per_row, fixed = unet_activation_model(unet.config, latent_size, dtype, context_tokens, lean=lean)
    return max(1, int((usable_memory(free) - fixed) // max(per_row, 1)))


LEAN_CHOICES = ("auto", "on", "off")


def unet_call_plan(unet, latent_size: tuple[int, int], device, rows: int, *, context_tokens: int = 77,
                   offloaded: bool = False, max_batch: Optional[int] = None,
                   lean: str = "auto") -> tuple[int, bool]:
    """(rows per UNet call, lean activations?) for a layered step of `rows` rows.

    `lean` "on"/"off" forces it; "auto" turns it on on accelerators (exact, no FLOPs, a
    few more kernel launches: memory is what they lack) and on the CPU only when the plain
    call of the rows wanted would not fit. Rows are `max_batch` when set, else what fits
    the free memory with that choice (all of them when the free memory is unknown).
    """
    if lean not in LEAN_CHOICES:
        raise ValueError(f"lean must be one of {LEAN_CHOICES}, got {lean!r}")
    kind = torch.device(device).type
    fit = partial(unet_rows_that_fit, unet, latent_size, device, context_tokens=context_tokens,
                  offloaded=offloaded)
    wanted = min(rows, max_batch) if max_batch else rows
    if lean == "auto":
        plain = None if kind != "cpu" else fit(lean=False)
        use_lean = kind != "cpu" or (plain is not None and plain < wanted)
    else:
        use_lean = lean == "on"
    if max_batch:
        return max_batch, use_lean
    got = fit(lean=use_lean)
    return (rows if got is None else max(1, min(rows, int(got)))), use_lean


def vae_decode_peak(vae, latent_shape: tuple[int, ...], dtype) -> int:
    """Activation peak of one untiled `vae.decode` of latents `latent_shape` (meta trace, cached)."""
    key = ("vae", repr(sorted(dict(vae.config).items())), tuple(latent_shape), dtype)
    if key not in _ACTIVATION_CACHE:
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            model = AutoencoderKL.from_config(dict(vae.config)).to(dtype)
        z = torch.empty(*latent_shape, device="meta", dtype=dtype)
        _ACTIVATION_CACHE[key] = traced_peak(lambda: model.decode(z, return_dict=False)[0])
    return _ACTIVATION_CACHE[key]


@contextlib.contextmanager
def tiled_decode_when_short(vae, latents: torch.Tensor, dtype) -> Iterator[bool]:
    """Tile `vae`'s decode (diffusers' tiled decode, TILE_LATENT-cell tiles, blended overlaps)
    for the block when the untiled decode would not fit the device's free memory; yields
    whether it tiles. A VAE already tiling (EngineSettings.vae_tiling) is left as it is."""
    shape = tuple(latents.shape)
    small = max(shape[-2:]) <= TILE_LATENT
    free = None if small or getattr(vae, "use_tiling", True) else free_memory(latents.device)
    if free is None or vae_decode_peak(vae, shape, dtype) <= usable_memory(free):
        yield False
        return
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = (vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size)
    vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size = True, TILE_LATENT, TILE_LATENT * f
    try:
        yield True
    finally:
        vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size = saved
