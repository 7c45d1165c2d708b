"""Every differentiable op: forward against a direct numpy computation, backward against central finite
differences in float64, and dtype discipline (a float32 graph stays float32, outputs and gradients).

Each case is (name, fn, reference, input specs). `fn` takes Tensors; `reference` takes the same inputs as
numpy arrays and computes the forward independently. Non-differentiable arguments (labels, indices,
conditions) are fixed inside the closures.
"""

import itertools
import math

import numpy as np
import pytest

from disttrain import ops
from disttrain.tensor import Tensor, no_grad

EPS = 1e-6


# ----------------------------------------------------------------------------------- the generic helper
def gradcheck(fn, arrays, rng, atol=1e-6, rtol=1e-5):
    """Compare every input's analytic gradient of sum(fn(*inputs) * w), w random, with central differences."""
    inputs = [Tensor(np.array(a, dtype=np.float64), requires_grad=True, dtype=np.float64) for a in arrays]
    out = fn(*inputs)
    assert out.dtype == np.float64
    weights = rng.standard_normal(out.shape)
    out.backward(weights)

    def objective():
        with no_grad():
            return float(np.sum(fn(*inputs).data * weights))

    for k, tensor in enumerate(inputs):
        assert tensor.grad is not None, f"input {k} got no gradient"
        assert tensor.grad.shape == tensor.shape and tensor.grad.dtype == np.float64
        numeric = np.zeros(tensor.shape)
        for index in np.ndindex(*tensor.shape):
            original = tensor.data[index]
            tensor.data[index] = original + EPS
            plus = objective()
            tensor.data[index] = original - EPS
            minus = objective()
            tensor.data[index] = original
            numeric[index] = (plus - minus) / (2 * EPS)
        np.testing.assert_allclose(tensor.grad, numeric, atol=atol, rtol=rtol, err_msg=f"input {k}")


def make_inputs(specs, rng):
    """specs: (shape, kind) with kind "any" (normal), "pos" (in [0.5, 2]) or "away0" (|x| >= 0.2)."""
    arrays = []
    for shape, kind in specs:
        if kind == "pos":
            arrays.append(rng.uniform(0.5, 2.0, size=shape))
        elif kind == "away0":
            x = rng.standard_normal(shape)
            arrays.append(x + np.where(x >= 0, 0.2, -0.2))
        else:
            arrays.append(rng.standard_normal(shape))
    return arrays


# ---------------------------------------------------------------------------- naive numpy references
def conv2d_loops(x, w, b=None, stride=(1, 1), padding=(0, 0)):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, o, oh, ow))
    for i, oc, r, s in itertools.product(range(n), range(o), range(oh), range(ow)):
        out[i, oc, r, s] = np.sum(xp[i, :, r * sh:r * sh + kh, s * sw:s * sw + kw] * w[oc])
        if b is not None:
            out[i, oc, r, s] += b[oc]
    return out


def max_pool_loops(x, kernel, stride):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((n, c, oh, ow))
    for i, ch, r, s in itertools.product(range(n), range(c), range(oh), range(ow)):
        out[i, ch, r, s] = x[i, ch, r * sh:r * sh + kh, s * sw:s * sw + kw].max()
    return out


def np_logsumexp(x, axis, keepdims=False):
    return np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))


def np_softmax(x, axis):
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_cross_entropy(logits, labels):
    """Per-row -log softmax(logits)[label], written out the long way."""
    return np.array([-math.log(math.exp(row[y]) / np.exp(row).sum()) for row, y in zip(logits, labels)])


LABELS = np.array([2, 0, 4, 4, 1])
CONDITION = np.random.default_rng(7).random((3, 4)) > 0.5
CONSTANT_34 = np.random.default_rng(8).standard_normal((3, 4))
CONSTANT_23 = np.random.default_rng(9).uniform(0.5, 2.0, (2, 3))
REPEATED = np.array([0, 2, 0, 1, 2, 2])

