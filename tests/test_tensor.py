"""Tensor construction, dtype discipline and autograd semantics (accumulation, no_grad, detach, errors)."""

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, ops, optim
from disttrain.tensor import Gradient, Tensor, is_grad_enabled, no_grad


# -------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("data", [[1.0, 2.0], np.array([1.0, 2.0]), np.float64(1.5), 2.5, 3, True,
                                  [[1, 2], [3.5, 4]]], ids=["float_list", "float64_array", "float64_scalar",
                                                            "python_float", "python_int", "python_bool", "mixed_list"])
def test_float_data_is_float32_by_default(data):
    assert Tensor(data).dtype == np.float32


def test_explicit_float64_is_kept_and_copied():
    array = np.arange(6.0).reshape(2, 3)
    t = Tensor(array, dtype=np.float64)
    assert t.dtype == np.float64
    assert not np.shares_memory(t.data, array)


@pytest.mark.parametrize("make", [lambda a: Tensor(a, requires_grad=True), lambda a: nn.Parameter(a),
                                  lambda a: Tensor(a[1:], requires_grad=True),
                                  lambda a: Tensor(Tensor(a), requires_grad=True),
                                  lambda a: Tensor(a, requires_grad=True, dtype=np.float32)],
                         ids=["tensor", "parameter", "view", "from_tensor", "explicit_dtype"])
def test_tensor_copies_the_callers_array_so_a_step_leaves_it_alone(make):
    array = np.array([1.0, 2.0, 3.0], np.float32)
    param = make(array)
    assert not np.shares_memory(param.data, array)
    expected = param.data - np.float32(0.1)
    param.grad = np.ones(param.shape, np.float32)
    optim.SGD([param], lr=0.1).step()
    np.testing.assert_array_equal(array, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(param.data, expected)


def test_wrap_shares_memory_and_keeps_the_dtype():
    flat = np.zeros(12, np.float64)
    param = Tensor.wrap(flat[4:10], requires_grad=True)
    assert param.data.base is flat and param.dtype == np.float64 and param.requires_grad
    param.grad = np.ones(6)
    optim.SGD([param], lr=0.5).step()
    np.testing.assert_array_equal(flat, [0] * 4 + [-0.5] * 6 + [0] * 2)
    assert type(Tensor.wrap(np.ones(2, np.float32).view(Gradient)).data) is np.ndarray
    with pytest.raises(ValueError, match="int"):
        Tensor.wrap(np.arange(3), requires_grad=True)


@pytest.mark.parametrize("array", [np.array([1, 2, 3]), np.arange(4, dtype=np.int32), np.array([1, 2], np.uint8),
                                   [1, 2, 3]], ids=["int64", "int32", "uint8", "int_list"])
def test_integer_data_keeps_its_dtype(array):
    t = Tensor(array)
    assert t.dtype == np.asarray(array).dtype
    np.testing.assert_array_equal(t.data, array)


@pytest.mark.parametrize("data", [[1, 2, 3], np.arange(3), np.array([True, False]), 4],
                         ids=["int_list", "int64_array", "bool_array", "python_int"])
def test_integer_data_that_requires_grad_becomes_float32(data):
    t = Tensor(data, requires_grad=True)
    assert t.dtype == np.float32 and t.requires_grad
    np.testing.assert_array_equal(t.data, np.asarray(data, np.float32))


def test_requires_grad_with_an_explicit_integer_dtype_is_rejected():
    with pytest.raises(ValueError, match="int"):
        Tensor([1, 2, 3], requires_grad=True, dtype=np.int64)


def test_basic_accessors():
    t = Tensor(np.zeros((2, 3)), requires_grad=True)
    assert t.shape == (2, 3) and t.ndim == 2 and t.size == 6 and len(t) == 2
    assert t.numpy() is t.data
    assert t.grad is None and t.requires_grad
    assert Tensor(4.0).item() == 4.0
    assert "requires_grad=True" in repr(t)


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div, ops.matmul,
                                lambda a, b: ops.where(np.ones((2, 2), bool), a, b),
                                lambda a, b: ops.concatenate([a, b]), lambda a, b: ops.stack([a, b]),
                                lambda a, b: ops.mse_loss(a, b)],
                         ids=["add", "sub", "mul", "div", "matmul", "where", "concatenate", "stack", "mse_loss"])
def test_mixing_float32_and_float64_raises_type_error(op):
    f32 = Tensor(np.ones((2, 2)), requires_grad=True)
    f64 = Tensor(np.ones((2, 2)), dtype=np.float64, requires_grad=True)
    with pytest.raises(TypeError, match="float32"):
        op(f32, f64)
    with pytest.raises(TypeError, match="float64"):
        op(f64, f32)


