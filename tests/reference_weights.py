"""The reference README's deterministic-weights recipe (shared by the golden tests)."""
from __future__ import annotations

import torch

from tools.full_size import recipe_tensor


def deterministic_weights(shapes: dict) -> dict[str, torch.Tensor]:
    """Weights from names and shapes alone: the i-th sorted name is seeded with i."""
    return {name: recipe_tensor(name, tuple(shapes[name]), seed=i) for i, name in enumerate(sorted(shapes))}
