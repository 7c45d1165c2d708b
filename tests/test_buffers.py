"""BufferPool (disttrain/ops/buffers.py): an array is handed out again only once nothing references it,
and conv/pool training steps that reuse the previous step's arrays compute what fresh arrays compute."""

import numpy as np

import disttrain as dt
from disttrain.models import cnn
from disttrain.ops import images
from disttrain.ops.buffers import BufferPool
from disttrain.tensor import Tensor


def test_an_array_is_not_handed_out_while_a_view_or_a_tensor_of_it_is_held():
    pool = BufferPool()
    first = pool.empty((4, 5))
    first_id = id(first)
    tensor = Tensor.wrap(first.T[:, ::2])  # a view of a view, held by a Tensor
    del first
    held = [pool.empty((4, 5)) for _ in range(3)]
    assert first_id not in {id(a) for a in held}
    del tensor
    assert id(pool.empty((4, 5))) == first_id  # the first free array in the pool


def test_a_released_array_of_the_same_shape_and_dtype_is_reused():
    pool = BufferPool()
    array = pool.empty((3, 7), np.float32)
    array_id = id(array)
    del array
    assert id(pool.empty((3, 7), np.float32)) == array_id
    assert id(pool.empty((3, 7), np.float64)) != array_id and id(pool.empty((7, 3), np.float32)) != array_id


def test_past_its_limit_the_pool_releases_free_arrays_and_keeps_those_in_use():
    pool = BufferPool(limit_bytes=1000)
    held = pool.empty((100,), np.float32)  # 400 bytes
    spare = pool.empty((100,), np.float32)
    del spare
    assert pool.pooled_bytes == 800
    other = pool.empty((150,), np.float32)  # 600 more: over the limit, so the free one goes
    assert pool.pooled_bytes == 1000
    assert pool.empty((100,), np.float32) is not held
    del other, held


def _train_steps(model, batches, keep_graphs):
    """Loss values and final parameters after Adam steps; keep_graphs holds every step's loss tensor
    (and so its whole graph) until the end, so no array can be reused across steps."""
    optimizer = dt.optim.Adam(model.parameters(), lr=0.01)
    loss_fn, kept, losses = dt.nn.SoftmaxLoss(), [], []
    for x, y in batches:
        loss = loss_fn(model(Tensor.wrap(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.data))
        if keep_graphs:
            kept.append(loss)
    return losses, [p.data.copy() for p in model.parameters()]


def test_cnn_steps_reusing_arrays_train_exactly_as_steps_on_fresh_arrays():
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((64, 1, 16, 16), dtype=np.float32), rng.integers(0, 10, 64)) for _ in range(4)]
    images.work_arrays.clear()
    dt.manual_seed(1)
    reused = _train_steps(cnn((1, 16, 16), 10, channels=(8, 16), hidden=[]), batches * 2, keep_graphs=False)
    pooled = images.work_arrays.pooled_bytes
    assert pooled > 0
    images.work_arrays.clear()
    dt.manual_seed(1)
    fresh = _train_steps(cnn((1, 16, 16), 10, channels=(8, 16), hidden=[]), batches * 2, keep_graphs=True)
    assert reused[0] == fresh[0]
    for a, b in zip(reused[1], fresh[1]):
        np.testing.assert_array_equal(a, b)


def test_a_graph_kept_across_another_forward_keeps_its_own_arrays():
    rng = np.random.default_rng(1)
    x1, x2 = (rng.standard_normal((32, 2, 8, 8), dtype=np.float32) for _ in range(2))
    dt.manual_seed(2)
    conv = dt.nn.Conv2d(2, 4, 3, padding=1)
    alone = dt.ops.max_pool2d(conv(Tensor.wrap(x1)), 2, relu=True).sum()
    alone.backward()
    expected = conv.weight.grad.copy()
    conv.zero_grad()
    first = dt.ops.max_pool2d(conv(Tensor.wrap(x1)), 2, relu=True).sum()
    dt.ops.max_pool2d(conv(Tensor.wrap(x2)), 2, relu=True).sum().backward()  # a second graph, then dropped
    conv.zero_grad()
    first.backward()
    np.testing.assert_array_equal(conv.weight.grad, expected)