def test_mixing_dtypes_in_layers_raises_type_error():
    f32_weight = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(TypeError):
        ops.linear(Tensor(np.ones((4, 3)), dtype=np.float64), f32_weight)
    with pytest.raises(TypeError):
        ops.linear(Tensor(np.ones((4, 3))), f32_weight, Tensor(np.zeros(2), dtype=np.float64))
    conv_weight = Tensor(np.ones((1, 1, 2, 2)), requires_grad=True)
    with pytest.raises(TypeError):
        ops.conv2d(Tensor(np.ones((1, 1, 3, 3)), dtype=np.float64), conv_weight)


def test_numbers_and_arrays_adopt_the_tensor_dtype():
    x32 = Tensor(np.ones(3), requires_grad=True)
    x64 = Tensor(np.ones(3), dtype=np.float64, requires_grad=True)
    float64_array = np.full(3, 2.0)
    assert (x32 * 2.0).dtype == np.float32
    assert (x32 * np.float64(2.0)).dtype == np.float32
    assert (float64_array + x32).dtype == np.float32
    assert (x32 - float64_array).dtype == np.float32
    assert (x64 * 2.0).dtype == np.float64
    assert (np.ones(3, np.float32) * x64).dtype == np.float64
    # integer tensors combine with float tensors in the float dtype
    assert (x32 + Tensor([1, 2, 3])).dtype == np.float32
    assert (Tensor([1, 2, 3]) * x64).dtype == np.float64
    assert ops.concatenate([x32, Tensor([4, 5])]).dtype == np.float32


def test_integer_tensor_mean_is_the_true_mean():
    m = Tensor([1, 2, 4]).mean()
    assert m.dtype.kind == "f"
    assert m.item() == pytest.approx(7 / 3)


def test_gradients_keep_the_leaf_dtype():
    for dtype in (np.float32, np.float64):
        w = Tensor(np.ones((3, 2)), dtype=dtype, requires_grad=True)
        x = Tensor(np.arange(6).reshape(2, 3), dtype=dtype)
        ((x @ w).tanh().sum() * 3.0).backward()
        assert w.grad.dtype == dtype


def test_backward_seed_is_cast_to_the_tensor_dtype():
    x = Tensor(np.ones(3), requires_grad=True)
    (x * 2.0).backward(np.array([1.0, 2.0, 3.0], dtype=np.float64))
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])


# ------------------------------------------------------------------------------------------ autograd
def test_gradient_accumulates_when_a_tensor_is_used_twice():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data)
    y = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (y + y).sum().backward()
    np.testing.assert_allclose(y.grad, [2.0, 2.0, 2.0])


def test_gradient_accumulates_through_shared_intermediate():
    x = Tensor(np.array([0.5, -1.0]), requires_grad=True)
    h = x.exp()
    (h * h + h).sum().backward()  # d/dx (e^2x + e^x) = 2 e^2x + e^x
    np.testing.assert_allclose(x.grad, 2 * np.exp(2 * x.data) + np.exp(x.data), rtol=1e-6)


def test_gradient_accumulates_across_two_backward_calls():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, 3.0 + 2 * x.data)


def test_first_gradient_is_a_copy_not_an_alias():
    x = Tensor(np.ones(3), requires_grad=True)
    seed = np.ones(3, np.float32)
    x.backward(seed)
    x.backward(seed)
    np.testing.assert_array_equal(seed, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])


def test_gradient_reads_like_a_tensor_for_seed_style_code():
    p = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (p * p).sum().backward()
    assert isinstance(p.grad, Gradient) and isinstance(p.grad, np.ndarray) and p.grad.dtype == np.float32
    for plain in (p.grad.data, p.grad.numpy()):
        assert type(plain) is np.ndarray and plain.dtype == np.float32 and np.shares_memory(plain, p.grad)
    np.testing.assert_array_equal(p.grad.numpy(), [2.0, 4.0])
    p.data -= 0.5 * p.grad.data
    np.testing.assert_array_equal(p.data, [0.0, 0.0])
    assert type(p.grad.sum()) is np.float32  # reductions give numpy scalars, as for a plain array
    (p * 3.0).sum().backward()  # accumulation keeps the same Gradient
    assert isinstance(p.grad, Gradient)
    np.testing.assert_array_equal(p.grad, [5.0, 7.0])


def test_broadcast_gradient_is_summed_back_to_input_shape():
    bias = Tensor(np.zeros((1, 3)), requires_grad=True)
    x = Tensor(np.ones((4, 3)))
    (x + bias).sum().backward()
    assert bias.grad.shape == (1, 3)
    np.testing.assert_array_equal(bias.grad, [[4.0, 4.0, 4.0]])


