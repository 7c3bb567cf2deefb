"""The SDXL LayerDiffuse transparency patch: dense attention deltas added to a UNet.

`ld_diffusers_sdxl_attn.safetensors` (lllyasviel/LayerDiffuse_Diffusers) holds one fp16
delta per q/k/v/out weight of attn1 and attn2 in every transformer block of the SDXL UNet,
keyed by the diffusers parameter name. Adding them moves the UNet into the "transparent
latent space" that the transparent VAE decoder understands.

The same UNet also has to generate the opaque background, so the patch is swapped in and
out rather than merged: `TransparencyPatch` keeps the patched attention tensors beside the
UNet's own (about 1.9 GB in fp16 for SDXL, never a second UNet) and `applied(unet)` swaps
parameter storage in and back without copying. The original tensors are the UNet's own
objects, so restoring is bit-identical by construction.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import MissingWeights, WeightMismatch
from .weights import check_state_dict, refuse_pickle, safetensors_shapes

# attn1/attn2 projections of a diffusers BasicTransformerBlock (inside `transformer_blocks.N`).
_PATCHED_WEIGHT = re.compile(
    r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)
_OPTIONAL_BIAS = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.to_out\.0\.bias$")

Shape = tuple[int, ...]


def _as_shape(value) -> Shape:
    return tuple(getattr(value, "shape", value))


def unet_param_shapes(unet: nn.Module) -> dict[str, Shape]:
    """Parameter names and shapes of a UNet (works on the meta device: no data is read)."""
    return {name: tuple(p.shape) for name, p in unet.named_parameters()}


def delta_shapes_from_param_shapes(
    param_shapes: Mapping[str, Iterable[int]],
) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(required, optional) delta names and shapes for a UNet given its parameter shapes.

    Required: the attn1/attn2 to_q/to_k/to_v/to_out.0 weights of every transformer block.
    Optional: the to_out.0 biases of the same attentions (the published file may carry them).
    """
    required = {k: _as_shape(v) for k, v in param_shapes.items() if _PATCHED_WEIGHT.search(k)}
    optional = {k: _as_shape(v) for k, v in param_shapes.items() if _OPTIONAL_BIAS.search(k)}
    return required, optional


def expected_delta_shapes(unet: nn.Module) -> dict[str, Shape]:
    """The delta names and shapes a transparency patch for `unet` must have (biases excluded).

    For the SDXL base UNet this is exactly the layout of `ld_diffusers_sdxl_attn`; tiny
    SDXL-shaped test UNets go through the same rule.
    """
    required, _ = delta_shapes_from_param_shapes(unet_param_shapes(unet))
    return required


def validate_sdxl_delta(
    shapes: Mapping[str, Iterable[int]],
    unet_param_shapes: Mapping[str, Iterable[int]],
    what: str = "SDXL transparency attention deltas",
) -> None:
    """Raise WeightMismatch unless `shapes` is exactly the patch layout for this UNet.

    Every attention projection weight must be present with the parameter's shape; to_out.0
    bias deltas are accepted if present (and then must match); anything else is named as
    unexpected. Checked before any arithmetic so a wrong file never half-patches a UNet.
    """
    required, optional = delta_shapes_from_param_shapes(unet_param_shapes)
    if not required:
        raise WeightMismatch(f"{what}: the UNet has no transformer-block attention to patch")
    check_state_dict(shapes, {**required, **optional}, what, optional=optional.keys())


