"""The transformer's ops (causal attention, layer norm, embedding, cross-entropy over (B, T, V), GELU,
dropout): forward against a direct float64 computation written out the long way, backward against
central differences in float64, on both paths (numba kernels and plain numpy), and float32 in, float32
out, with the two paths agreeing to float32 precision.
"""

import contextlib
import math

import numpy as np
import pytest

from disttrain import nn, ops
from disttrain.ops import jit
from disttrain.tensor import Tensor
from test_ops_gradcheck import gradcheck

PATHS = ["numba", "numpy"]


def test_with_numba_every_op_has_its_kernels():
    import importlib

    if jit.numba_module() is None:
        pytest.skip("numba is not installed: only the numpy path exists here")
    modules = [importlib.import_module(f"disttrain.ops.{name}")
               for name in ("attention", "embedding", "losses", "normalization", "pointwise")]
    for module in modules:
        assert module._kernels() is not None, module.__name__
    with jit.numpy_only():
        assert all(module._kernels() is None for module in modules)


def _path(name):
    if name == "numba" and jit.numba_module() is None:
        pytest.skip("numba is not installed (pip install 'disttrain[fast]'): only the numpy path exists here")
    return contextlib.nullcontext() if name == "numba" else jit.numpy_only()


# ------------------------------------------------------------------------ references, the long way
def attention_loops(qkv, heads):
    """Causal attention by explicit loops over batch, head and query position."""
    batch, time, width = qkv.shape
    c = width // 3
    d = c // heads
    out = np.zeros((batch, time, c))
    for b in range(batch):
        for h in range(heads):
            q = qkv[b, :, h * d:(h + 1) * d]
            k = qkv[b, :, c + h * d:c + (h + 1) * d]
            v = qkv[b, :, 2 * c + h * d:2 * c + (h + 1) * d]
            for i in range(time):
                scores = np.array([q[i] @ k[j] / math.sqrt(d) for j in range(i + 1)])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, i, h * d:(h + 1) * d] = weights @ v[:i + 1]
    return out


def layer_norm_rows(x, w, b, eps=1e-5):
    out = np.empty_like(x)
    for index in np.ndindex(*x.shape[:-1]):
        row = x[index]
        mean = sum(row) / len(row)
        variance = sum((v - mean) ** 2 for v in row) / len(row)
        out[index] = (row - mean) / math.sqrt(variance + eps) * w + b
    return out


def cross_entropy_positions(logits, labels):
    losses = [-math.log(math.exp(logits[index][labels[index]]) / np.exp(logits[index]).sum())
              for index in np.ndindex(*labels.shape)]
    return sum(losses) / len(losses)


