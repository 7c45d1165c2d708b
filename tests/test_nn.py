"""nn: Module discovery and state, initialisation, every layer and loss against a direct numpy computation."""

import itertools
import math
import os

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.tensor import Tensor


def _rng(seed=0):
    return np.random.default_rng(seed)


class Block(nn.Module):
    def __init__(self):
        self.fc = nn.Linear(3, 4, rng=_rng(1))
        self.norm = nn.LayerNorm1d(4)
        self.heads = [nn.Linear(4, 2, rng=_rng(2)), nn.Linear(4, 2, bias=False, rng=_rng(3))]
        self.scale = nn.Parameter(np.ones(1))

    def forward(self, x):
        h = self.norm(self.fc(x)).relu()
        return self.heads[0](h) + self.heads[1](h) * self.scale


# ------------------------------------------------------------------------------------ Module basics
def test_sequential_names_parameters_by_position():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [p.shape for p in model.parameters()] == [(4, 3), (4,), (2, 4), (2,)]
    assert model.parameters()[0] is model[0].weight and len(model) == 3


def test_named_parameters_follow_attribute_order_with_nested_lists():
    names = [name for name, _ in Block().named_parameters()]
    assert names == ["scale", "fc.weight", "fc.bias", "norm.weight", "norm.bias",
                     "heads.0.weight", "heads.0.bias", "heads.1.weight"]


class Containers(nn.Module):
    """Parameters and modules held in a dict, a list, a tuple and nested containers."""

    def __init__(self):
        self.heads = {"a": nn.Linear(2, 3, rng=_rng(1)), "b": nn.Linear(2, 1, bias=False, rng=_rng(2))}
        self.scales = [nn.Parameter(np.ones(2)), nn.Parameter(np.full(3, 2.0))]
        self.norms = ({"stats": nn.BatchNorm1d(3)},)
        self.gains = {"z": nn.Parameter(np.ones(1)), "y": [nn.Parameter(np.zeros(1))]}
        self.out = nn.Linear(3, 1, rng=_rng(3))


def test_modules_and_parameters_in_lists_tuples_and_dicts_are_found_in_insertion_order():
    model = Containers()
    assert [name for name, _ in model.named_parameters()] == [
        "scales.0", "scales.1", "gains.z", "gains.y.0",
        "heads.a.weight", "heads.a.bias", "heads.b.weight", "norms.0.stats.weight", "norms.0.stats.bias",
        "out.weight", "out.bias"]
    assert [name for name, _ in model.named_children()] == ["heads.a", "heads.b", "norms.0.stats", "out"]
    assert [name for name, _ in model.named_buffers()] == ["norms.0.stats.running_mean", "norms.0.stats.running_var"]
    assert model.parameters()[0] is model.scales[0]
    model.eval()
    assert not model.heads["a"].training and not model.norms[0]["stats"].training


def test_state_dict_round_trip_covers_modules_in_containers():
    source, target = Containers(), Containers()
    for i, param in enumerate(source.parameters()):
        param.data[...] = i
    source.norms[0]["stats"].running_mean[...] = 7.0
    state = source.state_dict()
    assert "heads.a.weight" in state and "norms.0.stats.running_mean" in state and "gains.y.0" in state
    target.load_state_dict(state)
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    del state["gains.y.0"]
    with pytest.raises(ValueError, match="gains.y.0"):
        target.load_state_dict(state)


def test_parameter_order_is_identical_across_constructions():
    first = [(n, p.shape) for n, p in Block().named_parameters()]
    second = [(n, p.shape) for n, p in Block().named_parameters()]
    assert first == second


def test_shared_parameter_is_listed_once():
    layer = nn.Linear(2, 2)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias"]


def test_parameter_is_float32_leaf_requiring_grad():
    p = nn.Parameter(np.ones(3))
    assert p.dtype == np.float32 and p.requires_grad and isinstance(p, Tensor)
    assert nn.Parameter(np.ones(3), dtype=np.float64).dtype == np.float64