# name, fn, reference, specs
CASES = [
    # arithmetic and broadcasting
    ("add", lambda a, b: a + b, lambda a, b: a + b, [((3, 4), "any"), ((3, 4), "any")]),
    ("add_broadcast_3x1x4_5x4", lambda a, b: a + b, lambda a, b: a + b, [((3, 1, 4), "any"), ((5, 4), "any")]),
    ("add_broadcast_vector_to_3d", lambda a, b: ops.add(a, b), lambda a, b: a + b, [((4,), "any"), ((2, 3, 4), "any")]),
    ("add_0d_tensor", lambda a, b: a + b, lambda a, b: a + b, [((3, 4), "any"), ((), "any")]),
    ("sub_broadcast", lambda a, b: a - b, lambda a, b: a - b, [((2, 1), "any"), ((1, 3), "any")]),
    ("mul_broadcast", lambda a, b: a * b, lambda a, b: a * b, [((3, 1, 4), "any"), ((5, 4), "any")]),
    ("mul_same_tensor_twice", lambda a: a * a, lambda a: a * a, [((3, 4), "any")]),
    ("add_same_tensor_twice", lambda a: a + a, lambda a: a + a, [((3, 4), "any")]),
    ("div_broadcast", lambda a, b: a / b, lambda a, b: a / b, [((2, 3), "any"), ((3,), "pos")]),
    ("div_0d_denominator", lambda a, b: a / b, lambda a, b: a / b, [((2, 3), "any"), ((), "pos")]),
    ("neg", lambda a: -a, lambda a: -a, [((2, 3), "any")]),
    ("scalar_add_right", lambda a: a + 2.0, lambda a: a + 2.0, [((2, 3), "any")]),
    ("scalar_add_left", lambda a: 2.0 + a, lambda a: 2.0 + a, [((2, 3), "any")]),
    ("scalar_rsub", lambda a: 2.0 - a, lambda a: 2.0 - a, [((2, 3), "any")]),
    ("scalar_sub", lambda a: a - 1.5, lambda a: a - 1.5, [((2, 3), "any")]),
    ("scalar_rmul", lambda a: 3.0 * a, lambda a: 3.0 * a, [((2, 3), "any")]),
    ("scalar_div", lambda a: a / 4.0, lambda a: a / 4.0, [((2, 3), "any")]),
    ("scalar_rdiv", lambda a: 2.0 / a, lambda a: 2.0 / a, [((2, 3), "pos")]),
    ("ndarray_add_tensor", lambda a: CONSTANT_34 + a, lambda a: CONSTANT_34 + a, [((3, 4), "any")]),
    ("ndarray_sub_tensor", lambda a: CONSTANT_34 - a, lambda a: CONSTANT_34 - a, [((3, 4), "any")]),
    ("ndarray_mul_tensor_broadcast", lambda a: CONSTANT_34 * a, lambda a: CONSTANT_34 * a, [((4,), "any")]),
    ("ndarray_div_tensor", lambda a: CONSTANT_23 / a, lambda a: CONSTANT_23 / a, [((2, 3), "pos")]),
    ("ndarray_matmul_tensor", lambda a: CONSTANT_34 @ a, lambda a: CONSTANT_34 @ a, [((4, 2), "any")]),
    ("pow_2", lambda a: a ** 2, lambda a: a ** 2, [((2, 3), "any")]),
    ("pow_3", lambda a: a ** 3, lambda a: a ** 3, [((2, 3), "any")]),
    ("pow_half", lambda a: a ** 0.5, lambda a: a ** 0.5, [((2, 3), "pos")]),
    ("pow_minus_one", lambda a: a ** -1, lambda a: 1 / a, [((2, 3), "pos")]),
    ("pow_zero", lambda a: a ** 0, lambda a: a ** 0, [((2, 3), "any")]),
    ("matmul_method", lambda a, b: a.matmul(b), lambda a, b: a @ b, [((3, 4), "any"), ((4, 5), "any")]),
    # matmul
    ("matmul_2d", lambda a, b: a @ b, lambda a, b: a @ b, [((3, 4), "any"), ((4, 5), "any")]),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [((2, 3, 4), "any"), ((2, 4, 5), "any")]),
    ("matmul_batch_broadcast", lambda a, b: a @ b, lambda a, b: a @ b, [((2, 1, 3, 4), "any"), ((5, 4, 2), "any")]),
    ("matmul_2d_times_batched", lambda a, b: a @ b, lambda a, b: a @ b, [((3, 4), "any"), ((2, 4, 5), "any")]),
    ("matmul_vector_matrix", lambda a, b: a @ b, lambda a, b: a @ b, [((4,), "any"), ((4, 5), "any")]),
    ("matmul_matrix_vector", lambda a, b: a @ b, lambda a, b: a @ b, [((3, 4), "any"), ((4,), "any")]),
    ("matmul_batched_vector", lambda a, b: a @ b, lambda a, b: a @ b, [((2, 3, 4), "any"), ((4,), "any")]),
    ("matmul_vector_batched", lambda a, b: a @ b, lambda a, b: a @ b, [((4,), "any"), ((2, 4, 5), "any")]),
    ("matmul_vector_vector", lambda a, b: a @ b, lambda a, b: a @ b, [((4,), "any"), ((4,), "any")]),
    # reductions
    ("sum_all", lambda a: a.sum(), lambda a: a.sum(), [((2, 3, 4), "any")]),
    ("sum_axis0", lambda a: a.sum(axis=0), lambda a: a.sum(axis=0), [((2, 3, 4), "any")]),
    ("sum_last_keepdims", lambda a: a.sum(axis=-1, keepdims=True),
     lambda a: a.sum(axis=-1, keepdims=True), [((2, 3, 4), "any")]),
    ("sum_axes_0_2", lambda a: a.sum(axis=(0, 2)), lambda a: a.sum(axis=(0, 2)), [((2, 3, 4), "any")]),
    ("sum_axes_keyword", lambda a: a.sum(axes=(0, 2)), lambda a: a.sum(axis=(0, 2)), [((2, 3, 4), "any")]),
    ("mean_axes_keyword", lambda a: a.mean(axes=1), lambda a: a.mean(axis=1), [((2, 3, 4), "any")]),
    ("max_axes_keyword", lambda a: a.max(axes=(-1,)), lambda a: a.max(axis=-1), [((2, 3, 4), "any")]),
    ("sum_axes_2_0_keepdims", lambda a: a.sum(axis=(2, 0), keepdims=True),
     lambda a: a.sum(axis=(0, 2), keepdims=True), [((2, 3, 4), "any")]),
    ("mean_all", lambda a: a.mean(), lambda a: a.mean(), [((2, 3, 4), "any")]),
    ("mean_axis1", lambda a: a.mean(axis=1), lambda a: a.mean(axis=1), [((2, 3, 4), "any")]),
    ("mean_axes_keepdims", lambda a: a.mean(axis=(0, -1), keepdims=True),
     lambda a: a.mean(axis=(0, 2), keepdims=True), [((2, 3, 4), "any")]),
    ("max_all", lambda a: a.max(), lambda a: a.max(), [((3, 4), "any")]),
    ("max_axis1", lambda a: a.max(axis=1), lambda a: a.max(axis=1), [((2, 3, 4), "any")]),
    ("max_last", lambda a: a.max(axis=-1), lambda a: a.max(axis=-1), [((2, 3, 4), "any")]),
    ("max_axes_keepdims", lambda a: a.max(axis=(0, 2), keepdims=True),
     lambda a: a.max(axis=(0, 2), keepdims=True), [((2, 3, 4), "any")]),
    ("logsumexp_last", lambda a: ops.logsumexp(a), lambda a: np_logsumexp(a, -1), [((3, 5), "any")]),
    ("logsumexp_axis0", lambda a: ops.logsumexp(a, axis=0), lambda a: np_logsumexp(a, 0), [((3, 5), "any")]),
    ("logsumexp_axes_keepdims", lambda a: a.logsumexp(axis=(0, 2), keepdims=True),
     lambda a: np_logsumexp(a, (0, 2), True), [((2, 3, 4), "any")]),
    # shaping
    ("reshape", lambda a: a.reshape(6, 4), lambda a: a.reshape(6, 4), [((2, 3, 4), "any")]),
    ("reshape_tuple_minus_one", lambda a: a.reshape((-1,)), lambda a: a.reshape(-1), [((2, 3, 4), "any")]),
    ("flatten", lambda a: a.flatten(), lambda a: a.reshape(2, 12), [((2, 3, 4), "any")]),
    ("transpose_last_two", lambda a: a.transpose(), lambda a: np.swapaxes(a, -1, -2), [((2, 3, 4), "any")]),
    ("transpose_0_2", lambda a: a.transpose(0, 2), lambda a: np.swapaxes(a, 0, 2), [((2, 3, 4), "any")]),
    ("transpose_pair_as_one_argument", lambda a: a.transpose((0, 2)), lambda a: np.swapaxes(a, 0, 2),
     [((2, 3, 4), "any")]),
    ("transpose_full_permutation", lambda a: a.transpose((2, 0, 1)), lambda a: a.transpose(2, 0, 1),
     [((2, 3, 4), "any")]),
    ("T", lambda a: a.T, lambda a: a.T, [((3, 4), "any")]),
    ("permute", lambda a: a.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1), [((2, 3, 4), "any")]),
    ("permute_negative_axes", lambda a: ops.permute(a, (-1, 0, -2)), lambda a: a.transpose(2, 0, 1),
     [((2, 3, 4), "any")]),
    ("broadcast_to_3d", lambda a: a.broadcast_to((2, 3, 4)), lambda a: np.broadcast_to(a, (2, 3, 4)),
     [((3, 1), "any")]),
    ("broadcast_to_new_leading", lambda a: ops.broadcast_to(a, (3, 4)), lambda a: np.broadcast_to(a, (3, 4)),
     [((4,), "any")]),
    # pointwise
    ("exp", lambda a: a.exp(), np.exp, [((3, 4), "any")]),
    ("log", lambda a: a.log(), np.log, [((3, 4), "pos")]),
    ("sqrt", lambda a: a.sqrt(), np.sqrt, [((3, 4), "pos")]),
    ("relu", lambda a: a.relu(), lambda a: np.maximum(a, 0), [((3, 4), "away0")]),
    ("tanh", lambda a: a.tanh(), np.tanh, [((3, 4), "any")]),
    ("sigmoid", lambda a: a.sigmoid(), lambda a: 1 / (1 + np.exp(-a)), [((3, 4), "any")]),
    ("sigmoid_large_inputs", lambda a: ops.sigmoid(a * 8.0), lambda a: 1 / (1 + np.exp(-8 * a)), [((3, 4), "any")]),
    ("gelu", lambda a: a.gelu(), np_gelu, [((3, 4), "any")]),
    ("softmax_last", lambda a: a.softmax(), lambda a: np_softmax(a, -1), [((3, 5), "any")]),
    ("softmax_axis0", lambda a: ops.softmax(a, axis=0), lambda a: np_softmax(a, 0), [((3, 5), "any")]),
    ("log_softmax_last", lambda a: a.log_softmax(), lambda a: np.log(np_softmax(a, -1)), [((3, 5), "any")]),
    ("log_softmax_axis1_3d", lambda a: ops.log_softmax(a, axis=1), lambda a: np.log(np_softmax(a, 1)),
     [((2, 3, 4), "any")]),
    # indexing and joining
    ("getitem_int", lambda a: a[1], lambda a: a[1], [((3, 4), "any")]),
    ("getitem_negative_int", lambda a: a[-1], lambda a: a[-1], [((3, 4), "any")]),
    ("getitem_slice", lambda a: a[1:3], lambda a: a[1:3], [((4, 3), "any")]),
    ("getitem_step_slice", lambda a: a[::2], lambda a: a[::2], [((5, 3), "any")]),
    ("getitem_tuple_slice_int", lambda a: a[:, 1], lambda a: a[:, 1], [((3, 4), "any")]),
    ("getitem_int_array_repeats", lambda a: a[REPEATED], lambda a: a[REPEATED], [((3, 4), "any")]),
    ("getitem_int_array_tensor_key", lambda a: a[Tensor(REPEATED)], lambda a: a[REPEATED], [((3, 2), "any")]),
    ("getitem_tuple_with_tensor_index", lambda a: a[Tensor(np.array([2, 0, 2])), 1:],
     lambda a: a[np.array([2, 0, 2]), 1:], [((3, 4), "any")]),
    ("getitem_pairs_repeated", lambda a: a[np.array([0, 0, 2]), np.array([1, 1, 3])],
     lambda a: a[np.array([0, 0, 2]), np.array([1, 1, 3])], [((3, 4), "any")]),
    ("concatenate_axis0", lambda a, b, c: ops.concatenate([a, b, c]), lambda a, b, c: np.concatenate([a, b, c]),
     [((2, 3), "any"), ((1, 3), "any"), ((3, 3), "any")]),
    ("concatenate_last_axis", lambda a, b: ops.concatenate([a, b], axis=-1),
     lambda a, b: np.concatenate([a, b], axis=-1), [((2, 3, 1), "any"), ((2, 3, 2), "any")]),
    ("stack_axis0", lambda a, b: ops.stack([a, b]), lambda a, b: np.stack([a, b]), [((2, 3), "any"), ((2, 3), "any")]),
    ("stack_axis1", lambda a, b, c: ops.stack([a, b, c], axis=1), lambda a, b, c: np.stack([a, b, c], axis=1),
     [((2, 3), "any"), ((2, 3), "any"), ((2, 3), "any")]),
    ("where", lambda a, b: ops.where(CONDITION, a, b), lambda a, b: np.where(CONDITION, a, b),
     [((3, 4), "any"), ((3, 4), "any")]),
    ("where_broadcast", lambda a, b: ops.where(CONDITION, a, b), lambda a, b: np.where(CONDITION, a, b),
     [((3, 1), "any"), ((4,), "any")]),
    ("where_scalar_other", lambda a: ops.where(CONDITION, a, 0.5), lambda a: np.where(CONDITION, a, 0.5),
     [((3, 4), "any")]),
    # layers
    ("linear_bias", lambda x, w, b: ops.linear(x, w, b), lambda x, w, b: x @ w.T + b,
     [((4, 3), "any"), ((5, 3), "any"), ((5,), "any")]),
    ("linear_no_bias", lambda x, w: ops.linear(x, w), lambda x, w: x @ w.T, [((4, 3), "any"), ((2, 3), "any")]),
    ("linear_vector_input", lambda x, w, b: ops.linear(x, w, b), lambda x, w, b: x @ w.T + b,
     [((3,), "any"), ((5, 3), "any"), ((5,), "any")]),
    ("linear_3d_input", lambda x, w, b: ops.linear(x, w, b), lambda x, w, b: x @ w.T + b,
     [((2, 4, 3), "any"), ((5, 3), "any"), ((5,), "any")]),
    ("linear_3d_transposed_input", lambda x, w: ops.linear(x.transpose(0, 1), w),
     lambda x, w: np.swapaxes(x, 0, 1) @ w.T, [((4, 2, 3), "any"), ((5, 3), "any")]),
    ("conv2d", lambda x, w, b: ops.conv2d(x, w, b), lambda x, w, b: conv2d_loops(x, w, b),
     [((2, 2, 5, 5), "any"), ((3, 2, 3, 3), "any"), ((3,), "any")]),
    ("conv2d_stride2_pad1", lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding=1),
     lambda x, w, b: conv2d_loops(x, w, b, (2, 2), (1, 1)),
     [((2, 2, 5, 6), "any"), ((3, 2, 3, 3), "any"), ((3,), "any")]),
    ("conv2d_rect_stride_pad_no_bias", lambda x, w: ops.conv2d(x, w, stride=(1, 2), padding=(2, 0)),
     lambda x, w: conv2d_loops(x, w, None, (1, 2), (2, 0)), [((1, 3, 4, 7), "any"), ((2, 3, 2, 3), "any")]),
    ("max_pool2d", lambda x: ops.max_pool2d(x, 2), lambda x: max_pool_loops(x, (2, 2), (2, 2)),
     [((2, 2, 4, 4), "any")]),
    ("max_pool2d_overlapping", lambda x: ops.max_pool2d(x, 3, stride=1), lambda x: max_pool_loops(x, (3, 3), (1, 1)),
     [((1, 2, 5, 4), "any")]),
    ("max_pool2d_rect_uneven", lambda x: ops.max_pool2d(x, (2, 3), stride=(2, 1)),
     lambda x: max_pool_loops(x, (2, 3), (2, 1)), [((1, 2, 5, 5), "any")]),
    ("conv2d_one_channel_pad1", lambda x, w, b: ops.conv2d(x, w, b, padding=1),
     lambda x, w, b: conv2d_loops(x, w, b, (1, 1), (1, 1)), [((2, 1, 5, 5), "any"), ((4, 1, 3, 3), "any"), ((4,), "any")]),
    ("conv2d_six_to_five_channels", lambda x, w, b: ops.conv2d(x, w, b, padding=1),
     lambda x, w, b: conv2d_loops(x, w, b, (1, 1), (1, 1)), [((1, 6, 4, 4), "any"), ((5, 6, 3, 3), "any"), ((5,), "any")]),
    ("conv2d_stride2_no_pad", lambda x, w, b: ops.conv2d(x, w, b, stride=2),
     lambda x, w, b: conv2d_loops(x, w, b, (2, 2), (0, 0)), [((2, 3, 7, 7), "any"), ((2, 3, 3, 3), "any"), ((2,), "any")]),
    ("conv2d_1x1", lambda x, w: ops.conv2d(x, w), lambda x, w: conv2d_loops(x, w),
     [((2, 4, 3, 3), "any"), ((3, 4, 1, 1), "any")]),
    ("conv2d_5x5_pad2", lambda x, w, b: ops.conv2d(x, w, b, padding=2),
     lambda x, w, b: conv2d_loops(x, w, b, (1, 1), (2, 2)), [((1, 2, 4, 4), "any"), ((2, 2, 5, 5), "any"), ((2,), "any")]),
    ("max_pool2d_five_channels", lambda x: ops.max_pool2d(x, 2), lambda x: max_pool_loops(x, (2, 2), (2, 2)),
     [((2, 5, 4, 6), "any")]),
    ("max_pool2d_gaps", lambda x: ops.max_pool2d(x, 2, stride=3), lambda x: max_pool_loops(x, (2, 2), (3, 3)),
     [((1, 2, 7, 7), "any")]),
    ("max_pool2d_relu", lambda x: ops.max_pool2d(x, 2, relu=True),
     lambda x: np.maximum(max_pool_loops(x, (2, 2), (2, 2)), 0), [((2, 3, 4, 4), "away0")]),
    ("max_pool2d_relu_overlapping", lambda x: ops.max_pool2d(x, 3, stride=1, relu=True),
     lambda x: np.maximum(max_pool_loops(x, (3, 3), (1, 1)), 0), [((1, 2, 5, 4), "away0")]),
    ("conv_pool_conv_stack", lambda x, w1, w2: ops.conv2d(ops.max_pool2d(ops.conv2d(x, w1, padding=1), 2, relu=True),
                                                          w2, padding=1),
     lambda x, w1, w2: conv2d_loops(np.maximum(max_pool_loops(conv2d_loops(x, w1, None, (1, 1), (1, 1)), (2, 2), (2, 2)),
                                               0), w2, None, (1, 1), (1, 1)),
     [((2, 1, 4, 4), "any"), ((3, 1, 3, 3), "any"), ((2, 3, 3, 3), "any")]),
    # losses
    ("cross_entropy_mean", lambda z: ops.cross_entropy(z, LABELS), lambda z: np_cross_entropy(z, LABELS).mean(),
     [((5, 5), "any")]),
    ("cross_entropy_sum", lambda z: ops.cross_entropy(z, LABELS, reduction="sum"),
     lambda z: np_cross_entropy(z, LABELS).sum(), [((5, 5), "any")]),
    ("mse_loss_mean", lambda p, t: ops.mse_loss(p, t), lambda p, t: ((p - t) ** 2).mean(),
     [((3, 4), "any"), ((3, 4), "any")]),
    ("mse_loss_sum", lambda p, t: ops.mse_loss(p, t, reduction="sum"), lambda p, t: ((p - t) ** 2).sum(),
     [((3, 4), "any"), ((3, 4), "any")]),
    # a small composite graph: a tensor feeding several paths
    ("composite_mlp_step", lambda x, w: ops.cross_entropy(ops.linear(x, w).tanh() * 2.0 + ops.linear(x, w), LABELS[:4]),
     lambda x, w: np_cross_entropy(np.tanh(x @ w.T) * 2.0 + x @ w.T, LABELS[:4]).mean(),
     [((4, 3), "any"), ((5, 3), "any")]),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("name, fn, reference, specs", CASES, ids=IDS)