def gelu_formula(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


LABELS = np.array([[1, 4, 0], [3, 3, 2]])
INDICES = np.array([[0, 2, 2, 5], [4, 0, 2, 2]])  # repeats: gradients of one row add up
# name, fn, reference, input shapes
CASES = [
    ("attention_2_heads", lambda q: ops.causal_self_attention(q, 2), lambda q: attention_loops(q, 2), [(2, 5, 12)]),
    ("attention_1_head", lambda q: ops.causal_self_attention(q, 1), lambda q: attention_loops(q, 1), [(1, 4, 6)]),
    ("attention_one_position", lambda q: ops.causal_self_attention(q, 3), lambda q: attention_loops(q, 3),
     [(2, 1, 9)]),
    ("layer_norm_2d", lambda x, w, b: ops.layer_norm(x, w, b), layer_norm_rows, [(4, 6), (6,), (6,)]),
    ("layer_norm_3d", lambda x, w, b: ops.layer_norm(x, w, b), layer_norm_rows, [(2, 3, 5), (5,), (5,)]),
    ("layer_norm_many_rows", lambda x, w, b: ops.layer_norm(x, w, b), layer_norm_rows, [(70, 3), (3,), (3,)]),
    ("embedding_repeated_rows", lambda w: ops.embedding(w, INDICES), lambda w: w[INDICES], [(6, 3)]),
    ("cross_entropy_btv", lambda z: ops.cross_entropy(z, LABELS), lambda z: cross_entropy_positions(z, LABELS),
     [(2, 3, 5)]),
    ("gelu", lambda a: ops.gelu(a), gelu_formula, [(3, 7)]),
    ("gelu_large_inputs", lambda a: ops.gelu(a * 12.0), lambda a: gelu_formula(12.0 * a), [(2, 5)]),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, fn, reference, shapes", CASES, ids=IDS)
def test_forward_matches_the_long_way_and_backward_matches_finite_differences(name, fn, reference, shapes, path):
    rng = np.random.default_rng(sum(map(ord, name)))
    arrays = [rng.standard_normal(shape) for shape in shapes]
    with _path(path):
        out = fn(*[Tensor(a, dtype=np.float64) for a in arrays])
        np.testing.assert_allclose(out.data, reference(*arrays), rtol=1e-10, atol=1e-12)
        gradcheck(fn, arrays, rng)


@pytest.mark.parametrize("name, fn, reference, shapes", CASES, ids=IDS)
def test_float32_in_float32_out_and_both_paths_agree(name, fn, reference, shapes):
    if jit.numba_module() is None:
        pytest.skip("numba is not installed: one path only")
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    results = []
    for path in PATHS:
        with _path(path):
            inputs = [Tensor(a, requires_grad=True) for a in arrays]
            out = fn(*inputs)
            out.backward(np.ones(out.shape, np.float32))
            assert out.dtype == np.float32 and all(t.grad.dtype == np.float32 for t in inputs)
            results.append([out.data] + [np.array(t.grad) for t in inputs])
    for numba_array, numpy_array in zip(*results):
        np.testing.assert_allclose(numba_array, numpy_array, rtol=2e-5, atol=2e-6)
    expected = np.asarray(reference(*[a.astype(np.float64) for a in arrays]))
    np.testing.assert_allclose(results[0][0], expected, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------- attention facts
@pytest.mark.parametrize("path", PATHS)
def test_attention_output_at_a_position_ignores_later_positions(path):
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((1, 6, 12)).astype(np.float32)
    changed = qkv.copy()
    changed[:, 4:] = rng.standard_normal((1, 2, 12))
    with _path(path):
        a = ops.causal_self_attention(qkv, 2).data
        b = ops.causal_self_attention(changed, 2).data
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("path", PATHS)
def test_attention_is_stable_for_large_scores(path):
    qkv = np.full((1, 3, 6), 300.0, np.float32)  # 2 heads of 1 feature: every score is 300 * 300
    qkv[0, :, 4:] = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]  # the values of the two heads
    with _path(path):
        out = ops.causal_self_attention(qkv, 2).data
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2], [3.0, 4.0], rtol=1e-6)  # equal scores: the mean of the values


