"""disttrain: data-parallel training on CPUs with numpy autograd, MPI and ZeRO-1 sharded optimizers.

    import disttrain as dt
    model = dt.nn.Sequential(dt.nn.Linear(64, 128), dt.nn.ReLU(), dt.nn.Linear(128, 10))
    loss = dt.nn.SoftmaxLoss()(model(dt.Tensor(x)), y)

Importing disttrain never initialises MPI; `disttrain.distributed.init()` does.
"""

from . import nn, ops, optim
from .nn import default_rng, manual_seed
from .tensor import Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "manual_seed", "default_rng", "nn", "ops", "optim",
           "__version__"]
