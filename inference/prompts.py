"""Prompts and seeds per layer: what every method derives from a request the same way."""
from __future__ import annotations

from .request import MAX_SEED, StackRequest


def combine_prompts(layer_prompt: str, global_prompt: str) -> str:
    """The layer's own words first (they decide the content), then the shared scene/style."""
    parts = [p.strip() for p in (layer_prompt, global_prompt) if p and p.strip()]
    return ", ".join(parts)


def blended_prompt(request: StackRequest) -> str:
    """Layer prompts front to back, then the background prompt, then the global prompt: the
    blended image has to depict all of them, and the order tells CLIP which nouns matter."""
    parts = [layer.prompt for layer in reversed(request.layers)] + [request.background, request.prompt]
    return ", ".join(p.strip() for p in parts if p and p.strip())


def prompt_token_positions(tokenizer, layer_prompt: str) -> list[int]:
    """Positions of the layer prompt's tokens in `combine_prompts(layer, global)` (after BOS)."""
    ids = tokenizer(layer_prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    n = max(len(ids) - 2, 1)
    return list(range(1, min(n, tokenizer.model_max_length - 2) + 1))


def derive_seed(seed: int, index: int) -> int:
    """Per-layer seed from the request seed: stable across runs and platforms.

    Index 0 is the background, 1..N the foregrounds. A splitmix64-style mix keeps nearby
    request seeds from giving correlated layer noise.
    """
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & MAX_SEED


def layer_seeds(request: StackRequest) -> list[int]:
    """Background first. Explicit seeds win; others are derived from the request seed."""
    seeds = [request.background_seed if request.background_seed is not None
             else derive_seed(request.seed, 0)]
    for i, layer in enumerate(request.layers, start=1):
        seeds.append(layer.seed if layer.seed is not None else derive_seed(request.seed, i))
    return seeds
