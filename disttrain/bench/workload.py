"""What every benchmarked system trains: the model's shape, its initial parameters and the synthetic batches.

All systems build the same model from the same initial parameters and see the same global batches
(softmax cross-entropy, float32), so their losses agree at the first step (the report checks this)
and their step times compare like for like. Rank r of N takes rows [r*B/N, (r+1)*B/N) of each global
batch of B rows. Two models:
  mlp  Linear layers with ReLU between them, sizes `layers` = (in, hidden..., classes);
  cnn  the Fashion-MNIST CNN: each row of `layers[0]` features is an `image` (C, H, W); per width in
       `channels` a 3x3 convolution (padding 1), ReLU and 2x2 max-pooling; then Linear(classes),
       `layers` = (C*H*W, classes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# name -> the Workload fields that make the recipe
PRESETS = {
    "default": {"layers": (784, 1024, 1024, 10), "global_batch": 512},
    "small": {"layers": (784, 256, 10), "global_batch": 128},  # the Fashion-MNIST-shaped MLP
    "cnn": {"model": "cnn", "layers": (784, 10), "image": (1, 28, 28), "channels": (16, 32),
            "global_batch": 128},  # conv16-pool-conv32-pool-Linear(1568, 10), as examples/fashion_cnn.toml
}
MODELS = ("mlp", "cnn")
# what the per-op breakdown of the cnn workload times (the rest of the step is "rest")
OP_CATEGORIES = ("conv forward", "conv backward", "pool forward", "pool backward")
DATA_BATCHES = 4  # distinct global batches cycled through (enough that no step reuses the last one's data)


@dataclass(frozen=True)
class Workload:
    """`model` ("mlp" or "cnn", see the module docstring); `layers` (in, hidden..., classes), for the cnn
    (in, classes); cnn only: `image` (C, H, W) with C*H*W = in, `channels` of the conv blocks;
    `global_batch` rows per step over all ranks; Adam's `lr`, betas and eps."""

    layers: tuple
    global_batch: int
    seed: int = 0
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    model: str = "mlp"
    image: tuple = ()
    channels: tuple = ()

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if len(self.layers) < 2 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"layers must be at least two positive sizes (in, ..., classes), got {self.layers}")
        if self.global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {self.global_batch}")
        if self.model == "cnn":
            c, h, w = self.image if len(self.image) == 3 else (0, 0, 0)
            if len(self.layers) != 2 or c * h * w != self.layers[0] or h % 2 ** len(self.channels) \
                    or w % 2 ** len(self.channels) or not self.channels:
                raise ValueError(f"cnn workload: layers must be (C*H*W, classes) for image (C, H, W) with H and W "
                                 f"divisible by 2 per conv block, got layers {self.layers}, image {self.image}, "
                                 f"channels {self.channels}")

    @property
    def param_count(self) -> int:
        return sum(math.prod(weight) + math.prod(bias) for weight, bias in parameter_shapes(self))

    def describe(self) -> str:
        """e.g. 'MLP 784-256-10' or 'CNN 1x28x28 conv3x3 16 > ReLU > pool2 > conv3x3 32 > ReLU > pool2 > Linear(1568, 10)'."""
        if self.model == "mlp":
            return "MLP " + "-".join(map(str, self.layers))
        blocks = " > ".join(f"conv3x3 {c} > ReLU > pool2" for c in self.channels)
        return f"CNN {'x'.join(map(str, self.image))} {blocks} > Linear({self.flat_features}, {self.layers[-1]})"

    @property
    def flat_features(self) -> int:
        """cnn: the features entering the final Linear layer."""
        _, h, w = self.image
        shrink = 2 ** len(self.channels)
        return self.channels[-1] * (h // shrink) * (w // shrink)

    def local_batch(self, ranks: int) -> int:
        """Rows per rank; the global batch must split evenly (equal shares keep every system's mean simple)."""
        if self.global_batch % ranks:
            raise ValueError(f"global batch {self.global_batch} does not split evenly over {ranks} ranks")
        return self.global_batch // ranks

    def to_dict(self) -> dict:
        result = asdict(self)
        for key in ("layers", "image", "channels"):
            result[key] = list(getattr(self, key))
        result["param_count"] = self.param_count
        result["description"] = self.describe()
        return result

    @classmethod
    def from_dict(cls, values: dict) -> "Workload":
        fields = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("layers", "image", "channels"):
            if key in fields:
                fields[key] = tuple(int(n) for n in fields[key])
        return cls(**fields)


def parameter_shapes(workload: Workload) -> list:
    """[(weight shape, bias shape), ...] in layer order."""
    if workload.model == "mlp":
        return [((n_out, n_in), (n_out,)) for n_in, n_out in zip(workload.layers[:-1], workload.layers[1:])]
    shapes, c_in = [], workload.image[0]
    for c_out in workload.channels:
        shapes.append(((c_out, c_in, 3, 3), (c_out,)))
        c_in = c_out
    return shapes + [((workload.layers[-1], workload.flat_features), (workload.layers[-1],))]


def initial_parameters(workload: Workload) -> list:
    """[(weight, bias), ...] float32 in layer order: weights He-uniform over their fan-in (as disttrain's
    Linear and Conv2d: in_features, or in_channels * 3 * 3), zero biases. Linear weights are (out, in),
    conv weights (out, in, 3, 3)."""
    rng = np.random.default_rng(workload.seed + 1)
    params = []
    for weight_shape, bias_shape in parameter_shapes(workload):
        bound = math.sqrt(6.0 / math.prod(weight_shape[1:]))
        weight = rng.uniform(-bound, bound, size=weight_shape).astype(np.float32)
        params.append((weight, np.zeros(bias_shape, np.float32)))
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