def test_train_and_eval_propagate_to_every_submodule():
    model = nn.Sequential(nn.Linear(2, 2), nn.Residual(nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(2))))
    model.eval()
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    assert len(list(model.modules())) == 6


def test_zero_grad_clears_every_parameter_gradient():
    model = nn.Sequential(nn.Linear(3, 2))
    model(Tensor(np.ones((1, 3)))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -------------------------------------------------------------------------------------- state dicts
def test_state_dict_round_trip_restores_values_in_place():
    dt.manual_seed(5)
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    source(Tensor(_rng().standard_normal((8, 3))))  # moves the running statistics
    state = source.state_dict()
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "2.weight", "2.bias"}
    dt.manual_seed(6)
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    weight_array = target[0].weight.data
    target.load_state_dict(state)
    assert target[0].weight.data is weight_array  # copied into, not replaced
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    x = Tensor(_rng(1).standard_normal((5, 3)))
    source.eval(), target.eval()
    np.testing.assert_array_equal(source(x).data, target(x).data)


def test_state_dict_is_a_copy():
    model = nn.Linear(2, 2)
    state = model.state_dict()
    state["weight"][...] = 99.0
    assert not np.any(model.weight.data == 99.0)


def test_strict_load_lists_missing_unexpected_and_misshaped_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    del state["1.bias"]
    state["extra.weight"] = np.zeros(3)
    state["0.weight"] = np.zeros((3, 4))
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "missing" in message and "1.bias" in message
    assert "unexpected" in message and "extra.weight" in message
    assert "0.weight" in message and "(3, 4)" in message and "(4, 3)" in message


def test_non_strict_load_ignores_missing_and_unexpected_but_not_misshaped():
    model = nn.Linear(3, 2)
    model.load_state_dict({"weight": np.full((2, 3), 0.5), "other": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(model.weight.data, np.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="weight"):
        model.load_state_dict({"weight": np.zeros((3, 2))}, strict=False)


# ---------------------------------------------------------------------------------------- init, seeds
def test_linear_weight_shape_and_kaiming_uniform_bounds():
    layer = nn.Linear(200, 300, rng=_rng(3))
    bound = math.sqrt(6.0 / 200)
    w = layer.weight.data
    assert w.shape == (300, 200) and w.dtype == np.float32
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound  # actually uses the whole range
    assert abs(w.mean()) < 0.01 * bound
    assert w.var() == pytest.approx(bound ** 2 / 3, rel=0.02)  # variance of U(-b, b)
    assert layer.bias.shape == (300,) and np.all(layer.bias.data == 0)


def test_linear_without_bias_has_only_a_weight():
    layer = nn.Linear(3, 2, bias=False)
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    x = _rng().standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ layer.weight.data.T, rtol=1e-6)


def test_linear_forward_is_x_times_weight_transposed_plus_bias():
    layer = nn.Linear(3, 2, rng=_rng(4))
    layer.bias.data[:] = [0.5, -1.0]
    x = _rng(5).standard_normal((4, 3)).astype(np.float32)
    expected = x.astype(np.float64) @ layer.weight.data.T.astype(np.float64) + [0.5, -1.0]
    np.testing.assert_allclose(layer(Tensor(x)).data, expected, rtol=1e-5, atol=1e-6)


def test_conv2d_init_uses_fan_in_of_channels_times_kernel():
    conv = nn.Conv2d(4, 64, 3, rng=_rng(6))
    bound = math.sqrt(6.0 / (4 * 3 * 3))
    assert conv.weight.shape == (64, 4, 3, 3)
    assert bound * 0.98 < np.abs(conv.weight.data).max() <= bound


def _model_with_linear_and_embedding_layers():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Embedding(3, 2))