def test_backward_matches_central_finite_differences(name, fn, reference, specs):
    rng = np.random.default_rng(sum(map(ord, name)))
    gradcheck(fn, make_inputs(specs, rng), rng)


@pytest.mark.parametrize("name, fn, reference, specs", CASES, ids=IDS)
def test_forward_matches_numpy_reference(name, fn, reference, specs):
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    arrays = make_inputs(specs, rng)
    out = fn(*[Tensor(a, dtype=np.float64) for a in arrays])
    expected = np.asarray(reference(*arrays))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.data, expected, rtol=1e-9, atol=1e-12)


def _graph_arrays(root):
    """Every array held by the graph behind `root` (outputs of every node)."""
    seen, stack, arrays = set(), [root], []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        arrays.append(node.data)
        stack.extend(node._parents)
    return arrays


@pytest.mark.parametrize("name, fn, reference, specs", CASES, ids=IDS)
def test_float32_graph_never_produces_float64(name, fn, reference, specs):
    rng = np.random.default_rng(sum(map(ord, name)) + 2)
    inputs = [Tensor(a.astype(np.float32), requires_grad=True) for a in make_inputs(specs, rng)]
    out = fn(*inputs)
    assert all(array.dtype == np.float32 for array in _graph_arrays(out)), name
    out.backward(np.ones(out.shape, np.float32))
    for tensor in inputs:
        assert tensor.grad is not None and tensor.grad.dtype == np.float32
    # float32 results agree with the float64 computation to float32 precision
    expected = np.asarray(reference(*[t.data.astype(np.float64) for t in inputs]))
    np.testing.assert_allclose(out.data, expected, rtol=2e-4, atol=2e-5)


