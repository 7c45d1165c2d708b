"""The `disttrain` command line: train, eval, export, plot, info, config, --help and --set, as a user
runs them (subprocesses, under real mpiexec where ranks matter), and what a run leaves behind:
metrics.jsonl records, progress output and BLAS thread choices.
"""

import json
import math
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import launch
from disttrain import checkpoint as ckpt, cli, config as config_module, threads
from disttrain.data import ArrayDataset
from disttrain.progress import MetricsFile

CONFIG = """
[model]
name = "mlp"
hidden = [16]

[data]
name = "synthetic"
samples = 254        # 203 train / 51 test
features = 12
classes = 4

[optimizer]
name = "adam"
lr = 0.01

[training]
epochs = 3
batch_size = 32
log_every = 2
seed = 1

[checkpoint]
every_steps = 0
every_epochs = 1
keep = 2
"""
STEPS = 21  # 3 epochs of 7 global batches
TRAIN_FIELDS = {"step", "epoch", "loss", "lr", "samples_per_s", "compute_s", "comm_s"}


def no_thread_variables():
    """Environment entries that hide the BLAS thread variables from choose_threads."""
    return {name: "" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}


def mpiexec_labelled(ranks, args, cwds, timeout=120, check=True, **env):
    """`mpiexec -l` (each output line prefixed with its rank), rank r working in cwds[r]."""
    argv = [launch.MPIEXEC, "-l"]
    for rank in range(ranks):
        argv += (([":"] if rank else []) + ["-n", "1", "-wdir", str(cwds[rank]), sys.executable, "-m",
                                            "disttrain", *map(str, args)])
    # hydra's own timeout fires first, so a hung job is ended with its ranks rather than orphaning them
    return launch.run(argv, timeout=timeout, check=check, **dict({"MPIEXEC_TIMEOUT": timeout - 20}, **env))


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-rank training run: rank 0 in `main/`, rank 1 in `other/`, both with the relative run dir
    `run` and one absolute checkpoint directory, so whatever rank 1 wrote would show up in `other/`."""
    root = tmp_path_factory.mktemp("cli")
    (root / "run.toml").write_text(CONFIG)
    main, other = root / "main", root / "other"
    main.mkdir()
    other.mkdir()
    checkpoints = root / "checkpoints"
    proc = mpiexec_labelled(2, ["train", root / "run.toml", "--run-dir", "run",
                                "--set", f"checkpoint.dir={json.dumps(str(checkpoints))}"], [main, other])
    return {"root": root, "run_dir": main / "run", "other": other, "checkpoints": checkpoints,
            "stdout": proc.stdout, "stderr": proc.stderr}


# ------------------------------------------------------------------------------------- help, config
def test_python_dash_m_disttrain_and_the_console_script_both_run_the_cli():
    for argv in ([sys.executable, "-m", "disttrain", "--help"], [os.path.join(launch.BIN, "disttrain"), "--help"]):
        proc = launch.run(argv, timeout=60)
        assert proc.stdout.startswith("usage: disttrain")


def test_top_level_help_lists_every_command_and_example_invocations(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "eval", "plot", "export", "info", "config", "bench"):
        assert f"\n    {command} " in text, command
    assert "examples:" in text and "mpiexec -n 4 disttrain train" in text and "--resume" in text


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: disttrain" in capsys.readouterr().out


@pytest.mark.parametrize("command, expected", [
    ("train", ["train a model described by a TOML config", "--set SECTION.KEY=VALUE", "--resume", "--run-dir"]),
    ("eval", ["evaluate the latest (or a given) checkpoint", "run directory"]),
    ("export", ["plain .npz", "--optimizer"]),
    ("plot", ["(needs matplotlib)", "--output"]),
    ("info", ["versions, MPI library, world size"]),
    ("config", ["every config key with its default"])])
def test_every_command_has_its_own_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: disttrain {command}")
    for phrase in expected:
        assert phrase in text


def test_config_command_lists_every_key_with_its_default_and_rule(capsys):
    assert cli.main(["config"]) == 0
    text = capsys.readouterr().out
    for section, fields in config_module.SCHEMA.items():
        assert f"[{section}]" in text
        for key, field in fields.items():
            assert f"  {key} = {config_module.toml_value(field.default)}   # {field.help}; {field.allowed()}" in text


def test_config_command_prints_toml_that_reads_back_as_every_default(capsys):
    assert cli.main(["config"]) == 0
    text = capsys.readouterr().out
    assert '  name = "mlp"   #' in text and "  sharded = true   #" in text and "  hidden = [128]   #" in text
    assert config_module.validate(config_module.tomllib.loads(text)) == config_module.defaults()


def test_version_prints_the_package_version(capsys):
    from disttrain import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"disttrain {__version__}\n"


@pytest.mark.parametrize("command", [["config"], ["info"], ["--help"]])
def test_a_closed_stdout_ends_the_command_quietly(command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as after `| head -1`
    try:
        proc = subprocess.run([sys.executable, "-m", "disttrain", *command], stdout=write_end, stderr=subprocess.PIPE,
                              env=launch.env(), text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == "" and proc.returncode in (0, 1)

# -------------------------------------------------------------------------------------------- --set
@pytest.mark.parametrize("text, expected", [
    ("training.epochs=5", ("training", "epochs", 5)),
    ("optimizer.lr=3e-4", ("optimizer", "lr", 3e-4)),
    ("model.hidden=[64, 32]", ("model", "hidden", [64, 32])),
    ("checkpoint.resume=true", ("checkpoint", "resume", True)),
    ('training.run_dir="runs/a b"', ("training", "run_dir", "runs/a b")),
    ("training.run_dir=runs/plain", ("training", "run_dir", "runs/plain")),  # bare words are strings
    ("training.run_dir=runs/x=1", ("training", "run_dir", "runs/x=1")),  # only the first '=' splits
    (" data.name = synthetic", ("data", "name", "synthetic")),
])
def test_set_values_are_read_as_toml_else_as_plain_strings(text, expected):
    assert config_module.parse_override(text) == expected


def test_set_overrides_the_file_and_the_result_is_validated(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    config = config_module.load_config(str(tmp_path / "run.toml"), ["training.epochs=7", "optimizer.name=sgd",
                                                                    "model.hidden=[8, 8]"])
    assert config["training"]["epochs"] == 7 and config["optimizer"]["name"] == "sgd"
    assert config["model"]["hidden"] == [8, 8] and config["training"]["batch_size"] == 32


@pytest.mark.parametrize("override, message", [
    ("epochs=5", "--set 'epochs=5': expected section.key=value"),
    ("training.epochs", "expected section.key=value"),
    ("training.epoch=5", "--set training.epoch=5: unknown key 'training.epoch' (did you mean 'epochs'?)"),
    ("traning.epochs=5", "unknown section [traning] (did you mean [training]?)"),
    ("training.epochs=abc", "training.epochs = 'abc' is not allowed: expected an integer >= 1"),
    ("optimizer.name=adagrad", "optimizer.name = 'adagrad' is not allowed: expected one of 'sgd', 'adam', 'adamw'"),
    ("optimizer.lr=0", "optimizer.lr = 0.0 is not allowed: expected a number > 0.0"),
    ("training.lr=0.1", "--set training.lr=0.1: unknown key 'training.lr' (did you mean optimizer.lr?)"),
    ("optimizer.epochs=2", "unknown key 'optimizer.epochs' (did you mean training.epochs?)"),
    ("model.name=Mlp", "model.name = 'Mlp' is not allowed: expected one of 'mlp', 'cnn', 'gpt', or 'module:callable'"),
])
def test_a_bad_set_names_the_key_the_value_and_what_is_allowed(tmp_path, override, message):
    (tmp_path / "run.toml").write_text(CONFIG)
    with pytest.raises(config_module.ConfigError) as error:
        config_module.load_config(str(tmp_path / "run.toml"), [override])
    assert message in str(error.value)


def test_an_unknown_key_in_the_file_names_the_file_and_suggests_the_key(tmp_path):
    (tmp_path / "typo.toml").write_text(CONFIG.replace("log_every", "log_evry"))
    proc = launch.disttrain("train", "typo.toml", check=False, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("disttrain: error: typo.toml: unknown key 'training.log_evry' "
                                          "(did you mean 'log_every'?); allowed keys in [training]: epochs,")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("epochs = 3\n" + CONFIG, "top.toml: key 'epochs' = 3 is outside any section (did you mean [training] epochs?)"),
    ("seed = 3\n" + CONFIG, "key 'seed' = 3 is outside any section (did you mean [data] seed or [training] seed?)"),
    ("colour = 3\n" + CONFIG, "key 'colour' = 3 is outside any section; allowed sections: model, data,"),
    (CONFIG.replace("batch_size = 32", 'batch_size = "32"'),
     "top.toml: config key training.batch_size = '32' is not allowed: expected an integer >= 1"),
])
def test_a_file_error_names_the_file_and_where_a_stray_key_belongs(tmp_path, text, message):
    (tmp_path / "top.toml").write_text(text)
    with pytest.raises(config_module.ConfigError) as error:
        config_module.load_config(str(tmp_path / "top.toml"))
    assert message in str(error.value)


def test_a_config_error_under_mpiexec_is_printed_once_by_rank_0_and_fails_the_job(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    proc = mpiexec_labelled(2, ["train", "run.toml", "--set", "training.epoch=5"], [tmp_path, tmp_path],
                            check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "disttrain: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("[0] ") and "did you mean 'epochs'?" in errors[0]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------------------ train: metrics and progress
def test_metrics_jsonl_records_every_logged_step_with_loss_lr_throughput_and_timings(run):
    records = read_metrics(run["run_dir"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2))
    for record in train:
        assert TRAIN_FIELDS <= set(record)
        assert all(math.isfinite(record[key]) for key in TRAIN_FIELDS)
        assert record["epoch"] == (record["step"] - 1) // 7 + 1
        assert record["lr"] == pytest.approx(0.01) and record["samples_per_s"] > 0
        assert record["compute_s"] > 0 and record["comm_s"] >= 0
    assert train[-1]["loss"] < train[0]["loss"]


def test_metrics_jsonl_records_test_metrics_after_every_epoch(run):
    records = read_metrics(run["run_dir"])
    evals = [r for r in records if r["kind"] == "eval"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(7, 1), (14, 2), (21, 3)]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(7, 1), (14, 2), (21, 3)]
    for record in evals:
        assert record["test_loss"] > 0 and 0 <= record["test_accuracy"] <= 1
        # 51 test samples: an accuracy is a whole number of them, scored once each across the ranks
        assert record["test_accuracy"] * 51 == pytest.approx(round(record["test_accuracy"] * 51))
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]


def test_only_rank_0_writes_metrics_and_prints(run):
    assert os.path.isfile(run["run_dir"] / "metrics.jsonl")
    assert os.listdir(run["other"]) == []  # rank 1 ran in other/ with the same relative run dir
    assert not [line for line in (run["stdout"] + run["stderr"]).splitlines() if line.startswith("[1]")]
    # the checkpoints, by contrast, hold a file from each rank
    manifest = ckpt.read_manifest(os.path.join(run["checkpoints"], ckpt.step_dirname(STEPS)))
    assert manifest["world_size"] == 2 and "optimizer-part-00001.npz" in manifest["files"]


def test_progress_without_a_terminal_is_plain_lines_every_log_every_steps_from_rank_0(run):
    text = run["stdout"]
    assert "\r" not in text and "\033" not in text
    for step in range(2, STEPS + 1, 2):
        assert text.count(f"step {step}/{STEPS} ") == 1, step
    assert text.count(f"step 1/{STEPS} ") == 0
    assert text.count("disttrain: world 2 (1 node(s) x 2 ranks on this node)") == 1
    for epoch in (1, 2, 3):
        assert text.count(f"epoch {epoch}/3  train_loss") == 1
    assert text.count("done: 21 steps") == 1


def _run_on_a_terminal(argv, cwd, timeout=120):
    """(exit code, output) of argv with stdout and stderr on a pseudo-terminal."""
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(argv, stdout=child_fd, stderr=child_fd, cwd=cwd, env=launch.env())
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 1.0)
            if ready:
                try:
                    data = os.read(main_fd, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"timed out after {timeout}s: {argv}")
        return proc.wait(timeout=30), b"".join(chunks).decode()
    finally:
        os.close(main_fd)


def test_progress_on_a_terminal_is_one_live_line_with_loss_throughput_and_eta(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    code, text = _run_on_a_terminal([sys.executable, "-m", "disttrain", "train", "run.toml", "--run-dir", "tty"],
                                    tmp_path)
    assert code == 0, text
    assert text.count("\r[") == STEPS  # redrawn after every step, not only every log_every
    assert f"] step {STEPS}/{STEPS}  epoch 3  loss " in text and "samples/s  ETA " in text
    assert "\033[K" in text and "epoch 3/3  train_loss" in text


# ---------------------------------------------------------------------------------------- eval, export
def test_eval_reports_the_latest_checkpoints_test_metrics_on_any_number_of_ranks(run):
    final = [r for r in read_metrics(run["run_dir"]) if r["kind"] == "eval"][-1]
    for ranks in (0, 3):
        proc = launch.disttrain("eval", run["checkpoints"], ranks=ranks, timeout=120, cwd=run["root"],
                                MPIEXEC_TIMEOUT=100)
        line = proc.stdout.strip()
        assert line.startswith(f"{os.path.join(run['checkpoints'], ckpt.step_dirname(STEPS))}: step {STEPS}, ")
        values = dict(part.split() for part in line.split(", ")[1:])
        assert float(values["test_loss"]) == pytest.approx(final["test_loss"], abs=1e-4)
        assert float(values["test_accuracy"]) == pytest.approx(final["test_accuracy"], abs=1e-4)


def test_eval_of_a_directory_without_checkpoints_is_a_clear_error(tmp_path):
    proc = launch.disttrain("eval", tmp_path, check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("disttrain: error: no usable checkpoint under") and "Traceback" not in proc.stderr


def test_export_writes_the_parameters_as_a_plain_npz(run, tmp_path):
    output = tmp_path / "model.npz"
    proc = launch.disttrain("export", run["checkpoints"], output, timeout=60)
    assert f"wrote {output}: 4 parameter arrays" in proc.stdout and f"(step {STEPS})" in proc.stdout
    checkpoint_path = os.path.join(run["checkpoints"], ckpt.step_dirname(STEPS))
    with np.load(output, allow_pickle=False) as exported, \
            np.load(os.path.join(checkpoint_path, "model.npz"), allow_pickle=False) as saved:
        assert sorted(exported.files) == sorted(saved.files) == ["1.bias", "1.weight", "3.bias", "3.weight"]
        for name in saved.files:
            assert exported[name].dtype == np.float32 and np.array_equal(exported[name], saved[name])
    assert not os.path.exists(str(output) + ".tmp")


def test_export_with_optimizer_gathers_every_ranks_shard_into_full_adam_moments(run, tmp_path):
    # the 2-rank run's moments, gathered from both shards, against the same training in one process
    reference_dir = tmp_path / "single"
    launch.disttrain("train", run["root"] / "run.toml", "--run-dir", reference_dir, timeout=120, cwd=tmp_path)
    launch.disttrain("export", run["checkpoints"], tmp_path / "two.npz", "--optimizer", timeout=60)
    launch.disttrain("export", reference_dir, tmp_path / "one.npz", "--optimizer", timeout=60)
    with np.load(tmp_path / "two.npz", allow_pickle=False) as two, np.load(tmp_path / "one.npz", allow_pickle=False) as one:
        names = ["1.bias", "1.weight", "3.bias", "3.weight"]
        assert sorted(two.files) == sorted(names + [f"optimizer.{key}.{name}" for key in ("exp_avg", "exp_avg_sq")
                                                    for name in names] + ["optimizer.step"])
        assert two["optimizer.step"].shape == () and int(two["optimizer.step"]) == STEPS == int(one["optimizer.step"])
        for name in names:
            for key in ("exp_avg", "exp_avg_sq"):
                moment = two[f"optimizer.{key}.{name}"]
                assert moment.shape == two[name].shape and moment.dtype == np.float32
                assert np.abs(moment).max() > 0
                # float32 reduction order differs between 1 and 2 ranks (see test_equivalence.py)
                np.testing.assert_allclose(moment, one[f"optimizer.{key}.{name}"], rtol=1e-4, atol=1e-7)


def test_export_and_plot_under_mpiexec_write_their_file_once_from_rank_0(run, tmp_path):
    output = tmp_path / "model.npz"
    proc = launch.disttrain("export", run["checkpoints"], output, "--optimizer", ranks=3, timeout=120, cwd=tmp_path,
                            MPIEXEC_TIMEOUT=100)
    assert proc.stdout.count("wrote ") == 1 and proc.stderr == ""
    with np.load(output, allow_pickle=False) as exported:
        assert "optimizer.exp_avg.1.weight" in exported.files
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]  # no temporary file left by another process
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'disttrain[plot]')")
    proc = launch.disttrain("plot", run["run_dir"], "-o", tmp_path / "plot.png", ranks=3, timeout=120,
                            MPIEXEC_TIMEOUT=100)
    assert proc.stdout.count("wrote ") == 1 and proc.stderr == ""


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    proc = launch.disttrain("export", tmp_path / "nowhere", tmp_path / "out.npz", check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("disttrain: error: no usable checkpoint under") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "out.npz")


# ---------------------------------------------------------------------------------------------- plot
def test_plot_without_matplotlib_says_how_to_install_it(run, tmp_path):
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    output = tmp_path / "plot.png"
    proc = launch.disttrain("plot", run["run_dir"], "-o", output, check=False, timeout=60,
                            PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "blocker"),
                                                                     os.environ.get("PYTHONPATH")])))
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("disttrain: error: plotting needs matplotlib, which is not installed: "
                                   "pip install 'disttrain[plot]' (or: pip install matplotlib)")
    assert not os.path.exists(output)


def test_plot_writes_a_png_of_loss_and_accuracy_next_to_the_metrics(run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'disttrain[plot]')")
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    with open(run["run_dir"] / "metrics.jsonl") as source:
        (run_dir / "metrics.jsonl").write_text(source.read() + '{"kind": "train", "step": 99, "lo')  # cut short
    proc = launch.disttrain("plot", run_dir, timeout=120)
    assert proc.stdout.strip() == f"wrote {run_dir / 'metrics.png'}"
    with open(run_dir / "metrics.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_run_without_metrics_is_a_clear_error(tmp_path):
    proc = launch.disttrain("plot", tmp_path, check=False, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"disttrain: error: {tmp_path / 'metrics.jsonl'} does not exist")


def test_metrics_jsonl_writes_non_finite_numbers_as_null(tmp_path):
    metrics = MetricsFile(str(tmp_path / "metrics.jsonl"))
    metrics.write({"kind": "train", "step": 1, "loss": float("nan"), "lr": 0.5, "grads": [float("inf"), 1.0]})
    metrics.close()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"kind": "train", "step": 1, "loss": None, "lr": 0.5,
                                                        "grads": [None, 1.0]}


def test_plot_leaves_a_gap_for_a_null_loss(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'disttrain[plot]')")
    records = [{"kind": "train", "step": 1, "loss": 1.0}, {"kind": "train", "step": 2, "loss": None},
               {"kind": "eval", "step": 2, "test_loss": None, "test_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = launch.disttrain("plot", tmp_path, timeout=120)
    assert proc.stdout.strip() == f"wrote {tmp_path / 'metrics.png'}"


# ------------------------------------------------------------------------------------ info, threads
def _expected_threads(ranks_on_node):
    return max(1, threads.cores_available() // ranks_on_node)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_info_reports_versions_mpi_world_and_blas_threads_of_cores_per_rank(ranks):
    proc = launch.disttrain("info", ranks=ranks, timeout=120, MPIEXEC_TIMEOUT=100, **no_thread_variables())
    text = proc.stdout
    expected = _expected_threads(ranks)
    assert text.startswith("disttrain 0.1.0; Python ") and f"numpy {np.__version__}" in text
    assert "MPI: mpi4py " in text and "MPICH" in text
    assert f"world size: {ranks}; nodes: 1 " in text and f"ranks on this node: {ranks}" in text
    assert (f"BLAS threads per rank: {expected} ({threads.cores_available()} cores / {ranks} ranks on this node)"
            in text)
    for rank in range(ranks):
        assert f"  rank {rank}: node 0, {expected} BLAS thread(s)" in text
    blas = [line for line in text.splitlines() if line.startswith("BLAS: ")]
    assert blas and all(line.endswith(f", {expected} thread(s)") for line in blas)  # applied, not only chosen


def test_info_and_train_honour_a_thread_count_the_user_set(tmp_path):
    proc = launch.disttrain("info", ranks=2, timeout=120, MPIEXEC_TIMEOUT=100,
                            **dict(no_thread_variables(), OMP_NUM_THREADS="1"))
    assert "BLAS threads per rank: 1 ($OMP_NUM_THREADS)" in proc.stdout
    (tmp_path / "run.toml").write_text(CONFIG)
    proc = launch.disttrain("train", "run.toml", "--set", "training.threads=1", "--set", "training.epochs=1",
                            timeout=120, cwd=tmp_path, **no_thread_variables())
    assert "1 BLAS thread(s) per rank (training.threads)" in proc.stdout


@pytest.mark.parametrize("cores, cpu_count, local_size, expected", [
    (8, 8, 1, (8, "8 cores / 1 ranks on this node")),
    (8, 8, 3, (2, "8 cores / 3 ranks on this node")),
    (2, 2, 4, (1, "2 cores / 4 ranks on this node")),  # never zero threads
    (2, 16, 4, (2, "2 cores pinned to this rank")),  # srun --cpu-bind already divided the node
])
def test_threads_per_rank_are_the_node_cores_divided_by_the_ranks_on_it(monkeypatch, cores, cpu_count, local_size,
                                                                         expected):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "cores_available", lambda: cores)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cpu_count)
    assert threads.choose_threads(local_size) == expected
    assert threads.choose_threads(local_size, requested=5) == (5, "training.threads")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert threads.choose_threads(local_size) == (3, "$OPENBLAS_NUM_THREADS")


# ------------------------------------------------------------------------------- model and data fit
def test_check_model_fits_also_runs_the_loss_on_the_probe():
    from disttrain import models
    from disttrain.training import check_model_fits

    x = np.zeros((4, 3), np.float32)
    model = models.mlp((3,), 2, hidden=(4,))
    check_model_fits(model, ArrayDataset(x, np.zeros(4, np.int64)), {"task": "classification", "classes": 2})
    column = ArrayDataset(x, np.zeros((4, 1), np.int64))  # built by hand: not shaped by the npy loader
    with pytest.raises(ValueError, match=r"the loss does not accept the model's output \(2, 2\) with labels of "
                                         r"shape \(2, 1\) int64: cross_entropy: labels shape \(2, 1\)"):
        check_model_fits(model, column, {"task": "classification", "classes": 2})


# ------------------------------------------------------------------------------- fresh run, old dir
def test_training_again_in_a_run_dir_notes_old_checkpoints_or_resumes_or_says_the_run_is_complete(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    launch.disttrain("train", "run.toml", "--run-dir", "run", timeout=120, cwd=tmp_path)
    checkpoints = str(tmp_path / "run" / "checkpoints")
    assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [14, 21]

    proc = launch.disttrain("train", "run.toml", "--run-dir", "run", "--set", "training.epochs=1", timeout=120,
                            cwd=tmp_path)
    assert (f"note: {os.path.join('run', 'checkpoints')} holds checkpoints of an earlier run (up to step 21); "
            f"this run starts from the beginning") in proc.stdout
    assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [7]
    with open(os.path.join(checkpoints, ckpt.LATEST)) as handle:
        assert handle.read().strip() == "step-00000007"
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 7

    proc = launch.disttrain("train", "run.toml", "--run-dir", "run", "--resume", timeout=120, cwd=tmp_path)
    assert "note:" not in proc.stdout and "resumed from run/checkpoints/step-00000007 at step 7 (epoch 2)" in proc.stdout
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == STEPS

    proc = launch.disttrain("train", "run.toml", "--run-dir", "run", "--resume", timeout=120, cwd=tmp_path)
    assert "at step 21 (the run is already complete: nothing to train)" in proc.stdout


# ------------------------------------------------------------------------------------------ resuming
def test_train_with_resume_before_the_config_resumes_that_config(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    launch.disttrain("train", "run.toml", "--run-dir", "run", "--set", "training.epochs=1", timeout=120, cwd=tmp_path)
    proc = launch.disttrain("train", "--resume", "run.toml", "--run-dir", "run", timeout=120, cwd=tmp_path)
    assert "resumed from run/checkpoints/step-00000007 at step 7 (epoch 2)" in proc.stdout
    # without a config, the bundled default example is what resumes: not the model of run.toml
    proc = launch.disttrain("train", "--resume", "run", check=False, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "training the bundled default example" in proc.stdout
    assert "cannot resume run/checkpoints/step-00000021 with a changed model.hidden = [128]" in proc.stderr


def test_bare_resume_on_a_run_without_checkpoints_starts_from_the_beginning(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    proc = launch.disttrain("train", "run.toml", "--run-dir", "fresh", "--set", "training.epochs=1", "--resume",
                            timeout=120, cwd=tmp_path)
    assert "no checkpoint in fresh/checkpoints yet: starting from the beginning" in proc.stdout
    assert "done: 7 steps" in proc.stdout


def test_the_resume_line_after_a_stop_signal_is_a_command_that_runs_as_is(tmp_path):
    (tmp_path / "run.toml").write_text(CONFIG)
    run_dir = tmp_path / "my run"  # a space: the command must quote it
    argv = [os.path.join(launch.BIN, "disttrain"), "train", "run.toml", "--set", "training.epochs=10",
            "--run-dir", str(run_dir), "--set", "optimizer.lr=0.01"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=launch.env(DISTTRAIN_FAULT="sleep:0:*:0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(run_dir / "metrics.jsonl") or "step" not in (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    expected = shlex.join(["disttrain", "train", "run.toml", "--set", "training.epochs=10", "--set",
                           "optimizer.lr=0.01", "--run-dir", str(run_dir), "--resume"])
    lines = [line for line in out.splitlines() if "resume with: " in line]
    assert len(lines) == 1 and lines[0].endswith(f"resume with: {expected}"), out
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "disttrain"
    resumed = launch.run([os.path.join(launch.BIN, "disttrain"), *command[1:]], timeout=120, cwd=tmp_path)
    assert "resumed from " in resumed.stdout and "done: 70 steps" in resumed.stdout