def test_same_seed_gives_same_model_and_different_seed_does_not():
    dt.manual_seed(42)
    first = [p.data.copy() for p in _model_with_linear_and_embedding_layers().parameters()]
    dt.manual_seed(42)
    second = [p.data.copy() for p in _model_with_linear_and_embedding_layers().parameters()]
    dt.manual_seed(43)
    third = [p.data.copy() for p in _model_with_linear_and_embedding_layers().parameters()]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], third[0])


def test_rng_argument_overrides_the_library_generator():
    a = nn.Linear(5, 5, rng=_rng(9)).weight.data
    dt.manual_seed(1)
    b = nn.Linear(5, 5, rng=_rng(9)).weight.data
    np.testing.assert_array_equal(a, b)


def test_manual_seed_rejects_negative_or_non_integer_seeds():
    with pytest.raises(ValueError):
        dt.manual_seed(-1)
    with pytest.raises(ValueError):
        dt.manual_seed(1.5)


@pytest.mark.parametrize("make", [lambda: nn.Linear(0, 2), lambda: nn.Linear(2, -1), lambda: nn.LayerNorm1d(0),
                                  lambda: nn.Embedding(3, 0), lambda: nn.Conv2d(1, 0, 3)])
def test_layer_sizes_must_be_positive(make):
    with pytest.raises(ValueError, match="positive"):
        make()


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="item 1"):
        nn.Sequential(nn.ReLU(), lambda x: x)