IMAGE_CASES = [case for case in CASES if case[0].startswith(("conv", "max_pool"))]


@pytest.mark.parametrize("name, fn, reference, specs", IMAGE_CASES, ids=[case[0] for case in IMAGE_CASES])
def test_conv_and_pool_numba_kernels_pass_the_same_gradient_check(name, fn, reference, specs, monkeypatch):
    pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed: only the numpy path exists")
    from disttrain.ops import windows

    monkeypatch.setattr(windows, "NUMBA_MIN_ELEMENTS", 0)  # the kernels at every size
    rng = np.random.default_rng(sum(map(ord, name)))
    gradcheck(fn, make_inputs(specs, rng), rng)


def test_max_shares_gradient_equally_among_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    x.max(axis=1).backward(np.array([1.0, 4.0], np.float32))
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [2.0, 0.0, 2.0]])


def test_logsumexp_and_softmax_are_stable_for_large_logits():
    x = Tensor(np.array([[1000.0, 1000.0], [-1000.0, -1001.0]]))
    np.testing.assert_allclose(ops.logsumexp(x).data, [1000.0 + math.log(2), -1000.0 + math.log1p(math.exp(-1))],
                               rtol=1e-6)
    np.testing.assert_allclose(ops.softmax(x).data[0], [0.5, 0.5])
    assert np.all(np.isfinite(ops.log_softmax(x).data))
    assert np.isfinite(ops.cross_entropy(x, [0, 1]).item())


def test_sigmoid_does_not_overflow_for_extreme_inputs():
    with np.errstate(over="raise"):
        y = ops.sigmoid(Tensor(np.array([-500.0, 0.0, 500.0])))
    np.testing.assert_allclose(y.data, [0.0, 0.5, 1.0], atol=1e-30)
