"""Every example runs as documented and learns: the digits MLP (the main job) to >= 95% test accuracy."""

import json
import os
import re
import sys

import pytest

import launch

EXAMPLES = os.path.join(launch.REPO, "examples")
FASHION = "/usr/share/datasets/fashion-mnist"


def _final_eval(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["kind"] == "eval"][-1]


def test_default_example_reaches_95_percent_on_two_ranks(tmp_path):
    """`disttrain train` without a config, as `make run` runs it: the bundled digits MLP."""
    proc = launch.disttrain("train", "--run-dir", tmp_path, ranks=2)
    assert proc.stdout.startswith("disttrain: no config given: training the bundled default example (")
    assert "disttrain: mlp on UCI digits 8x8: 1438 train / 359 test, 10 classes from labels 0..9" in proc.stdout
    assert "world 2" in proc.stdout
    assert re.search(r"epoch 20/20 .*test_acc 0\.9[5-9]", proc.stdout), proc.stdout
    assert _final_eval(tmp_path)["test_accuracy"] >= 0.95


def test_default_example_runs_single_process_without_mpiexec(tmp_path):
    proc = launch.disttrain("train", "--run-dir", tmp_path, "--set", "training.epochs=8")
    assert "world 1" in proc.stdout
    assert _final_eval(tmp_path)["test_accuracy"] >= 0.93


def test_make_run_trains_the_default_example_and_the_repository_copy_is_that_file():
    with open(os.path.join(launch.REPO, "Makefile")) as handle:
        run = [line for line in handle.read().split("\nrun: install\n", 1)[1].splitlines() if line.strip()][0]
    assert run.rstrip().endswith("$(BIN)/mpiexec -n 2 $(BIN)/disttrain train")  # no config: the bundled one
    bundled = os.path.join(launch.REPO, "disttrain", "examples", "digits_mlp.toml")
    assert os.path.realpath(os.path.join(EXAMPLES, "digits_mlp.toml")) == os.path.realpath(bundled)


def test_an_installed_package_without_the_repository_trains_its_bundled_default(tmp_path):
    """setuptools' build of the package (what pip installs), imported from outside the repository."""
    launch.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "--build-lib",
                str(tmp_path / "installed")], timeout=120, cwd=launch.REPO)
    assert os.path.isfile(tmp_path / "installed" / "disttrain" / "examples" / "digits_mlp.toml")
    (tmp_path / "elsewhere").mkdir()
    proc = launch.run([sys.executable, "-m", "disttrain", "train", "--set", "training.epochs=1"], timeout=120,
                      cwd=tmp_path / "elsewhere", PYTHONPATH=str(tmp_path / "installed"))
    assert (f"training the bundled default example ({tmp_path / 'installed' / 'disttrain' / 'examples' / 'digits_mlp.toml'})"
            in proc.stdout)
    assert "done: 23 steps" in proc.stdout and os.path.isdir(tmp_path / "elsewhere" / "runs" / "digits-mlp")


def test_digits_cnn_learns(tmp_path):
    launch.disttrain("train", os.path.join(EXAMPLES, "digits_cnn.toml"), "--run-dir", tmp_path,
                     "--set", "training.epochs=4", ranks=2)
    assert _final_eval(tmp_path)["test_accuracy"] >= 0.9


def test_regression_example_fits_its_targets(tmp_path):
    launch.disttrain("train", os.path.join(EXAMPLES, "regression.toml"), "--run-dir", tmp_path, ranks=2)
    # the synthetic targets have unit variance per output: predicting their mean scores ~1.0
    assert _final_eval(tmp_path)["test_loss"] < 0.1


def test_custom_model_script_trains_on_two_ranks_and_prints_once(tmp_path):
    proc = launch.mpirun(2, [os.path.join(EXAMPLES, "custom_model.py")], cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("test accuracy")]
    assert len(lines) == 1 and float(lines[0].split()[-1]) >= 0.95


def test_custom_model_script_is_under_40_lines():
    with open(os.path.join(EXAMPLES, "custom_model.py")) as handle:
        assert len(handle.read().splitlines()) < 40


def test_wide_mlp_example_config_runs_a_few_steps(tmp_path):
    launch.disttrain("train", os.path.join(EXAMPLES, "wide_mlp.toml"), "--run-dir", tmp_path,
                     "--set", "training.max_steps=3", "--set", "data.samples=2048",
                     "--set", "model.hidden=[256, 256]", ranks=2)
    assert _final_eval(tmp_path)["step"] == 3


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"Fashion-MNIST IDX files absent ({FASHION}); "
                    "apt-get install dataset-fashion-mnist")
def test_fashion_mnist_mlp_learns_from_idx_files(tmp_path):
    launch.disttrain("train", os.path.join(EXAMPLES, "fashion_mlp.toml"), "--run-dir", tmp_path,
                     "--set", "training.epochs=1", ranks=2, timeout=600)
    assert _final_eval(tmp_path)["test_accuracy"] >= 0.8


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"Fashion-MNIST IDX files absent ({FASHION}); "
                    "apt-get install dataset-fashion-mnist")
def test_fashion_mnist_cnn_learns_from_idx_files(tmp_path):
    launch.disttrain("train", os.path.join(EXAMPLES, "fashion_cnn.toml"), "--run-dir", tmp_path,
                     "--set", "training.max_steps=200", ranks=2, timeout=600)
    final = _final_eval(tmp_path)
    assert final["step"] == 200 and final["test_accuracy"] >= 0.8  # 0.846 measured


@pytest.mark.parametrize("script", ["digits_mlp.py", "digits_cnn.py"])
def test_digits_scripts_train_on_two_ranks_to_95_percent(tmp_path, script):
    proc = launch.mpirun(2, [os.path.join(EXAMPLES, script)], cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("test accuracy")]
    assert len(lines) == 1 and float(lines[0].split()[2]) >= 0.95, proc.stdout