# ---------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("module, reference", [
    (nn.ReLU(), lambda x: np.maximum(x, 0)),
    (nn.Tanh(), np.tanh),
    (nn.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
    (nn.GELU(), lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
], ids=["relu", "tanh", "sigmoid", "gelu"])
def test_activation_modules_match_numpy(module, reference):
    x = _rng(10).standard_normal((4, 5)).astype(np.float32)
    out = module(Tensor(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.data, reference(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_gelu_tanh_approximation_is_close_to_exact_gelu():
    x = np.linspace(-4, 4, 41)
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(nn.GELU()(Tensor(x, dtype=np.float64)).data, exact, atol=1e-3)


# -------------------------------------------------------------------------------------------- Dropout
def test_dropout_is_identity_in_eval_mode():
    layer = nn.Dropout(0.5).eval()
    x = Tensor(np.ones((10, 10)))
    np.testing.assert_array_equal(layer(x).data, x.data)


def test_dropout_in_training_zeroes_about_p_and_scales_the_rest():
    p = 0.3
    layer = nn.Dropout(p, rng=_rng(11))
    x = Tensor(_rng(12).uniform(1.0, 2.0, (200, 100)), requires_grad=True)
    y = layer(x)
    kept = y.data != 0
    assert kept.mean() == pytest.approx(1 - p, abs=0.01)
    np.testing.assert_allclose(y.data[kept], x.data[kept] / (1 - p), rtol=1e-6)
    assert y.dtype == np.float32
    y.sum().backward()
    np.testing.assert_allclose(x.grad, kept / (1 - p), rtol=1e-6)
    assert abs(y.data.mean() - x.data.mean()) < 0.02  # expectation preserved


def test_dropout_with_p_zero_is_identity_in_training():
    x = Tensor(np.ones(5))
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).data, x.data)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_rejects_p_outside_zero_one(p):
    with pytest.raises(ValueError, match="p"):
        nn.Dropout(p)


# -------------------------------------------------------------------------------------- normalisation
def test_layernorm_matches_numpy_with_learned_scale_and_shift():
    layer = nn.LayerNorm1d(6, eps=1e-5)
    layer.weight.data[:] = _rng(13).standard_normal(6)
    layer.bias.data[:] = _rng(14).standard_normal(6)
    x = _rng(15).standard_normal((4, 6)).astype(np.float32) * 3 + 1
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    expected = (x64 - mean) / np.sqrt(var + 1e-5) * layer.weight.data + layer.bias.data
    out = layer(Tensor(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)


def test_layernorm_rejects_wrong_feature_size():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        nn.LayerNorm1d(6)(Tensor(np.ones((4, 5))))


def test_batchnorm_training_normalises_by_batch_and_updates_running_stats():
    layer = nn.BatchNorm1d(3, eps=1e-5, momentum=0.1)
    layer.weight.data[:] = [1.0, 2.0, 0.5]
    layer.bias.data[:] = [0.0, -1.0, 3.0]
    running_mean, running_var = np.zeros(3), np.ones(3)
    for seed in (16, 17):
        x = (_rng(seed).standard_normal((8, 3)) * [1.0, 4.0, 0.1] + [0.0, 5.0, -2.0]).astype(np.float32)
        x64 = x.astype(np.float64)
        mean, biased_var = x64.mean(axis=0), x64.var(axis=0)
        expected = (x64 - mean) / np.sqrt(biased_var + 1e-5) * layer.weight.data + layer.bias.data
        out = layer(Tensor(x))
        np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-4)
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * x64.var(axis=0, ddof=1)  # unbiased, as in PyTorch
        np.testing.assert_allclose(layer.running_mean, running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var, running_var, rtol=1e-5, atol=1e-6)
    assert layer.running_mean.dtype == np.float32 and layer.running_var.dtype == np.float32


def test_batchnorm_eval_uses_running_stats_and_leaves_them_alone():
    layer = nn.BatchNorm1d(2)
    layer.running_mean[:] = [1.0, -2.0]
    layer.running_var[:] = [4.0, 0.25]
    layer.weight.data[:] = [2.0, 1.0]
    layer.bias.data[:] = [0.5, 0.0]
    layer.eval()
    x = _rng(18).standard_normal((5, 2)).astype(np.float32)
    expected = (x - [1.0, -2.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-5) * [2.0, 1.0] + [0.5, 0.0]
    np.testing.assert_allclose(layer(Tensor(x)).data, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.running_mean, [1.0, -2.0])
    np.testing.assert_array_equal(layer.running_var, [4.0, 0.25])


def test_batchnorm_gradients_flow_to_input_and_affine_parameters():
    layer = nn.BatchNorm1d(3)
    x = Tensor(_rng(19).standard_normal((6, 3)), requires_grad=True)
    y = layer(x)
    (y * Tensor(_rng(20).standard_normal((6, 3)))).sum().backward()
    # the batch-normalised output is invariant to shifting a feature, so its input gradient sums to 0 per feature
    np.testing.assert_allclose(x.grad.sum(axis=0), 0.0, atol=1e-5)
    assert layer.weight.grad.shape == (3,) and layer.bias.grad.shape == (3,)


# ------------------------------------------------------------------------------------------- images
def _conv_loops(x, w, b, stride, padding):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for i, oc, r, s in itertools.product(range(n), range(o), range(oh), range(ow)):
        patch = xp[i, :, r * stride:r * stride + kh, s * stride:s * stride + kw]
        out[i, oc, r, s] = np.sum(patch * w[oc]) + b[oc]
    return out


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
def test_conv2d_module_matches_naive_loops(stride, padding):
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, rng=_rng(21))
    conv.bias.data[:] = [0.1, -0.2, 0.3]
    x = _rng(22).standard_normal((2, 2, 6, 5)).astype(np.float32)
    out = conv(Tensor(x))
    expected = _conv_loops(x.astype(np.float64), conv.weight.data.astype(np.float64), conv.bias.data, stride, padding)
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.data, expected, rtol=1e-4, atol=1e-5)


def test_maxpool2d_module_matches_naive_loops():
    x = _rng(23).standard_normal((2, 3, 6, 7)).astype(np.float32)
    out = nn.MaxPool2d(2)(Tensor(x))
    expected = np.zeros((2, 3, 3, 3))
    for i, c, r, s in itertools.product(range(2), range(3), range(3), range(3)):
        expected[i, c, r, s] = x[i, c, 2 * r:2 * r + 2, 2 * s:2 * s + 2].max()
    np.testing.assert_array_equal(out.data, expected)


