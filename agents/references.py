"""Reference policies that need no learning: the floor and the ceiling of every comparison."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .base import Agent


class _LayerPolicy(Agent):
    """A policy that looks only at the layer index (read from the observation's one-hot part)."""

    def _decide(self, layer: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def act(self, obs, deterministic: bool = True) -> np.ndarray:
        layer_part = np.asarray(obs["layer"]) if isinstance(obs, dict) else np.asarray(obs)[..., -self.num_layers:]
        return self._decide(layer_part.argmax(-1)).astype(np.int64)


class AlwaysExecute(_LayerPolicy):
    """Every layer runs: the full backbone (the ceiling in score, the floor in speed)."""

    name = "always"

    def __init__(self, num_layers: int = 6):
        self.num_layers = num_layers

    def _decide(self, layer):
        return np.ones_like(layer)

    def state(self) -> dict:
        return {"num_layers": self.num_layers}


class RandomSkip(_LayerPolicy):
    """Skips each layer independently with probability ``rate``."""

    name = "random"

    def __init__(self, rate: float = 0.3, num_layers: int = 6, seed: Optional[int] = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1]; got {rate}")
        self.rate, self.num_layers, self.seed = rate, num_layers, seed
        self.rng = np.random.default_rng(seed)

    def _decide(self, layer):
        return (self.rng.random(np.shape(layer)) >= self.rate).astype(np.int64)

    def state(self) -> dict:
        return {"rate": self.rate, "num_layers": self.num_layers, "seed": self.seed}


class FixedPath(_LayerPolicy):
    """Runs the layers of a fixed path, e.g. ``[1, 0, 1, 0, 1, 0]``, for every input."""

    name = "fixed"

    def __init__(self, path: Sequence[int] = (1, 1, 1, 1, 1, 1)):
        self.path = np.asarray(path, dtype=np.int64)
        if not np.isin(self.path, (0, 1)).all():
            raise ValueError(f"a path holds 0s and 1s; got {list(path)}")
        self.num_layers = len(self.path)

    def _decide(self, layer):
        return self.path[layer]

    def state(self) -> dict:
        return {"path": self.path.tolist()}


class FirstK(FixedPath):
    """BERT-kL: the first ``k`` layers only."""

    name = "first-k"

    def __init__(self, k: int = 4, num_layers: int = 6):
        super().__init__([1] * k + [0] * (num_layers - k))
        self.k = k

    def state(self) -> dict:
        return {"k": self.k, "num_layers": self.num_layers}


class EveryOther(FixedPath):
    """Every other layer (1, 3, 5, ...), as LayerDrop keeps at inference."""

    name = "every-other"

    def __init__(self, num_layers: int = 6):
        super().__init__([1 - (i % 2) for i in range(num_layers)])

    def state(self) -> dict:
        return {"num_layers": self.num_layers}
