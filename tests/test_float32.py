"""No float64 anywhere in a training step: parameters, gradients, the flat buffers, optimizer state and
every intermediate tensor of the graph stay float32 (an accidental upcast doubles time and memory)."""

import numpy as np
import pytest

import disttrain as dt
from disttrain.distributed import DataParallel, ShardedOptimizer, SingleProcessComm
from disttrain.models import cnn, mlp


def _graph_tensors(root):
    seen, stack = {}, [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            stack.extend(node._parents)
    return list(seen.values())


@pytest.mark.parametrize("build", [lambda: mlp((1, 8, 8), 10, hidden=[32, 16], dropout=0.1),
                                   lambda: cnn((1, 8, 8), 10, channels=[4, 8], hidden=16)])
@pytest.mark.parametrize("optimizer_class,hyper", [(dt.optim.Adam, {"weight_decay": 1e-4}),
                                                   (dt.optim.AdamW, {"weight_decay": 1e-2}),
                                                   (dt.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-4})])
def test_every_array_of_a_training_step_is_float32(build, optimizer_class, hyper):
    dt.manual_seed(0)
    ddp = DataParallel(build(), SingleProcessComm())
    optimizer = ShardedOptimizer(optimizer_class, ddp.parameters(), SingleProcessComm(), lr=0.01, **hyper)
    rng = np.random.default_rng(0)
    x = dt.Tensor(rng.random((6, 1, 8, 8)))  # float64 data becomes float32
    loss = dt.nn.SoftmaxLoss()(ddp(x), rng.integers(0, 10, 6))
    intermediates = _graph_tensors(loss)
    loss.backward(np.float32(1.0))
    optimizer.clip_grad_norm(1.0)
    grads = [p.grad for p in ddp.parameters()]
    optimizer.step()
    assert x.dtype == np.float32
    assert {t.dtype for t in intermediates} == {np.dtype(np.float32)}
    assert {g.dtype for g in grads} == {np.dtype(np.float32)}
    assert {p.dtype for p in ddp.parameters()} == {np.dtype(np.float32)}
    assert ddp.flat.flat_params.dtype == ddp.flat.flat_grads.dtype == np.float32
    state = [v for s in optimizer.state for v in s.values() if isinstance(v, np.ndarray)]
    assert state and {v.dtype for v in state} == {np.dtype(np.float32)}