def test_maxpool2d_with_relu_is_relu_then_maxpool_in_values_and_gradients():
    x = _rng(25).standard_normal((4, 3, 8, 6)).astype(np.float32)  # many all-negative windows too
    g = _rng(26).standard_normal((4, 3, 4, 3)).astype(np.float32)
    fused_input, plain_input = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
    fused = nn.MaxPool2d(2, relu=True)(fused_input)
    plain = nn.MaxPool2d(2)(nn.ReLU()(plain_input))
    np.testing.assert_array_equal(fused.data, plain.data)
    fused.backward(g)
    plain.backward(g)
    np.testing.assert_array_equal(fused_input.grad, plain_input.grad)
    assert (fused.data == 0).any() and (fused_input.grad != 0).any()


def test_conv_and_pool_outputs_are_channels_last_in_memory_and_flatten_in_channel_order():
    x = _rng(27).standard_normal((2, 3, 6, 6)).astype(np.float32)
    conv = nn.Conv2d(3, 4, 3, padding=1, rng=_rng(28))
    out = nn.MaxPool2d(2)(conv(Tensor(x)))
    assert out.shape == (2, 4, 3, 3) and out.data.transpose(0, 2, 3, 1).flags.c_contiguous
    flat = nn.Flatten()(out)
    np.testing.assert_array_equal(flat.data, np.ascontiguousarray(out.data).reshape(2, -1))


def test_small_cnn_runs_end_to_end_with_flatten():
    dt.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    x = Tensor(_rng(24).standard_normal((5, 1, 8, 8)))
    loss = nn.SoftmaxLoss()(model(x), np.arange(5))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == np.float32 for p in model.parameters())


def test_flatten_keeps_batch_axis():
    x = Tensor(np.arange(24.0).reshape(2, 3, 4), requires_grad=True)
    y = nn.Flatten()(x)
    assert y.shape == (2, 12)
    np.testing.assert_array_equal(y.data, x.data.reshape(2, 12))
    y.sum().backward()
    assert x.grad.shape == (2, 3, 4)


def test_residual_adds_input_to_module_output():
    inner = nn.Linear(3, 3, rng=_rng(25))
    x = _rng(26).standard_normal((2, 3)).astype(np.float32)
    out = nn.Residual(inner)(Tensor(x))
    np.testing.assert_allclose(out.data, x + x @ inner.weight.data.T + inner.bias.data, rtol=1e-5, atol=1e-6)
    assert [name for name, _ in nn.Residual(inner).named_parameters()] == ["module.weight", "module.bias"]


# ------------------------------------------------------------------------------------------ Embedding
def test_embedding_picks_rows_and_accumulates_repeated_gradients():
    emb = nn.Embedding(5, 3, rng=_rng(27))
    indices = np.array([[0, 3], [3, 3]])
    out = emb(indices)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out.data, emb.weight.data[indices])
    out.sum().backward()
    np.testing.assert_array_equal(emb.weight.grad[:, 0], [1, 0, 0, 3, 0])


def test_embedding_rejects_out_of_range_and_float_indices():
    emb = nn.Embedding(5, 3)
    with pytest.raises(ValueError, match="0..4"):
        emb(np.array([1, 5]))
    with pytest.raises(ValueError, match="0..4"):
        emb(np.array([-1]))
    with pytest.raises(ValueError, match="integer"):
        emb(np.array([1.0]))


