"""Lean activations: a UNet call that holds fewer activation bytes at once, with the same result.

At SDXL 1024² the peak of a UNet call sits in work that never mixes batch rows or tokens:
the GEGLU feed-forwards of the transformer blocks (per row 4096 tokens × 5120 features at
64², 1024 × 10240 at 32²) and the ResNet blocks of the 128² level (960-channel GroupNorm →
SiLU → conv). Both are exact to split: a feed-forward acts on each token alone, and
`ResnetBlock2D`, `Upsample2D`, `Downsample2D` and the blocks made of nothing else
(`DownBlock2D`, `UpBlock2D`: GroupNorm, convolution, interpolation, the time embedding) on
each sample alone. `lean_activations(unet)` swaps, for a `with` block, each such module in
its parent for a small wrapper that calls the ORIGINAL module on slices (about `tokens`
(row, token) pairs, `rows` rows) and writes the pieces into one output, so only one
slice's transients are alive at a time. No FLOPs are added (the same operations on smaller
pieces), weights are never copied, and on exit every original module is back in its
place, also when the body raises. Attention modules and their processors are untouched,
so it composes with `layered_attention` and the chunked UNet of `LayeredSampler`.

Why wrappers around the feed-forward rather than diffusers' `set_chunk_feed_forward`:
diffusers requires the token count to divide by the chunk size, which canvases of other
aspects (e.g. 1024×576: 2304 tokens at 64²) do not. Design notes: docs/methods.md.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

FF_CHUNK_TOKENS = 2048  # (row, token) pairs per feed-forward piece, whatever the batch
ROWS_PER_PIECE = 1  # batch rows per ResNet/resampler piece


def _row_wise_types() -> tuple[type, ...]:
    """Modules whose batch rows never meet: ResNet blocks, resamplers, and the UNet blocks
    made of nothing else (SDXL's 128² `DownBlock2D` / `UpBlock2D`)."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpBlock2D

    return (DownBlock2D, UpBlock2D, ResnetBlock2D, Upsample2D, Downsample2D)


def _is_per_row(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows


class _Wrapper(nn.Module):
    """Holds the original module as `inner` (its weights are not copied) and answers for
    it the attributes callers read (e.g. the UNet reads `up_block.resnets`)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class RowChunked(_Wrapper):
    """Calls `inner` on `rows` batch rows at a time (its rows must be independent) and
    writes the pieces into one output per result tensor. Per-row tensors among the
    arguments (`temb`, a block's tuple of skip connections) are sliced alike, the rest
    (`output_size`, `upsample_size`) passed through; tuple results (a down block's hidden
    states and skips) are assembled leaf by leaf."""

    def __init__(self, inner: nn.Module, rows: int = ROWS_PER_PIECE):
        super().__init__(inner)
        self.rows = rows

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        n = hidden_states.shape[0]
        if n <= self.rows:
            return self.inner(hidden_states, *args, **kwargs)
        outs, spec = None, None
        for start in range(0, n, self.rows):
            part = slice(start, start + self.rows)
            cut = tree_map(lambda v: v[part] if _is_per_row(v, n) else v, (args, kwargs))
            leaves, spec = tree_flatten(self.inner(hidden_states[part], *cut[0], **cut[1]))
            if outs is None:
                outs = _assembly_buffers(leaves, n)
            for i, (out, piece) in enumerate(zip(outs, leaves)):
                if isinstance(piece, torch.Tensor) and not any(out is o for o in outs[:i]):
                    out[part] = piece
            del leaves
        return tree_unflatten(outs, spec)


def _assembly_buffers(leaves: list, rows: int) -> list:
    """One full-batch buffer per tensor of a piece's result; a tensor returned twice (a down
    block's hidden states are also its last skip connection) gets one buffer, as unsplit."""
    buffers: list = []
    for i, t in enumerate(leaves):
        first = next((j for j in range(i) if leaves[j] is t), None)
        if first is not None:
            buffers.append(buffers[first])
        else:
            buffers.append(t.new_empty((rows, *t.shape[1:])) if isinstance(t, torch.Tensor) else t)
    return buffers


class TokenChunked(_Wrapper):
    """Calls a feed-forward `inner` on slices of the tokens (dim 1) holding about `tokens`
    (row, token) pairs each, whatever the batch, and writes the pieces into one output: a
    feed-forward acts on every token alone."""

    def __init__(self, inner: nn.Module, tokens: int = FF_CHUNK_TOKENS):
        super().__init__(inner)
        self.tokens = tokens

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = max(1, self.tokens // hidden_states.shape[0])
        if hidden_states.ndim < 3 or hidden_states.shape[1] <= step:
            return self.inner(hidden_states, *args, **kwargs)
        count = hidden_states.shape[1]
        out = None
        for start in range(0, count, step):
            part = slice(start, start + step)
            piece = self.inner(hidden_states[:, part], *args, **kwargs)
            if out is None:
                out = piece.new_empty((piece.shape[0], count, *piece.shape[2:]))
            out[:, part] = piece
            del piece
        return out


def lean_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of what `lean_activations` wraps: every transformer block's
    feed-forward and every ResNet block, up- / downsampler and attention-free UNet block,
    outermost only (a plain block's ResNets go with it), none inside a wrapper already
    installed."""
    from diffusers.models.attention import FeedForward

    row_wise = _row_wise_types()
    found: list[tuple[str, nn.Module]] = []
    skip: list[str] = []
    for name, module in unet.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, _Wrapper):
            skip.append(name + ".")
        elif name and (isinstance(module, row_wise) or (isinstance(module, FeedForward) and name.endswith(".ff"))):
            found.append((name, module))
            skip.append(name + ".")
    return found


@contextlib.contextmanager
def lean_activations(unet: nn.Module, *, rows: int = ROWS_PER_PIECE,
                     tokens: int = FF_CHUNK_TOKENS) -> Iterator[int]:
    """For the `with` body, run `unet`'s feed-forwards on about `tokens` (row, token) pairs
    at a time and its ResNet blocks, resamplers and attention-free blocks `rows` rows at a
    time (see the module docstring); yields how many modules were wrapped. The originals
    are put back in their parents on exit."""
    if rows < 1 or tokens < 1:
        raise ValueError(f"rows and tokens must be ≥ 1, got rows={rows}, tokens={tokens}")
    row_wise = _row_wise_types()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in lean_targets(unet):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            wrapper = RowChunked(module, rows) if isinstance(module, row_wise) else TokenChunked(module, tokens)
            setattr(parent, child, wrapper)
            swapped.append((parent, child, module))
        yield len(swapped)
    finally:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)
