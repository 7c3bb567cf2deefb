"""The reference README's deterministic-weights recipe (shared by the golden tests)."""
from __future__ import annotations

import math

import torch


def deterministic_weights(shapes: dict) -> dict[str, torch.Tensor]:
    """Weights from names and shapes alone: the i-th sorted name is seeded with i."""
    weights = {}
    for i, name in enumerate(sorted(shapes)):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        if len(shape) >= 2:
            weights[name] = r / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            weights[name] = 1 + 0.1 * r
        else:
            weights[name] = 0.1 * r
    return weights
