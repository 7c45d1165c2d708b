"""A parameter that has a gradient on some ranks only, under a real MPI job (`make test` runs this
file with `mpiexec -n 2` and `-n 3`).

Rank 0's forward uses a second head that the other ranks' forwards never touch, so after backward
that head's `.grad` is None everywhere but on rank 0. The ranks must still agree that the head has a
gradient (it has one somewhere), combine it with zeros from the other ranks, and update it exactly as
one process updates it after one backward over the whole global batch (rank 0's samples through both
heads, the others' through the first only). An agreement that marked the head as absent unless every
rank had a gradient would freeze it instead.
"""

import numpy as np
import pytest

import disttrain as dt
from disttrain.distributed import DataParallel, ShardedOptimizer, init
from disttrain.optim import SGD, Adam

pytestmark = pytest.mark.mpi(min_size=2)

PER_RANK = 4  # equal shares: the default gradient scale (1 / world size) then gives the global mean
STEPS = 3


@pytest.fixture(scope="module")
def comm():
    return init(abort_on_exception=False)


class TwoHeads(dt.nn.Module):
    """A body, a head every sample goes through, and an extra head only some samples go through."""

    def __init__(self):
        self.body, self.head, self.extra = dt.nn.Linear(6, 8), dt.nn.Linear(8, 4), dt.nn.Linear(8, 4)

    def forward(self, x, use_extra: bool):
        hidden = self.body(x).tanh()
        return self.head(hidden) + self.extra(hidden) if use_extra else self.head(hidden)


def _global_batch(world_size, step):
    rng = np.random.default_rng(100 + step)
    count = PER_RANK * world_size
    return rng.standard_normal((count, 6)).astype(np.float32), rng.integers(0, 4, count)


def _single_process_step(model, optimizer, x, y, world_size):
    """One process, the whole global batch: the mean loss over every sample, rank 0's part through
    the extra head, one backward, one update."""
    loss_fn, total = dt.nn.SoftmaxLoss(), len(x)
    loss = None
    for rank in range(world_size):
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        term = loss_fn(model(dt.Tensor(x[part]), rank == 0), y[part]) * (PER_RANK / total)
        loss = term if loss is None else loss + term
    loss.backward()
    optimizer.step()
    optimizer.reset_grad()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "at-sync"])
@pytest.mark.parametrize("strategy", ["reduce_scatter", "allreduce"])
@pytest.mark.parametrize("optimizer_class,hyper", [(Adam, {"lr": 0.05, "weight_decay": 0.01}),
                                                   (SGD, {"lr": 0.2, "momentum": 0.9})],
                         ids=["adam", "sgd-momentum"])
def test_a_head_used_on_rank_0_only_is_updated_as_by_one_process_over_the_global_batch(
        comm, strategy, optimizer_class, hyper, overlap):
    dt.manual_seed(21)
    model = TwoHeads()
    # tiny buckets: the extra head's elements are spread over several buckets and owners
    ddp = DataParallel(model, comm, strategy=strategy, bucket_mb=0.0002, overlap=overlap)
    sharded = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    dt.manual_seed(21)
    single = TwoHeads()
    plain = optimizer_class(single.parameters(), **hyper)
    initial_extra = {name: p.data.copy() for name, p in single.named_parameters() if name.startswith("extra.")}

    for step in range(STEPS):
        x, y = _global_batch(comm.size, step)
        mine = slice(comm.rank * PER_RANK, (comm.rank + 1) * PER_RANK)
        loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x[mine]), comm.rank == 0), y[mine])
        loss.backward()
        if not overlap:  # with overlap, backward has already combined the gradients when it returns
            assert (model.extra.weight.grad is None) == (comm.rank != 0)  # the case under test
        sharded.step()
        sharded.reset_grad()
        _single_process_step(single, plain, x, y, comm.size)

    everyone = comm.allgather_object([p.data.tobytes() for p in ddp.parameters()])
    assert all(blobs == everyone[0] for blobs in everyone), "replicas differ"
    for (name, p), (_, q) in zip(ddp.named_parameters(), single.named_parameters()):
        assert np.all(np.isfinite(p.data)), name
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, before in initial_extra.items():
        moved = dict(ddp.named_parameters())[name].data
        assert np.max(np.abs(moved - before)) > 1e-3, f"{name} did not move: the extra head was not trained"
