"""Optional `torch.compile` of the UNet's attention-free blocks (`--compile`; regional compilation).

Why regional: our attention processors hold per-job state (`layered_attention`) and a chunked
step changes their rows per call (`LayeredAttentionState.select_rows`), so a whole-UNet graph
would be recompiled per job and per chunk. The repeated compute that holds no state — the
residual blocks, the transformer blocks' feed-forwards, the up/down-samplers — is compiled in
place (`module.compile`: the module object and its parameters stay, so the transparency patch,
offload hooks and wrappers around these modules keep working); attention stays eager. Shapes
are symbolic (`dynamic=True`, no duck sizing, size-oblivious batches), so another batch size,
chunk size or canvas reuses the compiled code: one graph per block configuration (channel
counts; a batch of 1 apart), compiled by `warm_up` once per loaded model. Design notes: docs/methods.md.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .errors import InvalidRequest

log = logging.getLogger("multiplane.engine")

# One code object (e.g. ResnetBlock2D.forward) gets one graph per channel configuration:
# SDXL has about a dozen, above dynamo's default limit of 8 (past it, blocks run eager).
RECOMPILE_LIMIT = 64
COMPILING_MESSAGE = "compiling UNet blocks (the first load is slower)"


def check_compile_support(device) -> None:
    """Raise InvalidRequest("compile", ...) when torch.compile cannot run on `device` here:
    checked when the engine is made, not half-way into a job."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise InvalidRequest("compile", f"torch.compile is not supported on {kind} by Multiplane "
                                        f"(torch {torch.__version__}); run without --compile")
    if kind == "cpu" and not _cpu_compiler_found():
        raise InvalidRequest("compile", "torch.compile on the CPU needs a C++ compiler (g++ or clang++, "
                                        "or $CXX) and none was found; install one or run without --compile")
    if kind == "cuda" and not _triton_found():
        raise InvalidRequest("compile", "torch.compile on CUDA needs Triton (pip install triton, a GPU of "
                                        "compute capability 7.0 or newer) and it is not usable here; "
                                        "run without --compile")


def _cpu_compiler_found() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or a broken toolchain
        return False
    return True


def _triton_found() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()


def compilable_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's stateless, attention-free blocks: residual blocks, up/down-samplers and the
    transformer blocks' feed-forwards (never an attention module: its processor is per job)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    blocks = []
    for module in unet.modules():
        if isinstance(module, (ResnetBlock2D, Downsample2D, Upsample2D)):
            blocks.append(module)
        elif isinstance(module, BasicTransformerBlock) and module.ff is not None:
            blocks.append(module.ff)
    return blocks


def compile_unet_blocks(unet: nn.Module, backend: str = "inductor") -> int:
    """Compile `compilable_blocks(unet)` in place (lazily: the first call compiles); returns
    how many. The shape settings are dynamo's process-wide ones (this is its only user)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as shape_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    shape_config.use_duck_shape = False  # equal sizes (H = W = channels) stay separate symbols
    shape_config.backed_size_oblivious = True  # a chunk of 1 row reuses the batched graph
    blocks = compilable_blocks(unet)
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return len(blocks)


def zero_inputs(unet: nn.Module, rows: int, latent_size: tuple[int, int], device) -> dict:
    """Zeros for one call of `unet` on `rows` rows (SDXL's added conditioning too), in its dtype."""
    from .memory_model import unet_meta_inputs

    meta = unet_meta_inputs(unet.config, rows, latent_size, unet.dtype)
    return {k: ({n: torch.zeros(t.shape, dtype=t.dtype, device=device) for n, t in v.items()}
                if isinstance(v, dict) else torch.zeros(v.shape, dtype=v.dtype, device=device))
            for k, v in meta.items()}


def warm_up(unet: nn.Module, device, latent_size: tuple[int, int] = (16, 16)) -> float:
    """UNet calls on 2 rows and on 1 row of zeros (under inference mode, like the samplers),
    so the first job's first step does not pay for compiling; returns their seconds. Both
    batch sizes: a batch of 1 gets graphs of its own (size 1 broadcasts), and it is the
    common case on GPUs, where lean activations run the ResNet blocks row by row."""
    t = time.perf_counter()
    for rows in (2, 1):
        inputs = zero_inputs(unet, rows, latent_size, device)
        with torch.inference_mode():
            unet(**inputs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def compile_loaded_unet(unet: nn.Module, device, progress) -> float:
    """`compile_unet_blocks` then `warm_up`, announced as a load-phase progress message and
    logged with its seconds (the first job's extra time); returns them."""
    from .progress import Progress

    progress(Progress(phase="load", message=COMPILING_MESSAGE))
    count = compile_unet_blocks(unet)
    try:
        seconds = warm_up(unet, device)
    except Exception as exc:  # a backend that cannot build here: say so, once, at load
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise InvalidRequest("compile", f"torch.compile failed on this machine ({type(exc).__name__}: "
                                        f"{first_line}); run without --compile") from exc
    message = f"compiled {count} UNet blocks in {seconds:.1f} s (once per loaded model)"
    log.info(message)
    progress(Progress(phase="load", message=message))
    return seconds