class _PoisonedNumpy:
    """numpy, except that empty/empty_like return arrays full of NaN (or of the largest integer)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        array = np.empty(*args, **kwargs)
        array.fill(np.nan if array.dtype.kind == "f" else np.iinfo(array.dtype).max)
        return array

    @staticmethod
    def empty_like(*args, **kwargs):
        array = np.empty_like(*args, **kwargs)
        array.fill(np.nan if array.dtype.kind == "f" else np.iinfo(array.dtype).max)
        return array


@pytest.mark.parametrize("path", PATHS)
def test_attention_never_reads_the_unwritten_part_of_its_scratch_arrays(path, monkeypatch):
    from disttrain.ops import attention

    rng = np.random.default_rng(8)
    qkv = rng.standard_normal((2, 9, 12))
    with _path(path):
        expected_out = ops.causal_self_attention(Tensor(qkv, dtype=np.float64), 2)
        monkeypatch.setattr(attention, "np", _PoisonedNumpy())
        tensor = Tensor(qkv, requires_grad=True, dtype=np.float64)
        out = ops.causal_self_attention(tensor, 2)
        out.backward(np.ones(out.shape))
    np.testing.assert_allclose(out.data, expected_out.data, rtol=1e-12)
    assert np.all(np.isfinite(tensor.grad))


@pytest.mark.parametrize("bad, message", [
    (np.ones((2, 3, 10)), r"3 \* features"),
    (np.ones((2, 6)), r"\(batch, time, 3 \* features\)"),
])
def test_attention_rejects_a_qkv_that_is_not_three_equal_parts(bad, message):
    with pytest.raises(ValueError, match=message):
        ops.causal_self_attention(bad, 1)


def test_attention_rejects_heads_that_do_not_divide_the_features():
    with pytest.raises(ValueError, match=r"4 features do not split into heads = 3"):
        ops.causal_self_attention(np.ones((1, 2, 12)), 3)


# ------------------------------------------------------------------------------ layer norm, embedding
def test_layer_norm_layer_keeps_shape_and_layernorm1d_is_the_same_layer():
    x = np.random.default_rng(4).standard_normal((2, 3, 8)).astype(np.float32)
    a, b = nn.LayerNorm(8), nn.LayerNorm1d(8)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    assert a(x).shape == (2, 3, 8)
    assert [name for name, _ in b.named_parameters()] == ["weight", "bias"]


def test_layer_norm_rejects_mismatched_features_and_dtypes():
    with pytest.raises(ValueError, match=r"\(2, 5\) does not end in 4"):
        ops.layer_norm(np.ones((2, 5), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="float64"):
        ops.layer_norm(Tensor(np.ones((2, 4)), dtype=np.float64), np.ones(4, np.float32), np.zeros(4, np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_embedding_gradient_of_an_unused_row_is_zero_and_repeats_add(path):
    table = Tensor(np.zeros((5, 2), np.float32), requires_grad=True)
    with _path(path):
        ops.embedding(table, np.array([[3, 1, 3], [3, 0, 1]])).backward(np.ones((2, 3, 2), np.float32))
    np.testing.assert_array_equal(table.grad[:, 0], [1, 2, 0, 3, 0])


def test_embedding_rejects_out_of_range_indices_naming_the_range():
    with pytest.raises(ValueError, match=r"index 7 is out of range for a table of 5 rows \(allowed 0..4\)"):
        ops.embedding(np.zeros((5, 2), np.float32), np.array([[1, 7]]))


# ------------------------------------------------------------------------------------ cross-entropy
def test_cross_entropy_over_positions_is_the_mean_over_rows_of_the_flattened_logits():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 4, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (3, 4))
    a = ops.cross_entropy(logits, labels).item()
    b = ops.cross_entropy(logits.reshape(12, 7), labels.reshape(12)).item()
    assert a == pytest.approx(b, rel=1e-6)


def test_cross_entropy_labels_must_have_the_leading_shape_of_the_logits():
    with pytest.raises(ValueError, match=r"labels shape \(3, 4\) does not match logits shape \(3, 5, 7\) "
                                         r"\(expected \(3, 5\)\)"):
        ops.cross_entropy(np.ones((3, 5, 7), np.float32), np.zeros((3, 4), int))


# -------------------------------------------------------------------------------------------- dropout
def test_dropout_op_zeroes_about_p_scales_the_rest_and_masks_the_gradient_alike():
    x = Tensor(np.ones((200, 50), np.float32), requires_grad=True)
    y = ops.dropout(x, 0.25, np.random.default_rng(6))
    kept = y.data != 0
    assert kept.mean() == pytest.approx(0.75, abs=0.02)
    np.testing.assert_allclose(y.data[kept], 1 / 0.75, rtol=1e-6)
    y.backward(np.full(y.shape, 2.0, np.float32))
    np.testing.assert_allclose(x.grad, kept * 2.0 / 0.75, rtol=1e-6)


def test_dropout_op_is_deterministic_given_the_generator_and_rejects_p_of_one():
    x = np.ones((4, 4), np.float32)
    a = ops.dropout(x, 0.5, np.random.default_rng(1)).data
    np.testing.assert_array_equal(a, ops.dropout(x, 0.5, np.random.default_rng(1)).data)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.dropout(x, 1.0, np.random.default_rng(1))
