"""Sampling text from a GPT: deterministic with a seed, temperature and top-k honoured, and the
sample command reading the newest checkpoint of a run directory."""

import io

import numpy as np
import pytest

from disttrain import checkpoint, models, optim
from disttrain.config import load_config
from disttrain.distributed import DataParallel, ShardedOptimizer, SingleProcessComm
from disttrain.generate import generate, next_token, sample_command

SIZES = ['model.name="gpt"', "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8"]


@pytest.fixture
def model():
    return models.gpt(load_config(None, SIZES)["model"], rng=np.random.default_rng(0))


def test_same_seed_same_text_and_another_seed_other_text(model):
    a = generate(model, b"def ", 40, temperature=1.0, top_k=0, seed=1)
    assert len(a) == 40 and a == generate(model, b"def ", 40, temperature=1.0, top_k=0, seed=1)
    assert a != generate(model, b"def ", 40, temperature=1.0, top_k=0, seed=2)


def test_temperature_zero_takes_the_most_likely_byte_each_time(model):
    text = generate(model, b"x", 12, temperature=0)
    context = list(b"x")
    for byte in text:  # longer than block_size: the model sees its last 8 bytes only
        logits = model(np.array([context[-8:]])).data[0, -1]
        assert byte == int(np.argmax(logits))
        context.append(byte)


def test_top_k_draws_only_among_the_k_most_likely():
    logits = np.array([0.0, 5.0, 4.0, 3.0, -1.0])
    rng = np.random.default_rng(0)
    drawn = {next_token(logits, 2.0, 2, rng) for _ in range(300)}
    assert drawn == {1, 2}
    assert {next_token(logits, 2.0, 0, rng) for _ in range(2000)} == {0, 1, 2, 3, 4}


def test_generation_leaves_the_model_in_training_mode_and_does_not_record_a_graph(model):
    model.train()
    generate(model, b"ab", 3)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=b"", tokens=3), "at least one byte"),
    (dict(prompt=b"a", tokens=-1), "tokens must be a non-negative integer"),
    (dict(prompt=b"a", tokens=3, temperature=-0.5), "temperature must be >= 0"),
    (dict(prompt=b"a", tokens=3, top_k=-2), "top_k must be a non-negative integer"),
])
def test_bad_arguments_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, **kwargs)


def test_sample_command_prints_the_prompt_and_a_continuation_from_the_latest_checkpoint(tmp_path, model):
    config = load_config(None, SIZES)
    comm = SingleProcessComm()
    ddp = DataParallel(model, comm)
    optimizer = ShardedOptimizer(optim.AdamW, ddp.parameters(), comm, lr=1e-3)
    checkpoint.save(str(tmp_path / "checkpoints"), 5, ddp, optimizer, comm, {"config": config})
    expected = generate(model, b"def ", 30, temperature=0.8, top_k=40, seed=3)
    model.wte.weight.data[...] = 0  # the checkpoint, not this object, must be what samples
    out = io.StringIO()
    text = sample_command(str(tmp_path), prompt="def ", tokens=30, temperature=0.8, top_k=40, seed=3, out=out)
    assert text == "def " + expected.decode("utf-8", errors="replace")
    assert out.getvalue() == text + "\n"


def test_sample_command_refuses_a_checkpoint_of_another_model(tmp_path):
    config = load_config(None, ['model.name="mlp"', "model.hidden=[4]"])
    model = models.mlp((3,), 2, hidden=(4,))
    comm = SingleProcessComm()
    ddp = DataParallel(model, comm)
    checkpoint.save(str(tmp_path), 1, ddp, ShardedOptimizer(optim.SGD, ddp.parameters(), comm, lr=0.1), comm,
                    {"config": config})
    with pytest.raises(ValueError, match="sampling needs a gpt model, this checkpoint holds model.name = 'mlp'"):
        sample_command(str(tmp_path), tokens=2)
