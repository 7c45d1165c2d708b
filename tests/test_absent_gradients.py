"""A parameter that gets no gradient on some steps, or on some ranks only, is updated by the sharded
optimizer exactly as one process's optimizer updates it: skipped where it had no gradient anywhere,
with its own step count (Adam's bias correction), and updated from the others' gradient where only
some ranks used it.

The serial test runs in one process (the single-process communicator); the MPI tests run under
`mpiexec -n 2` and `-n 3` (make test-mpi), each rank using the second head only where the schedule says.
"""

import numpy as np
import pytest

import disttrain as dt
from disttrain.data import split_evenly
from disttrain.distributed import DataParallel, ShardedOptimizer, SingleProcessComm, init
from disttrain.optim import SGD, Adam, AdamW

OPTIMIZERS = [(Adam, {"lr": 0.1}), (Adam, {"lr": 0.05, "weight_decay": 0.1}), (AdamW, {"lr": 0.05, "weight_decay": 0.2}),
              (SGD, {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.1})]


class TwoHeads(dt.nn.Module):
    """body -> head a, plus head b where `use_b` says: head b's parameters get no gradient otherwise."""

    def __init__(self):
        self.body, self.a, self.b = dt.nn.Linear(6, 5), dt.nn.Linear(5, 4), dt.nn.Linear(5, 4)

    def forward(self, x, use_b=True):
        hidden = self.body(x).tanh()
        return self.a(hidden) + self.b(hidden) if use_b else self.a(hidden)


def _batch(step, count=12):
    rng = np.random.default_rng(100 + step)
    return rng.standard_normal((count, 6)).astype(np.float32), rng.integers(0, 4, count)


def _twins(seed=3):
    dt.manual_seed(seed)
    first = TwoHeads()
    dt.manual_seed(seed)
    return first, TwoHeads()


def _step_counts(optimizer_state) -> list:
    return [state.get("step") for state in optimizer_state]


@pytest.mark.parametrize("optimizer_class,hyper", OPTIMIZERS)
def test_a_head_unused_at_one_step_keeps_its_own_step_count_as_in_one_process(optimizer_class, hyper):
    sharded_model, plain_model = _twins()
    comm = SingleProcessComm()
    ddp = DataParallel(sharded_model, comm)
    sharded = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    plain = optimizer_class(plain_model.parameters(), **hyper)
    loss_fn = dt.nn.SoftmaxLoss()
    for step in range(4):
        x, y = _batch(step)
        use_b = step != 1
        loss_fn(ddp(dt.Tensor(x), use_b=use_b), y).backward()
        ddp.sync_gradients(grad_scale=1.0)
        sharded.step()
        sharded.reset_grad()
        loss_fn(plain_model(dt.Tensor(x), use_b=use_b), y).backward()
        plain.step()
        plain.reset_grad()
    for (name, p), q in zip(ddp.named_parameters(), plain_model.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-6, atol=1e-7, err_msg=name)
    full = sharded.consolidate_state_dict()
    if optimizer_class is not SGD:
        counts = {name: scalars["step"] for name, scalars in full["parameter_scalars"].items()}
        expected = dict(zip((name for name, _ in plain_model.named_parameters()), _step_counts(plain.state)))
        assert counts == expected and sorted(set(counts.values())) == [3, 4]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("optimizer_class,hyper", OPTIMIZERS)
def test_a_head_used_on_some_ranks_or_steps_only_is_updated_as_by_one_process(optimizer_class, hyper):
    comm = init(abort_on_exception=False)
    sharded_model, plain_model = _twins(seed=5)
    ddp = DataParallel(sharded_model, comm)
    sharded = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    plain = optimizer_class(plain_model.parameters(), **hyper)
    loss_fn = dt.nn.SoftmaxLoss()
    # head b: used by every rank, by no rank, by rank 0 only, by the last rank only
    users_per_step = [set(range(comm.size)), set(), {0}, {comm.size - 1}, set(range(comm.size))]
    for step, users in enumerate(users_per_step):
        x, y = _batch(step, count=5 * comm.size + 1)
        start, stop = split_evenly(len(x), comm.size, comm.rank)
        loss = loss_fn(ddp(dt.Tensor(x[start:stop]), use_b=comm.rank in users), y[start:stop])
        loss.backward(np.float32((stop - start) / len(x)))
        ddp.sync_gradients(grad_scale=1.0)
        sharded.step()
        sharded.reset_grad()
        # one process over the whole global batch: each rank's samples through the model that rank ran
        total = None
        for rank in range(comm.size):
            lo, hi = split_evenly(len(x), comm.size, rank)
            part = loss_fn(plain_model(dt.Tensor(x[lo:hi]), use_b=rank in users), y[lo:hi]) * ((hi - lo) / len(x))
            total = part if total is None else total + part
        total.backward()
        plain.step()
        plain.reset_grad()
    for (name, p), q in zip(ddp.named_parameters(), plain_model.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6, err_msg=name)
    initial, _ = _twins(seed=5)
    moved = np.abs(sharded_model.b.weight.data - initial.b.weight.data).max()
    assert moved > 1e-3  # the head used on one rank only was trained, not frozen
    full = sharded.consolidate_state_dict()
    if comm.rank == 0 and optimizer_class is not SGD:
        counts = {name: scalars["step"] for name, scalars in full["parameter_scalars"].items()}
        assert counts == dict(zip((name for name, _ in plain_model.named_parameters()), _step_counts(plain.state)))