def test_backward_on_non_scalar_without_out_grad_raises_value_error():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        (x * 2.0).backward()


def test_backward_with_wrongly_shaped_out_grad_names_both_shapes():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError) as error:
        (x * 2.0).backward(np.ones((3, 2)))
    assert "(3, 2)" in str(error.value) and "(2, 3)" in str(error.value)


def test_backward_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError):
        Tensor(np.ones(1)).sum().backward()


def test_backward_of_scalar_defaults_to_one():
    x = Tensor(np.array(3.0), requires_grad=True)
    (x * x).backward()
    assert x.grad == pytest.approx(6.0)


def test_only_leaves_keep_gradients_and_constants_get_none():
    w = Tensor(np.ones(2), requires_grad=True)
    c = Tensor(np.ones(2))
    hidden = w * c
    (hidden * 2.0).sum().backward()
    assert hidden.grad is None and c.grad is None
    np.testing.assert_array_equal(w.grad, [2.0, 2.0])


def test_no_grad_records_no_graph():
    x = Tensor(np.ones(3), requires_grad=True)
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert is_grad_enabled()
    assert not y.requires_grad and y._parents == () and y._backward is None
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_restores_state_after_exception():
    with pytest.raises(KeyError):
        with dt.no_grad():
            raise KeyError("boom")
    assert is_grad_enabled()


def test_detach_cuts_the_graph_and_shares_data():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x * 3.0
    d = y.detach()
    assert not d.requires_grad and d._parents == ()
    assert d.data is y.data
    z = (d * x).sum()
    z.backward()
    np.testing.assert_allclose(x.grad, d.data)  # only the direct path; none through the detached copy


def test_detach_keeps_float64():
    x = Tensor(np.array([1.0, 2.0]), dtype=np.float64, requires_grad=True)
    d = x.detach()
    assert d.dtype == np.float64
    assert d.data is x.data


def test_deep_chain_backward_does_not_recurse():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(3000):
        y = y * 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0])


# ------------------------------------------------------------------------------------- shape errors
def _shapes_in_message(error, *shapes):
    message = str(error.value)
    return all(str(shape) in message for shape in shapes)


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div], ids=["add", "sub", "mul", "div"])
def test_broadcast_error_names_both_shapes(op):
    with pytest.raises(ValueError) as error:
        op(Tensor(np.ones((3, 4))), Tensor(np.ones((5,))))
    assert _shapes_in_message(error, (3, 4), (5,))


def test_matmul_shape_errors_name_both_shapes():
    with pytest.raises(ValueError) as error:
        Tensor(np.ones((3, 4))) @ Tensor(np.ones((5, 2)))
    assert _shapes_in_message(error, (3, 4), (5, 2))
    with pytest.raises(ValueError) as error:
        Tensor(np.ones((2, 3, 4))) @ Tensor(np.ones((3, 4, 5)))
    assert _shapes_in_message(error, (2, 3, 4), (3, 4, 5))


@pytest.mark.parametrize("make_error, shapes", [
    (lambda: Tensor(np.ones((3, 4))).reshape(5, 2), [(3, 4), (5, 2)]),
    (lambda: Tensor(np.ones((3, 4))).broadcast_to((2, 5)), [(3, 4), (2, 5)]),
    (lambda: ops.concatenate([Tensor(np.ones((3, 4))), Tensor(np.ones((2, 5)))]), [(3, 4), (2, 5)]),
    (lambda: ops.stack([Tensor(np.ones((3, 4))), Tensor(np.ones((2, 5)))]), [(3, 4), (2, 5)]),
    (lambda: ops.where(np.ones((2, 5), bool), Tensor(np.ones((3, 4))), 0.0), [(2, 5), (3, 4)]),
    (lambda: ops.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))), [(2, 3), (4, 5)]),
    (lambda: ops.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 3))), Tensor(np.ones(5))), [(5,), (4, 3)]),
    (lambda: ops.linear(Tensor(np.ones((2, 4, 3))), Tensor(np.ones((5, 2)))), [(2, 4, 3), (5, 2)]),
    (lambda: ops.linear(Tensor(2.0), Tensor(np.ones((5, 1)))), [(), (5, 1)]),
    (lambda: ops.conv2d(Tensor(np.ones((1, 2, 5, 5))), Tensor(np.ones((3, 4, 3, 3)))), [(1, 2, 5, 5), (3, 4, 3, 3)]),
    (lambda: ops.mse_loss(Tensor(np.ones((3, 4))), np.ones((4, 3))), [(3, 4), (4, 3)]),
    (lambda: ops.cross_entropy(Tensor(np.ones((3, 4))), np.zeros(2, int)), [(2,), (3, 4)]),
], ids=["reshape", "broadcast_to", "concatenate", "stack", "where", "linear", "linear_bias", "linear_3d",
        "linear_scalar", "conv2d", "mse_loss", "cross_entropy"])
