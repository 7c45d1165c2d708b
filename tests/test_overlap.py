"""Overlapping gradient communication with backward (DataParallel's default) gives the same bits as
combining everything at sync time, under real mpiexec at 2 and 3 ranks (make test-mpi): buckets are
launched from the last to the first as backward completes them, on a background thread."""

import numpy as np
import pytest

import disttrain as dt
from disttrain.data import split_evenly
from disttrain.distributed import DataParallel, ShardedOptimizer, init
from disttrain.distributed.buckets import LateGradientError
from disttrain.optim import SGD, Adam

pytestmark = pytest.mark.mpi(min_size=2)
SMALL_BUCKET_MB = 600 * 4 / 2**20  # about 600 floats: the model below spreads over several buckets


@pytest.fixture(scope="module")
def comm():
    return init(abort_on_exception=False)


class Branchy(dt.nn.Module):
    """An MLP with a side head that only some ranks use on some steps."""

    def __init__(self):
        self.first, self.second, self.out = dt.nn.Linear(9, 40), dt.nn.Linear(40, 30), dt.nn.Linear(30, 5)
        self.side = dt.nn.Linear(40, 5)

    def forward(self, x, use_side=True):
        hidden = self.first(x).tanh()
        out = self.out(self.second(hidden).relu())
        return out + self.side(hidden) if use_side else out


def _train(comm, overlap, strategy, optimizer_class, hyper, steps=4, accumulate=1):
    dt.manual_seed(7)
    ddp = DataParallel(Branchy(), comm, strategy=strategy, bucket_mb=SMALL_BUCKET_MB, overlap=overlap)
    assert len(ddp.layout.buckets) >= 4
    if strategy == "reduce_scatter":
        opt = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    else:
        opt = optimizer_class(ddp.parameters(), **hyper)
    loss_fn = dt.nn.SoftmaxLoss()
    for step in range(steps):
        rng = np.random.default_rng(step)
        x = rng.standard_normal((7 * comm.size + 2, 9)).astype(np.float32)
        y = rng.integers(0, 5, len(x))
        lo, hi = split_evenly(len(x), comm.size, comm.rank)
        parts = np.array_split(np.arange(lo, hi), accumulate)
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            use_side = (step + comm.rank) % 2 == 0  # the side head: some ranks, alternating steps
            if last:
                loss = loss_fn(ddp(dt.Tensor(x[part]), use_side=use_side), y[part])
                loss.backward(np.float32(len(part) / len(x)))
            else:
                with ddp.no_sync():
                    loss = loss_fn(ddp(dt.Tensor(x[part]), use_side=use_side), y[part])
                    loss.backward(np.float32(len(part) / len(x)))
        ddp.sync_gradients(grad_scale=1.0)
        opt.step()
        opt.reset_grad()
        if strategy == "allreduce":
            ddp.new_step()
    return ddp.flat.flat_params.copy()


@pytest.mark.parametrize("strategy,optimizer_class,hyper", [
    ("reduce_scatter", Adam, {"lr": 0.01, "weight_decay": 0.01}),
    ("reduce_scatter", SGD, {"lr": 0.1, "momentum": 0.9}),
    ("allreduce", Adam, {"lr": 0.01})])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_overlapped_training_gives_the_same_bits_as_combining_at_sync(comm, strategy, optimizer_class, hyper,
                                                                      accumulate):
    overlapped = _train(comm, True, strategy, optimizer_class, hyper, accumulate=accumulate)
    at_sync = _train(comm, False, strategy, optimizer_class, hyper, accumulate=accumulate)
    assert np.array_equal(overlapped, at_sync)
    everyone = comm.allgather_object(overlapped.tobytes())
    assert all(other == everyone[0] for other in everyone)  # and every rank holds the same parameters


def test_overlap_is_on_by_default_and_combines_during_backward(comm):
    dt.manual_seed(3)
    ddp = DataParallel(Branchy(), comm, bucket_mb=SMALL_BUCKET_MB)
    opt = ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01)
    assert ddp.overlap and opt.ddp is ddp
    x = np.ones((4, 9), np.float32)
    loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x)), np.zeros(4, np.int64))
    loss.backward()
    assert ddp.combined  # every bucket was combined by the time backward returned
    opt.step()
    assert not ddp.combined


