"""DataParallel, ShardedOptimizer, the communicator and the sampler on every rank of a real MPI job.

Run by `make test` as `mpiexec -n 2` and `-n 3 ... pytest --with-mpi --only-mpi`. Each test compares
what the ranks computed together with what one process computes alone on the whole global batch.
"""

import numpy as np
import pytest

import disttrain as dt
from disttrain.data import DistributedSampler, split_evenly
from disttrain.distributed import DataParallel, ModelMismatchError, ShardedOptimizer, init
from disttrain.optim import SGD, Adam, clip_grad_norm

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return init(abort_on_exception=False)


def _model(seed, widths=(6, 10, 4)):
    dt.manual_seed(seed)
    return dt.nn.Sequential(dt.nn.Linear(widths[0], widths[1]), dt.nn.Tanh(), dt.nn.Linear(widths[1], widths[2]))


def _batch(count=13, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 6)).astype(np.float32), rng.integers(0, 4, count)


def _local_part(comm, x, y):
    start, stop = split_evenly(len(x), comm.size, comm.rank)
    return x[start:stop], y[start:stop]


def _backward(ddp, x, y, global_count):
    """Backward of this rank's share of the global mean loss, then the gradient sync (COLLECTIVE)."""
    if len(x):
        loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x)), y)
        loss.backward(np.float32(len(x) / global_count))
    ddp.sync_gradients(grad_scale=1.0)  # the backward seed already weighted this rank's share


# ----------------------------------------------------------------------------------- communicator
def test_collectives_sum_gather_and_broadcast_float32_buffers(comm):
    values = np.full(4, comm.rank + 1, np.float32)
    comm.allreduce(values)
    assert values.dtype == np.float32 and np.all(values == comm.size * (comm.size + 1) / 2)
    send = np.arange(3 * comm.size, dtype=np.float32) * (comm.rank + 1)
    recv = np.empty(3, np.float32)
    comm.reduce_scatter(send, recv)
    expected = np.arange(3 * comm.size, dtype=np.float32)[3 * comm.rank:3 * comm.rank + 3] * comm.size * (comm.size + 1) / 2
    np.testing.assert_array_equal(recv, expected)
    gathered = np.zeros(2 * comm.size, np.float32)
    gathered[2 * comm.rank:2 * comm.rank + 2] = comm.rank
    comm.allgather(gathered)
    np.testing.assert_array_equal(gathered, np.repeat(np.arange(comm.size, dtype=np.float32), 2))
    shared = np.full(5, float(comm.rank), np.float32)
    comm.broadcast(shared, root=comm.size - 1)
    assert np.all(shared == comm.size - 1)
    assert comm.any_true(comm.rank == comm.size - 1) is True
    assert comm.any_true(False) is False


def test_collectives_refuse_non_contiguous_buffers(comm):
    with pytest.raises(ValueError, match="C-contiguous"):
        comm.allreduce(np.zeros((4, 4), np.float32)[:, 1])


