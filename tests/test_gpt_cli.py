"""The GPT through the command line: `disttrain train` on text (1 and 2 ranks train alike, validation
loss in metrics.jsonl), and `disttrain sample` from the run's latest checkpoint (deterministic with
--seed). A tiny model and a small corpus keep it fast; examples/gpt_stdlib.toml is the real recipe."""

import json
import os
import sysconfig

import numpy as np

import launch

EXAMPLE = os.path.join(launch.REPO, "examples", "gpt_stdlib.toml")
TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32", "--set", "model.block_size=16",
        "--set", "training.batch_size=8", "--set", "training.max_steps=6", "--set", "training.eval_every=3",
        "--set", "training.log_every=1", "--set", 'training.progress="none"', "--set", "data.eval_windows=12",
        "--set", "checkpoint.every_steps=3"]


def _corpus(tmp_path) -> str:
    text = "".join(open(os.path.join(sysconfig.get_paths()["stdlib"], name)).read() for name in ("abc.py", "bisect.py"))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def _records(run_dir, kind) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["kind"] == kind]


def _train(tmp_path, name, ranks, *extra):
    run_dir = tmp_path / name
    result = launch.disttrain("train", EXAMPLE, *TINY, "--set", f'data.path="{_corpus(tmp_path)}"', "--run-dir",
                              run_dir, *extra, ranks=ranks, timeout=240)
    return run_dir, result.stdout


def test_two_ranks_train_the_gpt_like_one_process_and_log_validation_loss(tmp_path):
    (one, console), (two, _) = _train(tmp_path, "one", 0, "--set", 'training.progress="lines"'), _train(tmp_path, "two", 2)
    losses = [[r["loss"] for r in _records(run, "train")] for run in (one, two)]
    assert len(losses[0]) == 6 and losses[0][-1] < losses[0][0]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    evals = [[r["test_loss"] for r in _records(run, "eval")] for run in (one, two)]
    assert [r["step"] for r in _records(one, "eval")] == [3, 6]
    np.testing.assert_allclose(evals[1], evals[0], rtol=1e-5)
    # the validation loss is on the console too, as it is taken
    assert f"eval at step 3  test_loss {evals[0][0]:.4f}" in console


def test_sample_prints_the_prompt_and_a_seeded_continuation(tmp_path):
    run_dir, _ = _train(tmp_path, "run", 0)
    argv = ("sample", run_dir, "--prompt", "def ", "--tokens", "40", "--temperature", "0.8", "--top-k", "40")
    first = launch.disttrain(*argv, "--seed", "3").stdout
    again = launch.disttrain(*argv, "--seed", "3").stdout
    other = launch.disttrain(*argv, "--seed", "4").stdout
    assert first.startswith("def ") and len(first.encode()) >= 4 + 40 * 0.5
    assert first == again and first != other


def test_sample_from_a_run_that_is_not_a_gpt_is_one_clear_error(tmp_path):
    run_dir = tmp_path / "mlp"
    launch.disttrain("train", "--set", "training.max_steps=2", "--set", "checkpoint.every_steps=2", "--run-dir", run_dir)
    proc = launch.disttrain("sample", run_dir, check=False)
    assert proc.returncode == 1
    assert "sampling needs a gpt model" in proc.stderr and "Traceback" not in proc.stderr
    bad = launch.disttrain("sample", run_dir, "--temperature", "0", check=False)
    assert bad.returncode == 2 and "must be a number > 0" in bad.stderr