def test_a_second_backward_without_no_sync_is_refused_with_the_fix(comm):
    dt.manual_seed(4)
    ddp = DataParallel(Branchy(), comm, bucket_mb=SMALL_BUCKET_MB)
    ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01)
    x = np.ones((4, 9), np.float32)
    dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x)), np.zeros(4, np.int64)).backward()
    loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x)), np.zeros(4, np.int64))
    with pytest.raises(LateGradientError, match=r"no_sync\(\)"):
        loss.backward()
    ddp.sync_gradients()


def test_on_one_node_auto_topology_keeps_the_flat_collectives(comm):
    dt.manual_seed(5)
    assert comm.node_topology()["nodes"] == 1
    assert DataParallel(Branchy(), comm).hierarchical is False
    assert DataParallel(Branchy(), comm, hierarchical=True).hierarchical is True
    with pytest.raises(ValueError, match="hierarchical must be True, False or 'auto'"):
        DataParallel(Branchy(), comm, hierarchical="yes")


def _lazy_run(comm, lazy, steps=4):
    dt.manual_seed(9)
    ddp = DataParallel(Branchy(), comm, bucket_mb=SMALL_BUCKET_MB)
    opt = ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.02, lazy_gather=lazy)
    loss_fn, losses = dt.nn.SoftmaxLoss(), []
    for step in range(steps):
        rng = np.random.default_rng(50 + step)
        x = rng.standard_normal((6 * comm.size, 9)).astype(np.float32)
        y = rng.integers(0, 5, len(x))
        lo, hi = split_evenly(len(x), comm.size, comm.rank)
        loss = loss_fn(ddp(dt.Tensor(x[lo:hi])), y[lo:hi])
        loss.backward(np.float32((hi - lo) / len(x)))
        losses.append(float(loss.data))
        opt.step()
        opt.reset_grad()
        if lazy and step == 0:
            assert ddp.gathering.pending  # the allgathers were left running
    ddp.wait_for_parameters()
    return ddp.flat.flat_params.copy(), losses


def test_lazy_parameter_gathering_gives_the_same_bits_and_losses(comm):
    eager, eager_losses = _lazy_run(comm, lazy=False)
    lazy, lazy_losses = _lazy_run(comm, lazy=True)
    assert np.array_equal(eager, lazy) and eager_losses == lazy_losses


class ThreeLayers(dt.nn.Module):
    """A chain of three layers over four small buckets; the middle layer's one parameter starts in the
    first bucket and reaches into the third."""

    def __init__(self):
        self.first, self.middle, self.last = dt.nn.Linear(9, 40), dt.nn.Linear(40, 30, bias=False), dt.nn.Linear(30, 5)

    def forward(self, x):
        return self.last(self.middle(self.first(x).tanh()).tanh())


def test_buckets_are_combined_from_the_last_to_the_first_each_once(comm):
    # the order backward completes them in (last layer first); every rank keeps the same order
    dt.manual_seed(6)
    ddp = DataParallel(ThreeLayers(), comm, bucket_mb=SMALL_BUCKET_MB)
    ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01)
    assert ddp.overlap and len(ddp.layout.buckets) >= 4
    combined, reduce = [], ddp.buckets.reduce
    ddp.buckets.reduce = lambda bucket: (combined.append(bucket), reduce(bucket))
    for _ in range(2):
        combined.clear()
        dt.nn.SoftmaxLoss()(ddp(dt.Tensor(np.ones((4, 9), np.float32))), np.zeros(4, np.int64)).backward()
        ddp.sync_gradients()
        ddp.new_step()
        assert combined == sorted(range(len(ddp.layout.buckets)), reverse=True), combined