def test_shape_errors_raise_value_error_naming_both_shapes(make_error, shapes):
    with pytest.raises(ValueError) as error:
        make_error()
    assert _shapes_in_message(error, *shapes), str(error.value)


def test_permute_and_axis_errors_are_value_errors():
    x = Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match="axis"):
        x.sum(axis=2)


def test_power_exponent_must_be_a_number():
    with pytest.raises(TypeError):
        Tensor(np.ones(2)) ** Tensor(np.ones(2))


def test_power_zero_has_zero_gradient_at_zero():
    x = Tensor([0.0, 1.0, -2.0], requires_grad=True)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal((x ** 0).data, [1.0, 1.0, 1.0])


def test_axis_and_axes_together_are_rejected():
    with pytest.raises(TypeError, match="axes"):
        Tensor(np.ones((2, 3))).sum(axis=0, axes=1)


def test_transpose_takes_a_pair_or_two_axes_and_the_method_matmul_exists():
    x = Tensor(np.arange(24.0).reshape(2, 3, 4))
    np.testing.assert_array_equal(x.transpose((0, 2)).data, np.swapaxes(x.data, 0, 2))
    np.testing.assert_array_equal(x.transpose([0, 2]).data, x.transpose(0, 2).data)
    np.testing.assert_array_equal(x.transpose((1, 2, 0)).data, x.data.transpose(1, 2, 0))
    m = Tensor(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(m.matmul(m.T).data, m.data @ m.data.T)


# ------------------------------------------------------------------------------ numpy arrays as input
@pytest.mark.parametrize("op, expected", [
    (ops.relu, lambda a: np.maximum(a, 0)), (ops.tanh, np.tanh), (ops.exp, np.exp),
    (ops.sigmoid, lambda a: 1 / (1 + np.exp(-a))), (ops.gelu, None), (ops.softmax, None), (ops.log_softmax, None),
    (lambda a: ops.reshape(a, (3, 2)), lambda a: a.reshape(3, 2)), (lambda a: ops.getitem(a, 1), lambda a: a[1]),
    (lambda a: ops.transpose(a), lambda a: a.T), (lambda a: ops.permute(a, (1, 0)), lambda a: a.T),
    (lambda a: ops.broadcast_to(a, (2, 2, 3)), lambda a: np.broadcast_to(a, (2, 2, 3))),
    (ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max), (ops.logsumexp, None), (ops.neg, np.negative),
    (lambda a: ops.power(a, 2), np.square), (lambda a: ops.cross_entropy(a, [0, 2]), None),
    (lambda a: ops.mse_loss(a, np.zeros((2, 3))), lambda a: np.mean(a * a)),
], ids=["relu", "tanh", "exp", "sigmoid", "gelu", "softmax", "log_softmax", "reshape", "getitem", "transpose",
        "permute", "broadcast_to", "sum", "mean", "max", "logsumexp", "neg", "power", "cross_entropy", "mse_loss"])
def test_ops_accept_numpy_arrays_as_float32_tensors(op, expected):
    array = np.array([[-1.0, 0.5, 2.0], [3.0, -0.25, 1.0]])  # float64: becomes float32 like Tensor(array)
    out = op(array)
    assert isinstance(out, Tensor) and out.dtype == np.float32
    reference = op(Tensor(array))
    np.testing.assert_array_equal(out.data, reference.data)
    if expected is not None:
        np.testing.assert_allclose(out.data, expected(array.astype(np.float32)), rtol=1e-6)


def test_image_ops_and_linear_accept_numpy_input():
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    weight = Tensor(np.ones((3, 1, 2, 2)), requires_grad=True)
    out = ops.conv2d(x, weight)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(out.data, ops.conv2d(Tensor(x), weight).data)
    pooled = ops.max_pool2d(x, 2)
    assert pooled.dtype == np.float32 and pooled.shape == (2, 1, 2, 2)
    w = Tensor(np.ones((2, 4)), requires_grad=True)
    assert ops.linear(np.ones((3, 4)), w).dtype == np.float32
    y = ops.linear(np.ones((3, 4)), w, np.zeros(2))
    y.sum().backward()
    np.testing.assert_array_equal(w.grad, np.full((2, 4), 3.0))
