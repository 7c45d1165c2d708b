"""The GPT model: its size and shapes, causality, weight tying (one Parameter used twice: summed
gradient, held once in parameters, state dicts, flat buffers and checkpoints), its [model] config,
and one forward/backward against PyTorch from the same weights and batch."""

import importlib.util

import numpy as np
import pytest

from disttrain import checkpoint, models, nn, ops, optim
from disttrain.config import ConfigError, load_config
from disttrain.distributed import DataParallel, ShardedOptimizer, SingleProcessComm
from disttrain.tensor import Tensor
from disttrain.transformer import GPT

SMALL = dict(vocab=256, n_layer=2, n_head=4, n_embd=32, block_size=16)


def _batch(seed=0, batch=3, time=16):
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, time + 1))
    return tokens[:, :-1], tokens[:, 1:]


# ------------------------------------------------------------------------------------------- shapes
def test_default_gpt_has_the_anchor_size_of_842_496_parameters():
    model = GPT(rng=np.random.default_rng(0))
    assert sum(p.size for p in model.parameters()) == 842_496
    names = [name for name, _ in model.named_parameters()]
    assert names[:2] == ["wte.weight", "wpe.weight"] and "head.weight" not in names
    assert "blocks.3.attn.qkv.weight" in names and names[-2:] == ["ln_f.weight", "ln_f.bias"]


def test_logits_are_float32_batch_time_vocab_and_a_shorter_context_works():
    model = GPT(**SMALL, rng=np.random.default_rng(0))
    x, _ = _batch()
    assert model(x).shape == (3, 16, 256) and model(x).dtype == np.float32
    assert model(x[:, :5]).shape == (3, 5, 256)


def test_a_position_never_sees_later_tokens():
    model = GPT(**SMALL, rng=np.random.default_rng(0))
    x, _ = _batch()
    changed = x.copy()
    changed[:, 9:] = (changed[:, 9:] + 1) % 256
    a, b = model(x).data, model(changed).data
    np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_too_long_a_sequence_and_bad_sizes_are_rejected_naming_the_key():
    model = GPT(**SMALL, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(np.zeros((1, 17), np.int64))
    with pytest.raises(ValueError, match="n_embd = 30 must be divisible by n_head = 4"):
        GPT(**dict(SMALL, n_embd=30))
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        GPT(**dict(SMALL, n_layer=0))


def test_dropout_changes_training_outputs_but_not_eval_outputs():
    model = GPT(**dict(SMALL, dropout=0.3), rng=np.random.default_rng(0))
    x, _ = _batch()
    nn.manual_seed(1)
    a = model(x).data
    b = model(x).data
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(x).data, model(x).data)


# ------------------------------------------------------------------------------------------- tying
class Tied(nn.Module):
    """One Parameter in two places: as `a.weight` and as `b.weight`."""

    def __init__(self):
        self.a = nn.Linear(3, 3, bias=False, rng=np.random.default_rng(0))
        self.b = nn.Linear(3, 3, bias=False, rng=np.random.default_rng(1))
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(ops.tanh(self.a(x)))


def test_a_shared_parameter_gets_the_sum_of_the_gradients_of_both_uses():
    model = Tied()
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    model(x).sum().backward()
    w = model.a.weight.data.astype(np.float64)
    first = Tensor(w.copy(), requires_grad=True, dtype=np.float64)  # the same graph, two separate leaves
    second = Tensor(w.copy(), requires_grad=True, dtype=np.float64)
    ops.linear(ops.tanh(ops.linear(x.astype(np.float64), first)), second).sum().backward()
    np.testing.assert_allclose(model.a.weight.grad, first.grad + second.grad, rtol=1e-5, atol=1e-6)
    assert not np.allclose(first.grad, 0) and not np.allclose(second.grad, 0)


def test_a_shared_parameter_is_listed_saved_and_loaded_once():
    model = Tied()
    assert [name for name, _ in model.named_parameters()] == ["a.weight"]
    state = model.state_dict()
    assert list(state) == ["a.weight"]
    other = Tied()
    other.load_state_dict({"a.weight": np.full((3, 3), 0.5, np.float32)})
    assert other.b.weight is other.a.weight and np.all(other.b.weight.data == 0.5)


def _tied_training_step(model, x, y, grads_out):
    comm = SingleProcessComm()
    ddp = DataParallel(model, comm)
    optimizer = ShardedOptimizer(optim.AdamW, ddp.parameters(), comm, lr=1e-2, weight_decay=0.1)
    loss = ops.cross_entropy(ddp(x), y)
    loss.backward()
    grads_out.append(np.array(model.wte.weight.grad))
    ddp.sync_gradients(grad_scale=1.0)
    optimizer.step()
    return ddp, optimizer