def test_the_last_layers_buckets_are_launched_while_backward_still_computes_the_first_layer(comm):
    # a parameter's gradient is complete once the ops that read it have run backward: the last layer's
    # buckets go out before backward reaches the first layer, not all together after backward
    dt.manual_seed(6)
    ddp = DataParallel(ThreeLayers(), comm, bucket_mb=SMALL_BUCKET_MB)
    ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01)
    first_weight = next(i for i, p in enumerate(ddp.parameters()) if p is ddp.module.first.weight)
    launched_when_ready, param_ready = {}, ddp.buckets.param_ready

    def recording(index):
        launched_when_ready.setdefault(index, ddp.buckets.launched)
        param_ready(index)
    for slot in ddp.flat.slots:
        slot.listener = recording
    dt.nn.SoftmaxLoss()(ddp(dt.Tensor(np.ones((4, 9), np.float32))), np.zeros(4, np.int64)).backward()
    ddp.sync_gradients()
    assert len(launched_when_ready) == len(ddp.parameters())
    assert launched_when_ready[first_weight] >= 1, launched_when_ready
    # and the first layer's parameters are the last to be complete
    assert max(launched_when_ready.values()) == launched_when_ready[first_weight]


def test_a_lazy_forward_waits_for_every_bucket_a_layers_parameters_lie_in(comm):
    # not only for the one a parameter starts in (the middle layer's weight spans three)
    import time

    dt.manual_seed(8)
    ddp = DataParallel(ThreeLayers(), comm, bucket_mb=SMALL_BUCKET_MB)
    opt = ShardedOptimizer(SGD, ddp.parameters(), comm, lr=0.5, lazy_gather=True)
    lo, hi = [(offset, offset + int(np.prod(shape))) for name, offset, shape in ddp.layout.entries
              if name == "middle.weight"][0]
    spanned = [b for b, (a, z) in enumerate(ddp.layout.buckets) if a < hi and lo < z]
    assert len(spanned) >= 3 and ddp.layout.buckets[spanned[0]][0] <= lo  # the case under test
    allgather = ddp.bucket_comm.allgather

    def slow_allgather(buffer):  # a slow link: each bucket's parameters arrive late
        time.sleep(0.3)
        return allgather(buffer)
    ddp.bucket_comm.allgather = slow_allgather
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    start, stop = split_evenly(len(x), comm.size, comm.rank)
    loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x[start:stop])), np.arange(start, stop) % 5)
    loss.backward(np.float32((stop - start) / len(x)))
    opt.step()
    assert ddp.gathering.pending  # the allgathers are still on their way
    with dt.no_grad():
        during = ddp(dt.Tensor(x)).data.copy()
    ddp.wait_for_parameters()
    with dt.no_grad():
        after = ddp(dt.Tensor(x)).data
    assert np.array_equal(during, after)


class ScaledOutput(dt.nn.Module):
    """ThreeLayers times a learned scale per class. The engine adds up the scale's gradient itself and
    writes it into the scale's bucket only when backward reaches the scale, after every other parameter."""

    def __init__(self):
        self.body = ThreeLayers()
        self.scale = dt.nn.Parameter(np.linspace(0.5, 1.5, 5).astype(np.float32))

    def forward(self, x):
        return self.body(x) * self.scale


def _slow_backward_gradients(comm, overlap):
    import time

    dt.manual_seed(10)
    ddp = DataParallel(ScaledOutput(), comm, bucket_mb=SMALL_BUCKET_MB, overlap=overlap)
    for slot in ddp.flat.slots:
        def then_pause(index, listener=slot.listener):  # backward takes its time between gradients
            listener(index)
            time.sleep(0.1)
        slot.listener = then_pause
    rng = np.random.default_rng(comm.rank)  # each rank its own data: combining is visible
    x = rng.standard_normal((5, 9)).astype(np.float32)
    dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x)), np.arange(5)).backward()
    ddp.sync_gradients()
    return ddp.flat.flat_grads.copy()


def test_a_bucket_is_combined_only_after_its_last_gradient_however_slow_backward_is(comm):
    overlapped = _slow_backward_gradients(comm, overlap=True)
    assert np.array_equal(overlapped, _slow_backward_gradients(comm, overlap=False))