# --------------------------------------------------------------------------------------------- losses
def _np_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def test_softmax_loss_matches_numpy_mean_and_sum():
    logits = _rng(28).standard_normal((6, 4)).astype(np.float32) * 3
    labels = np.array([0, 3, 1, 1, 2, 0])
    per_row = _np_cross_entropy(logits, labels)
    mean_loss = nn.SoftmaxLoss()(Tensor(logits), labels)
    assert mean_loss.dtype == np.float32 and mean_loss.shape == ()
    assert mean_loss.item() == pytest.approx(per_row.mean(), rel=1e-5)
    assert nn.CrossEntropyLoss(reduction="sum")(Tensor(logits), labels).item() == pytest.approx(per_row.sum(), rel=1e-5)
    assert nn.CrossEntropyLoss is nn.SoftmaxLoss


def test_softmax_loss_gradient_is_softmax_minus_onehot_over_batch():
    logits = _rng(29).standard_normal((3, 4)).astype(np.float32)
    labels = np.array([1, 0, 3])
    z = Tensor(logits, requires_grad=True)
    nn.SoftmaxLoss()(z, labels).backward()
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[np.arange(3), labels] -= 1
    np.testing.assert_allclose(z.grad, probs / 3, rtol=1e-5, atol=1e-6)


def test_softmax_loss_accepts_integer_valued_float_labels_and_label_tensors():
    logits = Tensor(_rng(30).standard_normal((3, 4)))
    expected = nn.SoftmaxLoss()(logits, np.array([1, 2, 3])).item()
    assert nn.SoftmaxLoss()(logits, np.array([1.0, 2.0, 3.0])).item() == expected
    assert nn.SoftmaxLoss()(logits, Tensor([1, 2, 3])).item() == expected