# ------------------------------------------------------------------------------------ DataParallel
def test_data_parallel_starts_every_rank_from_rank_0_parameters(comm):
    model = _model(seed=100 + comm.rank)  # deliberately different on every rank
    reference = _model(seed=100)
    ddp = DataParallel(model, comm)
    for (name, p), (_, q) in zip(ddp.named_parameters(), reference.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
        assert p.data.base is ddp.flat.flat_params  # a view, not a copy


def test_model_mismatch_raises_on_every_rank_naming_both_sides(comm):
    widths = (6, 10 + (comm.rank == comm.size - 1), 4)
    with pytest.raises(ModelMismatchError) as error:
        DataParallel(_model(0, widths), comm)
    message = str(error.value)
    assert "'0.weight' shape (10, 6)" in message and "'0.weight' shape (11, 6)" in message
    assert f"rank {comm.size - 1}" in message


def test_parameter_without_gradient_on_one_rank_takes_part_as_zeros(comm):
    class TwoHeads(dt.nn.Module):
        def __init__(self):
            self.body, self.head_a, self.head_b = dt.nn.Linear(6, 5), dt.nn.Linear(5, 4), dt.nn.Linear(5, 4)

        def forward(self, x, use_b):
            return (self.head_b if use_b else self.head_a)(self.body(x).relu())

    dt.manual_seed(1)
    ddp = DataParallel(TwoHeads(), comm, strategy="allreduce", overlap=False)  # local gradients until the sync
    x, y = _batch(4)
    loss = dt.nn.SoftmaxLoss()(ddp(dt.Tensor(x), comm.rank == 0), y)
    loss.backward()
    local_head_b = ddp.module.head_b.weight.grad
    assert (local_head_b is None) == (comm.rank != 0)  # only rank 0 used head_b
    rank0_first = float(local_head_b.reshape(-1)[0]) if comm.rank == 0 else 0.0
    ddp.sync_gradients()
    head_b = ddp.module.head_b.weight
    # rank 0's head_b gradient, averaged with zeros from the other ranks; after the sync every rank
    # holds that combined gradient (a replicated optimizer must update head_b on every rank alike)
    offset = [offset for name, offset, _ in ddp.layout.entries if name == "head_b.weight"][0]
    summed = ddp.flat.flat_grads[offset]
    assert head_b.grad is not None and head_b.grad.reshape(-1)[0] == summed
    local = np.zeros(1, np.float32) if comm.rank else np.array([rank0_first], np.float32)
    comm.allreduce(local)
    np.testing.assert_allclose(summed, local[0] / comm.size, rtol=1e-6)


# -------------------------------------------------------------------------------- ShardedOptimizer
@pytest.mark.parametrize("strategy", ["reduce_scatter", "allreduce"])
@pytest.mark.parametrize("optimizer_class,hyper", [(Adam, {"lr": 0.05, "weight_decay": 0.01}),
                                                   (SGD, {"lr": 0.2, "momentum": 0.9})])
def test_sharded_steps_match_a_single_process_and_keep_replicas_identical(comm, strategy, optimizer_class, hyper):
    ddp = DataParallel(_model(2), comm, strategy=strategy, bucket_mb=0.0002)
    sharded = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    single = _model(2)
    plain = optimizer_class(single.parameters(), **hyper)
    for step in range(4):
        x, y = _batch(13, seed=step)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        sharded.step()
        sharded.reset_grad()
        dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
        plain.step()
        plain.reset_grad()
        everyone = comm.allgather_object(ddp.flat.flat_params.tobytes())
        assert all(blob == everyone[0] for blob in everyone), f"replicas differ after step {step}"
    for (name, p), (_, q) in zip(ddp.named_parameters(), single.named_parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6, err_msg=name)


def test_optimizer_state_per_rank_is_the_full_state_divided_by_the_world_size(comm):
    model = _model(3, widths=(6, 200, 4))
    ddp = DataParallel(model, comm)
    sharded = ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.01)
    x, y = _batch(13)
    _backward(ddp, *_local_part(comm, x, y), len(x))
    sharded.step()
    full = 2 * ddp.layout.total * 4  # Adam: m and v, float32
    per_rank = sharded.state_bytes()
    assert comm.allreduce(np.array([float(per_rank)]), "sum")[0] == full  # each element's state is held once
    assert abs(per_rank - full / comm.size) <= 2 * 4 * 16 * comm.size  # ranks differ by alignment padding only
    assert all(v.dtype == np.float32 for s in sharded.state for v in s.values() if isinstance(v, np.ndarray))
    replicated_ddp = DataParallel(_model(3, widths=(6, 200, 4)), comm, strategy="allreduce")
    replicated = ShardedOptimizer(Adam, replicated_ddp.parameters(), comm, shard=False, lr=0.01)
    _backward(replicated_ddp, *_local_part(comm, x, y), len(x))
    replicated.step()
    assert replicated.state_bytes() >= full


def test_clip_grad_norm_over_shards_equals_the_single_process_norm(comm):
    ddp = DataParallel(_model(4), comm)
    sharded = ShardedOptimizer(SGD, ddp.parameters(), comm, lr=0.1)
    single = _model(4)
    x, y = _batch(13, seed=9)
    _backward(ddp, *_local_part(comm, x, y), len(x))
    dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
    expected = clip_grad_norm(single.parameters(), 0.05)
    norm = sharded.clip_grad_norm(0.05)
    assert norm == pytest.approx(expected, rel=1e-5)
    sharded.step()
    SGD(single.parameters(), lr=0.1).step()
    for p, q in zip(ddp.parameters(), single.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7)


