"""Which torch device and dtype the engine runs on.

"auto" prefers CUDA, then Apple MPS, then the CPU. Asking for a device that is not there
is a request error (the user picked it), not a silent fallback: generating on the CPU
instead of the GPU they asked for would take minutes without telling them why.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from .errors import InvalidRequest

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(requested: Optional[str] = "auto") -> torch.device:
    """The torch device for `requested` ("auto", "cuda", "cuda:1", "mps", "cpu"; None = auto).

    Raises InvalidRequest("device", ...) for an unknown name or a device this machine lacks.
    """
    name = (requested or "auto").strip().lower()
    if name == "auto":
        if cuda_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")

    kind, _, index_text = name.partition(":")
    if kind not in DEVICE_CHOICES[1:]:
        raise InvalidRequest("device", f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if index_text and (kind != "cuda" or not index_text.isdigit()):
        raise InvalidRequest("device", f"malformed device {requested!r}; only CUDA takes an index (e.g. cuda:1)")

    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not mps_available():
            raise InvalidRequest("device", "mps was requested but Apple's Metal backend is not available here; "
                                           "use auto or cpu")
        return torch.device("mps")

    if not cuda_available():
        raise InvalidRequest("device", f"{name} was requested but this torch build sees no CUDA GPU "
                                       f"(torch {torch.__version__}); use auto or cpu, or install a CUDA build of torch")
    index = int(index_text) if index_text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidRequest("device", f"{name} was requested but only {count} CUDA device(s) exist")
    return torch.device("cuda", index) if index_text else torch.device("cuda")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Half precision on GPUs (memory and speed), full precision on the CPU (fp16 is slow there
    and several CPU kernels lack it)."""
    kind = torch.device(device).type
    return torch.float16 if kind in ("cuda", "mps") else torch.float32


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def run_dtype(device: torch.device | str, requested: Optional[str] = None) -> torch.dtype:
    """The dtype the engine runs in: `requested` ("float32", "bfloat16", "float16") or the
    device's default. bfloat16 on the CPU halves every resident byte (SDXL fits a 16 GB
    machine) and is faster on CPUs with bf16 units (`bench.patch_load`: 0.4× the time of
    float32 on an SDXL block with AVX512-BF16); float16 is refused there (slow, kernels missing)."""
    if requested is None:
        return default_dtype(device)
    if requested not in DTYPE_CHOICES:
        raise InvalidRequest("dtype", f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    if requested == "float16" and torch.device(device).type == "cpu":
        raise InvalidRequest("dtype", "float16 is not supported on the CPU; use bfloat16 (half the memory) "
                                      "or float32")
    return getattr(torch, requested)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX), where bf16 pays in time."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe_device(device: Optional[torch.device | str] = None) -> dict:
    """A JSON-able summary for health/status output: what runs where, and how much memory."""
    device = torch.device(device) if device is not None else select_device("auto")
    info: dict = {
        "device": str(device),
        "type": device.type,
        "dtype": str(default_dtype(device)).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda_available": cuda_available(),
        "mps_available": mps_available(),
        "name": None,
        "total_memory_bytes": None,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["name"] = props.name
        info["total_memory_bytes"] = int(props.total_memory)
        info["cuda_version"] = torch.version.cuda
    elif device.type == "mps":
        info["name"] = "Apple GPU (Metal)"
    else:
        info["name"] = platform.processor() or platform.machine() or "cpu"
        info["threads"] = torch.get_num_threads()
        info["cpu_count"] = os.cpu_count()
        info["fast_bf16"] = cpu_has_fast_bf16()
    return info
