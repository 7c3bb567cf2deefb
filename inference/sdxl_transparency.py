"""The SDXL LayerDiffuse transparency patch: dense attention deltas added to a UNet.

`ld_diffusers_sdxl_attn.safetensors` (lllyasviel/LayerDiffuse_Diffusers) holds one fp16
delta per q/k/v/out weight of attn1 and attn2 in every transformer block of the SDXL UNet,
keyed by the diffusers parameter name. Adding them moves the UNet into the "transparent
latent space" that the transparent VAE decoder understands.

The same UNet also has to generate the opaque background, so the patch is swapped in and
out rather than merged. `TransparencyPatch` keeps one resident form of the deltas: rank-256
factors for SDXL (0.69 GiB in fp16, the form the joint methods' per-sample side path needs
anyway; cached on disk by `FactorCache` so loading skips the factorizations), from which
`applied(unet)` builds the patched tensors for its block only and swaps them in. The
original tensors are the UNet's own objects, so restoring is bit-identical by construction.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

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


PATCH_RANK = 256  # the published SDXL delta is a rank-256 product (a merged LoRA)
Stored = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # dense delta, or (up, down)


class TransparencyPatch:
    """The transparency deltas of one UNet, in ONE resident form, swappable in and out.

    Per patched parameter it keeps the delta either as low-rank factors (up [out, r],
    down [r, in], r = `PATCH_RANK`) where those are smaller than the matrix — the published
    SDXL patch: 0.69 GiB in fp16 instead of 1.8 GiB of patched copies — or dense (1-D bias
    deltas, rank-saturated test patches: exact). The same factors feed the per-sample side
    path of the joint methods (`low_rank`) and `applied()`, which builds the patched
    tensors (base + delta, added in float32, cast to the base dtype) for its block only.
    The originals are the UNet's own tensor objects, so restoring is bit-identical.
    Build it with `from_file` (optionally through a `FactorCache`) or `from_state_dict`.
    """

    def __init__(self, deltas: dict[str, Stored], originals: dict[str, torch.Tensor]):
        if deltas.keys() != originals.keys():
            raise ValueError("deltas and original tensors must cover the same parameters")
        self._deltas = deltas
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
        stored = {name: _stored_delta(params[name], delta) for name, delta in deltas.items()}
        return cls(stored, {name: params[name].detach() for name in deltas})

    @classmethod
    def from_file(cls, path: str | Path, unet: nn.Module,
                  factor_cache: Optional["FactorCache"] = None) -> "TransparencyPatch":
        """Build a patch from `ld_diffusers_sdxl_attn.safetensors` (or a file of that layout).

        The header is validated against the UNet before any tensor is read; tensors are
        then read one at a time, so peak extra memory is the stored deltas plus one delta.
        Factoring SDXL's 560 matrices takes about a minute on a CPU: `factor_cache` keeps
        the result on disk, keyed by the file's sha256, so a second load reads it instead.
        """
        path = Path(path)
        refuse_pickle(path)
        if not path.is_file():
            raise MissingWeights([str(path)], "download ld_diffusers_sdxl_attn.safetensors "
                                 "from lllyasviel/LayerDiffuse_Diffusers")
        params = dict(unet.named_parameters())
        names = list(safetensors_shapes(path))
        validate_sdxl_delta(safetensors_shapes(path), {k: p.shape for k, p in params.items()}, path.name)
        originals = {name: params[name].detach() for name in names}
        if not any(_factored_is_smaller(tuple(t.shape)) for t in originals.values()):
            factor_cache = None  # nothing to factor (test-sized patches): reading is all there is
        stored = factor_cache.load(path, originals) if factor_cache is not None else None
        if stored is None:
            stored = _read_deltas(path, params)
            if factor_cache is not None:
                factor_cache.save(path, stored, originals)
        return cls(stored, originals)

    # ----------------------------------------------------------------- use
    @property
    def parameter_names(self) -> list[str]:
        return list(self._deltas)

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this patch keeps resident (for memory reports)."""
        return [t for v in self._deltas.values() for t in (v if isinstance(v, tuple) else (v,))]

    @contextlib.contextmanager
    def applied(self, unet: nn.Module, rebind_moved: bool = False) -> Iterator[nn.Module]:
        """Swap patched tensors into `unet` for the `with` body, then restore exactly.

        The patched tensors exist only inside the block. Restoring puts the UNet's original
        tensor objects back, also when the body raises. `rebind_moved` is for model CPU
        offload, whose hooks move the UNet between devices (new tensor objects, same
        values): parameters that were only moved are bound back to the originals instead of
        being refused; the hooks move them again at the next forward.
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
                    param.data = _patched_tensor(self._originals[name], self._deltas[name])
                    swapped.append(name)
            yield unet
        finally:
            with torch.no_grad():
                for name in swapped:
                    params[name].data = self._originals[name]
            self._active = False

    def merge_into(self, unet: nn.Module) -> None:
        """Make the patch permanent in `unet`; the patch object is spent afterwards (the
        patched tensors replace the originals, which are released)."""
        self._check_usable()
        if self._active:
            raise RuntimeError("cannot merge a transparency patch while it is applied")
        params = self._bound_parameters(unet)
        with torch.no_grad():
            for name, param in params.items():
                param.data = _patched_tensor(self._originals[name], self._deltas[name])
        self._deltas = {}
        self._originals = {}
        self._merged = True

    def low_rank(
        self, rank: int = PATCH_RANK, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per 2-D parameter (up [out, r], down [r, in]) with up @ down ≈ the delta.

        At the stored rank these are the stored factors themselves (no copy); other ranks
        and dense deltas are factored here, exact up to float error when the delta's rank
        is ≤ `rank`. Biases (1-D) need no factors: see `bias_deltas`. `dtype` defaults to
        the parameters' dtype.
        """
        self._check_usable()
        if rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {rank}")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, stored in self._deltas.items():
            base = self._originals[name]
            if base.ndim != 2:
                continue
            out_dtype = dtype or base.dtype
            if isinstance(stored, tuple) and stored[0].shape[1] == min(rank, *base.shape):
                up, down = stored
            else:
                up, down = factor_low_rank(_dense(stored, base.device), rank)
            factors[name] = (up.to(out_dtype), down.to(out_dtype))
        return factors

    def bias_deltas(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per 1-D parameter (to_out.0 biases, when the file carries them) the delta in
        `dtype` (default the parameter's), for per-sample application beside `low_rank`."""
        self._check_usable()
        return {name: delta.to(dtype or self._originals[name].dtype) for name, delta in self._deltas.items()
                if self._originals[name].ndim == 1}

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


def _factored_is_smaller(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and min(PATCH_RANK, *shape) * (shape[0] + shape[1]) < shape[0] * shape[1]


def _stored_delta(param: torch.Tensor, delta: torch.Tensor) -> Stored:
    """The resident form of one delta: factors (in the parameter's dtype, on its device)
    where smaller, else the delta itself (its own dtype, so adding it stays exact)."""
    with torch.no_grad():
        if _factored_is_smaller(tuple(param.shape)):
            up, down = factor_low_rank(delta.to(device=param.device, dtype=torch.float32), PATCH_RANK)
            return up.to(param.dtype), down.to(param.dtype)
        return delta.to(device=param.device)


def _read_deltas(path: Path, params: Mapping[str, nn.Parameter]) -> dict[str, Stored]:
    from safetensors import safe_open

    stored: dict[str, Stored] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                stored[name] = _stored_delta(params[name], f.get_tensor(name))
    except Exception as exc:  # truncated download, corrupt data
        raise WeightMismatch(f"{path.name} (unreadable: {exc})") from exc
    return stored


def _dense(stored: Stored, device) -> torch.Tensor:
    """The delta in float32 on `device` (the product of the factors when factored)."""
    if isinstance(stored, tuple):
        return stored[0].float() @ stored[1].float()
    return stored.to(device=device, dtype=torch.float32)


def _patched_tensor(base: torch.Tensor, stored: Stored) -> torch.Tensor:
    """base + delta computed in float32 and cast to the base dtype."""
    with torch.no_grad():
        return (base.float() + _dense(stored, base.device).to(base.device)).to(base.dtype)


class FactorCache:
    """The stored deltas of delta files on disk (safetensors), so a second load of SDXL's
    patch reads 0.7 GiB instead of factoring 560 matrices. One file per delta file path and
    dtype; it records the delta file's sha256 and is rebuilt when that changes (or when it
    does not match the UNet). `sha256(path)` is the project's hash cache (`HashCache`)."""

    VERSION = "1"

    def __init__(self, folder: Path, sha256: Callable[[Path], str]):
        self.folder = Path(folder)
        self.sha256 = sha256

    def path_for(self, delta_path: Path, dtype: torch.dtype) -> Path:
        import hashlib

        key = hashlib.sha256(str(Path(delta_path).resolve()).encode()).hexdigest()[:24]
        return self.folder / f"{key}-r{PATCH_RANK}-{str(dtype).removeprefix('torch.')}.safetensors"

    def _metadata(self, delta_path: Path) -> dict[str, str]:
        return {"delta_sha256": self.sha256(delta_path), "rank": str(PATCH_RANK), "version": self.VERSION}

    def load(self, delta_path: Path, originals: Mapping[str, torch.Tensor]) -> Optional[dict[str, Stored]]:
        """The cached stored deltas, or None when missing, stale or not for this UNet."""
        from safetensors import safe_open

        dtype = next(iter(originals.values())).dtype
        file = self.path_for(delta_path, dtype)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if f.metadata() != self._metadata(delta_path):
                    return None
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception:  # a torn or foreign file is rebuilt
            return None
        stored: dict[str, Stored] = {}
        for name, base in originals.items():
            if f"{name}:up" in tensors and f"{name}:down" in tensors:
                up, down = tensors[f"{name}:up"], tensors[f"{name}:down"]
                if (up.shape[0], down.shape[1]) != tuple(base.shape) or up.dtype != base.dtype:
                    return None
                stored[name] = (up.to(base.device), down.to(base.device))
            elif f"{name}:delta" in tensors and tensors[f"{name}:delta"].shape == base.shape:
                stored[name] = tensors[f"{name}:delta"].to(base.device)
            else:
                return None
        expected = sum(2 if isinstance(v, tuple) else 1 for v in stored.values())
        return stored if expected == len(tensors) else None  # nothing missing, nothing foreign

    def save(self, delta_path: Path, stored: Mapping[str, Stored], originals: Mapping[str, torch.Tensor]) -> None:
        """Write atomically; a read-only cache only costs the next load its time."""
        import os

        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for name, value in stored.items():
            if isinstance(value, tuple):
                tensors[f"{name}:up"], tensors[f"{name}:down"] = (t.detach().cpu().contiguous() for t in value)
            else:
                tensors[f"{name}:delta"] = value.detach().cpu().contiguous()
        file = self.path_for(delta_path, next(iter(originals.values())).dtype)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            save_file(tensors, str(tmp), metadata=self._metadata(delta_path))
            os.replace(tmp, file)
        except OSError:
            pass


LOW_RANK_OVERSAMPLING = 16  # extra random probes of the randomized SVD beyond the rank


def factor_low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the best rank-r approximation of `delta`.

    When r is well below the matrix size, a randomized SVD (Halko et al.: r + 16 random
    probes, two power iterations) finds the same leading subspace as a full SVD — for the
    rank-256 LayerDiffuse deltas the error is the fp16 storage floor either way — at a
    fraction of the time (SDXL has 560 such matrices, minutes of full SVDs on a CPU). Its
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