@pytest.mark.parametrize("labels, pattern", [
    (np.array([0, 4, 1]), "label 4 is out of range for 4 classes"),
    (np.array([0, -1, 1]), "label -1 is out of range"),
    (np.array([0.5, 1.0, 2.0]), "integers"),
    (np.array([0, 1]), r"\(2,\)"),
])
def test_softmax_loss_rejects_bad_labels(labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        nn.SoftmaxLoss()(Tensor(np.zeros((3, 4))), labels)


def test_loss_reduction_must_be_mean_or_sum():
    with pytest.raises(ValueError, match="reduction"):
        nn.SoftmaxLoss("none")(Tensor(np.zeros((1, 2))), [0])
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss("max")(Tensor(np.zeros(2)), np.zeros(2))


def test_mse_loss_matches_numpy_and_its_gradient():
    prediction = _rng(31).standard_normal((4, 3)).astype(np.float32)
    target = _rng(32).standard_normal((4, 3)).astype(np.float32)
    p = Tensor(prediction, requires_grad=True)
    loss = nn.MSELoss()(p, target)
    diff = prediction.astype(np.float64) - target
    assert loss.dtype == np.float32
    assert loss.item() == pytest.approx((diff ** 2).mean(), rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(p.grad, 2 * diff / diff.size, rtol=1e-5, atol=1e-7)
    assert nn.MSELoss("sum")(Tensor(prediction), Tensor(target)).item() == pytest.approx((diff ** 2).sum(), rel=1e-5)


# ------------------------------------------------------------------------------ numpy arrays as input
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(3, 2, rng=_rng(1)), (2, 3)), (nn.ReLU, (2, 3)), (nn.Tanh, (2, 3)), (nn.Sigmoid, (2, 3)),
    (nn.GELU, (2, 3)), (nn.Flatten, (2, 1, 3)), (lambda: nn.Dropout(0.5, rng=_rng(2)), (2, 3)),
    (lambda: nn.LayerNorm1d(3), (2, 3)), (lambda: nn.BatchNorm1d(3), (2, 3)),
    (lambda: nn.Residual(nn.Linear(3, 3, rng=_rng(3))), (2, 3)),
    (lambda: nn.Sequential(nn.Linear(3, 4, rng=_rng(4)), nn.ReLU(), nn.Linear(4, 2, rng=_rng(5))), (2, 3)),
    (lambda: nn.Conv2d(1, 2, 2, rng=_rng(6)), (2, 1, 3, 3)), (lambda: nn.MaxPool2d(2), (2, 1, 4, 4)),
], ids=["linear", "relu", "tanh", "sigmoid", "gelu", "flatten", "dropout", "layernorm", "batchnorm", "residual",
        "sequential", "conv2d", "maxpool2d"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_accept_numpy_arrays_like_float32_tensors(make, shape, dtype):
    array = _rng(7).standard_normal(shape).astype(dtype)
    out = make()(array)
    assert isinstance(out, Tensor) and out.dtype == np.float32
    np.testing.assert_allclose(out.data, make()(Tensor(array)).data, rtol=1e-6)


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 5, 3), (2, 1, 2, 3)])
def test_linear_accepts_any_rank_ending_in_in_features(shape):
    layer = nn.Linear(3, 2, rng=_rng(1))
    x = Tensor(_rng(2).standard_normal(shape), requires_grad=True)
    out = layer(x)
    assert out.shape == shape[:-1] + (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out.data, x.data @ layer.weight.data.T + layer.bias.data, rtol=1e-6)
    out.sum().backward()
    rows = x.data.reshape(-1, 3)
    np.testing.assert_allclose(layer.weight.grad, np.ones((rows.shape[0], 2)).T @ rows, rtol=1e-5)
    np.testing.assert_allclose(layer.bias.grad, np.full(2, rows.shape[0]))
    np.testing.assert_allclose(x.grad, np.broadcast_to(layer.weight.data.sum(axis=0), shape), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        layer(np.ones((2, 4), np.float32))


def test_gradients_in_flat_buffer_views_are_gradients_without_copies():
    from disttrain.distributed.flat import FlatParameters
    from disttrain.tensor import Gradient

    model = nn.Sequential(nn.Linear(3, 4, rng=_rng(1)), nn.ReLU(), nn.Linear(4, 2, rng=_rng(2)))
    flat = FlatParameters(model.named_parameters(), 1, 1 << 20)
    model(np.ones((5, 3), np.float32)).sum().backward()
    for param in model.parameters():
        assert isinstance(param.grad, Gradient) and param.grad.dtype == np.float32
        assert np.shares_memory(param.grad, flat.flat_grads)
        assert type(param.grad.data) is np.ndarray and np.shares_memory(param.grad.data, flat.flat_grads)


# -------------------------------------------------------------------------------------- built-in cnn
def test_config_cnn_with_no_hidden_layer_is_the_fashion_recipe():
    from disttrain.config import load_config
    from disttrain.models import build_model

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "fashion_cnn.toml"))
    model = build_model(config["model"], (28, 28), 10)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Reshape", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear"]
    assert model[1].weight.shape == (16, 1, 3, 3) and model[3].weight.shape == (32, 16, 3, 3)
    assert model[6].weight.shape == (10, 1568) and model[2].relu and model[4].relu
    with_hidden = build_model({**config["model"], "hidden": [64, 32]}, (28, 28), 10)
    assert [layer.weight.shape for layer in with_hidden.layers if isinstance(layer, nn.Linear)] == \
        [(64, 1568), (32, 64), (10, 32)]


def test_cnn_is_conv_relu_pool_blocks_in_values_and_gradients():
    from disttrain.models import cnn

    dt.manual_seed(5)
    model = cnn((1, 8, 8), 3, channels=(4, 6), hidden=[])
    reference = nn.Sequential(model[0], model[1], nn.ReLU(), nn.MaxPool2d(2), model[3], nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), model[6])
    x = _rng(29).standard_normal((5, 64)).astype(np.float32)
    grads = []
    for net in (model, reference):
        net.zero_grad()
        out = net(Tensor(x))
        nn.SoftmaxLoss()(out, np.arange(5) % 3).backward()
        grads.append((out.data.copy(), [p.grad.copy() for p in net.parameters()]))
    np.testing.assert_array_equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