def test_consolidated_state_equals_the_single_process_state(comm):
    ddp = DataParallel(_model(5), comm)
    sharded = ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.02)
    single = _model(5)
    plain = Adam(single.parameters(), lr=0.02)
    for step in range(3):
        x, y = _batch(11, seed=20 + step)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        sharded.step()
        sharded.reset_grad()
        dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
        plain.step()
        plain.reset_grad()
    full = sharded.consolidate_state_dict()
    if comm.rank != 0:
        assert full is None
        return
    assert full["scalars"]["step"] == 3
    for (name, _), state in zip(single.named_parameters(), plain.state):
        np.testing.assert_allclose(full["state"]["exp_avg"][name], state["exp_avg"], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(full["state"]["exp_avg_sq"][name], state["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_sharded_state_dict_round_trip_gives_identical_next_steps(comm):
    def trained(steps_before):
        ddp = DataParallel(_model(6), comm)
        opt = ShardedOptimizer(Adam, ddp.parameters(), comm, lr=0.03)
        for step in range(steps_before):
            x, y = _batch(9, seed=step)
            _backward(ddp, *_local_part(comm, x, y), len(x))
            opt.step()
            opt.reset_grad()
        return ddp, opt

    ddp_a, opt_a = trained(2)
    saved = opt_a.state_dict()
    params = ddp_a.flat.flat_params.copy()
    ddp_b, opt_b = trained(0)
    ddp_b.flat.flat_params[...] = params
    opt_b.load_state_dict(saved)
    for ddp, opt in ((ddp_a, opt_a), (ddp_b, opt_b)):
        x, y = _batch(9, seed=50)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        opt.step()
    np.testing.assert_array_equal(ddp_a.flat.flat_params, ddp_b.flat.flat_params)


# ----------------------------------------------------------------------------------------- sampler
def test_sampler_parts_of_each_global_batch_cover_it_exactly_once(comm):
    sampler = DistributedSampler(23, comm.size, comm.rank, seed=4)
    sampler.set_epoch(1)
    reference = DistributedSampler(23, 1, 0, seed=4)
    reference.set_epoch(1)
    mine = [(list(idx), count) for idx, count in sampler.batches(5)]
    everyone = comm.allgather_object(mine)
    for b, (global_idx, count) in enumerate(reference.batches(5)):
        parts = [everyone[r][b][0] for r in range(comm.size)]
        assert sum(parts, []) == list(global_idx) and all(everyone[r][b][1] == count for r in range(comm.size))
    assert len({len(m) for m in everyone}) == 1  # every rank runs the same number of steps


def test_no_sync_accumulates_micro_batches_locally_and_one_sync_combines_them(comm):
    ddp = DataParallel(_model(7), comm, strategy="allreduce")
    single = _model(7)
    batches = [_batch(7, seed=30), _batch(6, seed=31)]
    total = sum(len(x) for x, _ in batches)
    with ddp.no_sync():
        for x, y in batches:
            part_x, part_y = _local_part(comm, x, y)
            if len(part_x):
                dt.nn.SoftmaxLoss()(ddp(dt.Tensor(part_x)), part_y).backward(np.float32(len(part_x) / total))
            ddp.sync_gradients(grad_scale=1.0)  # a no-op inside no_sync
            assert not ddp.synced
    ddp.sync_gradients(grad_scale=1.0)
    x_all = np.concatenate([x for x, _ in batches])
    y_all = np.concatenate([y for _, y in batches])
    dt.nn.SoftmaxLoss()(single(dt.Tensor(x_all)), y_all).backward()
    for (name, p), q in zip(ddp.named_parameters(), single.parameters()):
        offset = dict((n, o) for n, o, _ in ddp.layout.entries)[name]
        combined = ddp.flat.flat_grads[offset:offset + q.size].reshape(q.shape)
        np.testing.assert_allclose(combined, q.grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_parallel_evaluation_scores_every_sample_once_and_equals_one_process(comm, tmp_path_factory):
    from disttrain.data import ArrayDataset
    from disttrain.trainer import Trainer

    x, y = _batch(23, seed=40)  # 23 samples: uneven parts on 2 and 3 ranks
    test = ArrayDataset(x, y)
    model = _model(8)
    run_dir = str(tmp_path_factory.mktemp("eval")) if comm.rank == 0 else None
    trainer = Trainer(model, ArrayDataset(x, y), dt.nn.SoftmaxLoss(), test, comm,
                      training={"batch_size": 8, "progress": "none", "run_dir": comm.broadcast_object(run_dir)})
    result = trainer.evaluate()
    with dt.no_grad():
        logits = _model(8)(dt.Tensor(x))
    expected_loss = float(dt.nn.SoftmaxLoss()(logits, y).data)
    expected_accuracy = float(np.mean(logits.data.argmax(axis=1) == y))
    assert result["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert result["test_accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)


def test_default_data_parallel_with_a_plain_optimizer_trains_like_one_process(comm):
    ddp = DataParallel(_model(9), comm)  # strategy "auto": allreduce unless a sharded optimizer adopts it
    plain = SGD(ddp.parameters(), lr=0.3, momentum=0.5)
    single = _model(9)
    reference = SGD(single.parameters(), lr=0.3, momentum=0.5)
    for step in range(3):
        x, y = _batch(11, seed=60 + step)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        plain.step()
        plain.reset_grad()
        dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
        reference.step()
        reference.reset_grad()
    for p, q in zip(ddp.parameters(), single.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7)


def test_after_a_reduce_scatter_no_parameter_offers_a_partial_gradient(comm):
    ddp = DataParallel(_model(10), comm, strategy="reduce_scatter")
    x, y = _batch(8)
    _backward(ddp, *_local_part(comm, x, y), len(x))
    assert all(p.grad is None for p in ddp.parameters())  # the buffer outside this rank's chunks is scratch


class _HeadsModel(dt.nn.Module):
    def __init__(self):
        self.body, self.used, self.unused = dt.nn.Linear(6, 5), dt.nn.Linear(5, 4), dt.nn.Linear(5, 4)

    def forward(self, x):
        return self.used(self.body(x).tanh())


@pytest.mark.parametrize("optimizer_class,hyper", [(Adam, {"lr": 0.05, "weight_decay": 0.1}),
                                                   (SGD, {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.1})])
def test_a_parameter_without_gradient_on_every_rank_is_left_alone_as_by_one_process(comm, optimizer_class, hyper):
    dt.manual_seed(11)
    ddp = DataParallel(_HeadsModel(), comm)
    sharded = ShardedOptimizer(optimizer_class, ddp.parameters(), comm, **hyper)
    dt.manual_seed(11)
    single = _HeadsModel()
    plain = optimizer_class(single.parameters(), **hyper)
    for step in range(3):
        x, y = _batch(10, seed=70 + step)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        sharded.step()
        sharded.reset_grad()
        dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
        plain.step()
        plain.reset_grad()
    for (name, p), q in zip(ddp.named_parameters(), single.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7, err_msg=name)
    full = sharded.consolidate_state_dict()
    if comm.rank == 0:
        key = "exp_avg" if optimizer_class is Adam else "momentum_buffer"
        assert not np.any(full["state"][key]["unused.weight"])  # as fresh: the update never touched it


class _ReplacingSGD(dt.optim.Optimizer):
    """A user's optimizer written the seed's way: it replaces p.data instead of updating it in place."""

    def __init__(self, params, lr):
        super().__init__(params)
        self.lr = lr

    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.data = p.data - self.lr * np.asarray(p.grad)


def test_a_user_optimizer_that_replaces_data_still_trains_the_shared_parameters(comm):
    ddp = DataParallel(_model(12), comm)
    sharded = ShardedOptimizer(_ReplacingSGD, ddp.parameters(), comm, lr=0.5)
    single = _model(12)
    plain = _ReplacingSGD(single.parameters(), lr=0.5)
    for step in range(3):
        x, y = _batch(9, seed=80 + step)
        _backward(ddp, *_local_part(comm, x, y), len(x))
        sharded.step()
        sharded.reset_grad()
        dt.nn.SoftmaxLoss()(single(dt.Tensor(x)), y).backward()
        plain.step()
        plain.reset_grad()
    for p, q in zip(ddp.parameters(), single.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-7)


def test_a_replaced_parameter_is_put_back_into_the_flat_buffer_at_the_next_sync(comm):
    ddp = DataParallel(_model(13), comm, strategy="allreduce")
    weight = ddp.module.layers[0].weight
    weight.data = np.zeros(weight.shape, np.float32)  # replaced, not updated in place
    x, y = _batch(6)
    _backward(ddp, *_local_part(comm, x, y), len(x))
    offset = ddp.layout.entries[0][1]
    assert weight.data.base is ddp.flat.flat_params
    assert not np.any(ddp.flat.flat_params[offset:offset + weight.size])


def test_sharded_optimizer_hyperparameters_are_keyword_only(comm):
    ddp = DataParallel(_model(14), comm)
    with pytest.raises(TypeError):
        ShardedOptimizer(SGD, ddp.parameters(), comm, 0.5)