class TransparencyPatch:
    """Patched copies of the attention weights of one UNet, swappable in and out.

    Holds, per patched parameter name, the patched tensor (base + delta, added in float32
    and cast to the parameter's dtype) and the UNet's original tensor (the same object,
    not a copy). Build it with `from_file` or `from_state_dict`.
    """

    def __init__(self, patched: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]):
        if patched.keys() != originals.keys():
            raise ValueError("patched and original tensors must cover the same parameters")
        self._patched = patched
        self._originals = originals
        self._active = False
        self._merged = False

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_state_dict(
        cls, deltas: Mapping[str, torch.Tensor], unet: nn.Module, what: str = "transparency deltas"
    ) -> "TransparencyPatch":
        """Build a patch for `unet` from in-memory deltas (validated first).

        The caller's mapping is not modified; drop it after this returns to free the deltas.
        """
        params = dict(unet.named_parameters())
        validate_sdxl_delta(deltas, {k: p.shape for k, p in params.items()}, what)
        patched: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            patched[name], originals[name] = _patched_tensor(params[name], delta)
        return cls(patched, originals)

    @classmethod
    def from_file(cls, path: str | Path, unet: nn.Module) -> "TransparencyPatch":
        """Build a patch from `ld_diffusers_sdxl_attn.safetensors` (or a file of that layout).

        The header is validated against the UNet before any tensor is read; tensors are
        then read one at a time, so peak extra memory is the patched tensors plus one delta.
        """
        path = Path(path)
        refuse_pickle(path)
        if not path.is_file():
            raise MissingWeights([str(path)], "download ld_diffusers_sdxl_attn.safetensors "
                                 "from lllyasviel/LayerDiffuse_Diffusers")
        params = dict(unet.named_parameters())
        validate_sdxl_delta(safetensors_shapes(path), {k: p.shape for k, p in params.items()},
                            path.name)
        from safetensors import safe_open

        patched: dict[str, torch.Tensor] = {}
        originals: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    delta = f.get_tensor(name)
                    patched[name], originals[name] = _patched_tensor(params[name], delta)
                    del delta
        except Exception as exc:  # truncated download, corrupt data
            raise WeightMismatch(f"{path.name} (unreadable: {exc})") from exc
        return cls(patched, originals)

    # ----------------------------------------------------------------- use
    @property
    def parameter_names(self) -> list[str]:
        return list(self._patched)

    @contextlib.contextmanager
    def applied(self, unet: nn.Module, rebind_moved: bool = False) -> Iterator[nn.Module]:
        """Swap the patched tensors into `unet` for the `with` body, then restore exactly.

        Restoring puts the UNet's original tensor objects back, also when the body raises.
        `rebind_moved` is for model CPU offload, whose hooks move the UNet between devices
        (new tensor objects, same values): parameters that were only moved are bound back to
        the originals instead of being refused; the hooks move them again at the next forward.
        """
        self._check_usable()
        if self._active:
            raise RuntimeError("this transparency patch is already applied")
        params = self._bound_parameters(unet, rebind_moved=rebind_moved)
        self._active = True
        swapped: list[str] = []
        try:
            with torch.no_grad():
                for name, param in params.items():
                    param.data = self._patched[name]
                    swapped.append(name)
            yield unet
        finally:
            with torch.no_grad():
                for name in swapped:
                    params[name].data = self._originals[name]
            self._active = False

    def merge_into(self, unet: nn.Module) -> None:
        """Make the patch permanent in `unet`; the patch object is spent afterwards.

        The patched tensors become the UNet's parameters and the originals are released, so
        merging costs no extra memory once done.
        """
        self._check_usable()
        if self._active:
            raise RuntimeError("cannot merge a transparency patch while it is applied")
        params = self._bound_parameters(unet)
        with torch.no_grad():
            for name, param in params.items():
                param.data = self._patched[name]
        self._patched = {}
        self._originals = {}
        self._merged = True

    def low_rank(
        self, rank: int = 256, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per parameter (up [out, r], down [r, in]) with up @ down ≈ the applied delta.

        The delta is the one actually applied to this UNet (patched − original, in float32),
        so per-sample application reproduces `applied()`; it is exact up to float error
        when the delta's rank is ≤ `rank`. Biases (1-D) need no factors: see `bias_deltas`.
        `dtype` defaults to the parameters' dtype.
        """
        self._check_usable()
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, patched in self._patched.items():
            if patched.ndim != 2:
                continue
            delta = patched.float() - self._originals[name].float()
            up, down = factor_low_rank(delta, rank)
            out_dtype = dtype or patched.dtype
            factors[name] = (up.to(out_dtype), down.to(out_dtype))
        return factors

    def bias_deltas(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per 1-D parameter (to_out.0 biases, when the file carries them) the applied delta
        (patched − original, in float32, then `dtype`, default the parameter's), for
        per-sample application beside `low_rank`'s factors."""
        self._check_usable()
        return {name: (patched.float() - self._originals[name].float()).to(dtype or patched.dtype)
                for name, patched in self._patched.items() if patched.ndim == 1}

    # ----------------------------------------------------------------- internals
    def _check_usable(self) -> None:
        if self._merged:
            raise RuntimeError("this transparency patch was merged into a UNet and is spent")

    def _bound_parameters(self, unet: nn.Module, rebind_moved: bool = False) -> dict[str, nn.Parameter]:
        """The UNet parameters this patch replaces, checked to still be the originals.

        If the UNet was moved or converted (`.to(...)`) after the patch was built, the
        originals no longer match and swapping would silently restore stale weights. With
        `rebind_moved`, a parameter of the same shape and dtype that only changed storage
        (an offload round trip) is bound back to its original instead.
        """
        params = dict(unet.named_parameters())
        for name, original in self._originals.items():
            param = params.get(name)
            if param is None:
                raise ValueError(f"this transparency patch was built for another UNet "
                                 f"(no parameter {name})")
            same = (param.data_ptr() == original.data_ptr() and param.shape == original.shape
                    and param.dtype == original.dtype and param.device == original.device)
            if not same and rebind_moved and param.shape == original.shape and param.dtype == original.dtype:
                with torch.no_grad():
                    param.data = original
                same = True
            if not same:
                raise ValueError(
                    f"{name} is no longer the tensor this transparency patch was built on "
                    "(UNet moved, converted or reloaded?); rebuild the patch for this UNet"
                )
        return {name: params[name] for name in self._originals}


def _patched_tensor(param: nn.Parameter, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base + delta computed in float32 and cast to the base dtype, the base tensor)."""
    base = param.detach()
    with torch.no_grad():
        patched = (base.float() + delta.to(device=base.device, dtype=torch.float32)).to(base.dtype)
    return patched, base


LOW_RANK_OVERSAMPLING = 16  # extra random probes of the randomized SVD beyond the rank


def factor_low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of `delta`.

    When r is well below the matrix size, a randomized SVD (Halko et al.: r + 16 random
    probes, two power iterations) finds the same leading subspace as a full SVD — for the
    rank-256 LayerDiffuse deltas the error is the fp16 storage floor either way — at a
    fraction of the time (SDXL has 140 such matrices, minutes of full SVDs on a CPU). Its
    random probes come from a fixed seed on a forked RNG, so factors (and every image made
    with them) are the same in every process and the caller's RNG is untouched.
    """
    r = min(rank, *delta.shape)
    # CUDA and the CPU have the decompositions; elsewhere (MPS) they run on the CPU.
    work = delta if delta.device.type in ("cpu", "cuda") else delta.cpu()
    if 2 * (r + LOW_RANK_OVERSAMPLING) >= min(work.shape):
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        up, down = u[:, :r] * s[:r], vh[:r]
    else:
        on_cuda = work.device.type == "cuda"
        with torch.random.fork_rng(devices=[work.device] if on_cuda else []):
            # Seed only the generator the probes come from (torch.manual_seed would also
            # reseed other devices' generators, outside the fork).
            if on_cuda:
                with torch.cuda.device(work.device):
                    torch.cuda.manual_seed(0)
            else:
                torch.default_generator.manual_seed(0)
            u, s, v = torch.svd_lowrank(work, q=r + LOW_RANK_OVERSAMPLING, niter=2)
        up, down = u[:, :r] * s[:r], v[:, :r].T.contiguous()
    return up.to(delta.device), down.to(delta.device)