def test_tied_gpt_trains_its_shared_table_once_in_the_flat_buffer_with_both_gradients(tmp_path):
    x, y = _batch()
    tied, untied = GPT(**SMALL, rng=np.random.default_rng(3)), GPT(**dict(SMALL, tie_embeddings=False))
    untied.load_state_dict(dict(tied.state_dict(), **{"head.weight": tied.wte.weight.data}))
    ddp, optimizer = _tied_training_step(tied, x, y, grads := [])
    # the untied twin: the two uses' gradients come apart, and their sum is the tied gradient
    ops.cross_entropy(untied(x), y).backward()
    np.testing.assert_allclose(grads[0], untied.wte.weight.grad + untied.head.weight.grad, rtol=2e-5, atol=1e-7)
    untied_size = sum(p.size for p in untied.parameters())
    assert ddp.layout.total == sum(p.size for p in tied.parameters()) == untied_size - 256 * 32
    assert [e[0] for e in ddp.layout.entries].count("wte.weight") == 1
    assert tied.wte.weight.data.base is not None  # a view of the flat buffer, updated by the optimizer
    path = checkpoint.save(str(tmp_path), 1, ddp, optimizer, SingleProcessComm(), {"config": {}})
    state, manifest, _ = checkpoint.read_model(path)
    assert "head.weight" not in state and [p["name"] for p in manifest["parameters"]].count("wte.weight") == 1
    np.testing.assert_array_equal(state["wte.weight"], tied.wte.weight.data)


# ------------------------------------------------------------------------------------------ config
def test_gpt_config_defaults_are_the_anchor_model_and_build_it():
    config = load_config(None, ['model.name="gpt"'])
    section = config["model"]
    assert (section["vocab"], section["n_layer"], section["n_head"], section["n_embd"], section["block_size"],
            section["dropout"], section["tie_embeddings"]) == (256, 4, 4, 128, 128, 0.0, True)
    model = models.build_model(section, (128,), 256, rng=np.random.default_rng(0))
    assert isinstance(model, GPT) and sum(p.size for p in model.parameters()) == 842_496


@pytest.mark.parametrize("overrides, message", [
    (["model.n_head=3"], r"model.n_embd = 128 is not allowed with model.n_head = 3: n_embd must be divisible"),
    (["model.n_layer=0"], r"model.n_layer = 0 is not allowed: expected an integer >= 1"),
    (['data.name="text"', "model.vocab=100"], r"model.vocab = 100 is not allowed with data.name = 'text'.*>= 256"),
    (["model.tie_embeddings=1"], r"model.tie_embeddings = 1 is not allowed: expected true or false"),
])
def test_gpt_config_errors_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ['model.name="gpt"', *overrides])


# ------------------------------------------------------------------------------------ against torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (make bench-deps installs the CPU build)")
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("attention", ["written", "fused"])
def test_one_forward_backward_matches_pytorch_from_the_same_weights_and_batch(tie, attention):
    import torch

    from disttrain.bench.gpt_torch import TorchGPT, loss_fn

    model = GPT(**dict(SMALL, tie_embeddings=tie), rng=np.random.default_rng(4))
    twin = TorchGPT(**dict(SMALL, tie_embeddings=tie), attention=attention)
    twin.load_numpy(model.state_dict())
    x, y = _batch(5)
    loss = ops.cross_entropy(model(x), y)
    loss.backward()
    torch_loss = loss_fn(twin(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss.item() == pytest.approx(torch_loss.item(), rel=1e-5)
    expected = twin.numpy_grads()
    assert sorted(expected) == sorted(name for name, _ in model.named_parameters())
    for name, param in model.named_parameters():
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(param.grad, expected[name], rtol=1e-3, atol=1e-5 * scale, err_msg=name)


def test_the_example_config_is_the_anchor_recipe_on_the_standard_library(tmp_path, monkeypatch):
    import os

    from disttrain.datasets import load_data

    monkeypatch.setenv("DISTTRAIN_CACHE_DIR", str(tmp_path))
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "gpt_stdlib.toml"))
    assert (config["optimizer"]["name"], config["optimizer"]["lr"], config["optimizer"]["weight_decay"],
            config["training"]["batch_size"]) == ("adamw", 0.001, 0.1, 32)
    model = models.build_model(config["model"], (128,), 256, rng=np.random.default_rng(0))
    assert sum(p.size for p in model.parameters()) == 842_496
    train, val, info = load_data(config["data"], None, config["model"]["block_size"])
    assert info["task"] == "language_model" and len(val) == 1000
    x, y = train[np.array([0, 1])]
    assert model(x).shape == (2, 128, 256) and ops.cross_entropy(model(x), y).item() == pytest.approx(np.log(256), rel=0.05)
