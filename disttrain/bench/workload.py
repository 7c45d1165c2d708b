"""What every benchmarked system trains: the MLP's shape, its initial parameters and the synthetic batches.

All systems build the same model (Linear layers with ReLU between them, softmax cross-entropy, float32)
from the same initial parameters and see the same global batches, so their losses agree at the first
step (the report checks this) and their step times compare like for like. Rank r of N takes rows
[r*B/N, (r+1)*B/N) of each global batch of B rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# name -> (layers, global batch): the benchmark's recipes
PRESETS = {
    "default": ((784, 1024, 1024, 10), 512),
    "small": ((784, 256, 10), 128),  # the Fashion-MNIST-shaped MLP of the small-model regime
}
DATA_BATCHES = 4  # distinct global batches cycled through (enough that no step reuses the last one's data)


@dataclass(frozen=True)
class Workload:
    """`layers` (in, hidden..., classes); `global_batch` rows per step over all ranks; Adam's `lr`."""

    layers: tuple
    global_batch: int
    seed: int = 0
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if len(self.layers) < 2 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"layers must be at least two positive sizes (in, ..., classes), got {self.layers}")
        if self.global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {self.global_batch}")

    @property
    def param_count(self) -> int:
        return sum(n_out * n_in + n_out for n_in, n_out in zip(self.layers[:-1], self.layers[1:]))

    def local_batch(self, ranks: int) -> int:
        """Rows per rank; the global batch must split evenly (equal shares keep every system's mean simple)."""
        if self.global_batch % ranks:
            raise ValueError(f"global batch {self.global_batch} does not split evenly over {ranks} ranks")
        return self.global_batch // ranks

    def to_dict(self) -> dict:
        result = asdict(self)
        result["layers"] = list(self.layers)
        result["param_count"] = self.param_count
        return result

    @classmethod
    def from_dict(cls, values: dict) -> "Workload":
        fields = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        fields["layers"] = tuple(int(n) for n in fields["layers"])
        return cls(**fields)


def initial_parameters(workload: Workload) -> list:
    """[(weight (out, in), bias (out,)), ...] float32: He-uniform weights (as disttrain.nn.Linear), zero biases."""
    rng = np.random.default_rng(workload.seed + 1)
    params = []
    for n_in, n_out in zip(workload.layers[:-1], workload.layers[1:]):
        bound = math.sqrt(6.0 / n_in)
        weight = rng.uniform(-bound, bound, size=(n_out, n_in)).astype(np.float32)
        params.append((weight, np.zeros(n_out, np.float32)))
    return params


def local_batches(workload: Workload, rank: int, ranks: int) -> list:
    """This rank's part of each of DATA_BATCHES global batches: [(x float32 (b, in), y int64 (b,)), ...]."""
    rng = np.random.default_rng(workload.seed)
    b = workload.local_batch(ranks)
    n_in, n_classes = workload.layers[0], workload.layers[-1]
    batches = []
    for _ in range(DATA_BATCHES):
        x = rng.standard_normal((workload.global_batch, n_in), dtype=np.float32)
        y = rng.integers(0, n_classes, workload.global_batch).astype(np.int64)
        batches.append((np.ascontiguousarray(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b].copy()))
    return batches
