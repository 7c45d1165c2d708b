"""Smoke tests of the benchmark harness (`python -m disttrain.bench`): it runs every system end to end on
a tiny model at 1 and 2 ranks and writes a complete, sane report. No timing assertions: speed is
measured by `make bench`, never asserted by tests.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from disttrain.bench import SYSTEMS, report, runner
from disttrain.bench.torch_ddp import torch_available

TINY = ["--layers", "16,32,4", "--batch", "8", "--steps", "3", "--warmup", "1", "--rounds", "1", "--quiet"]
CATEGORIES = ("forward", "backward", "comm", "wait", "optimizer", "other")
PARAMS = 16 * 32 + 32 + 32 * 4 + 4  # the tiny MLP 16-32-4


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    env["MPIEXEC_TIMEOUT"] = "240"
    proc = subprocess.run([sys.executable, "-m", "disttrain.bench", *TINY, "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(out) as f:
        return proc.stdout, json.load(f)


def check_entry(label, entry):
    """Every field of one system's result is present and sane (no timing thresholds)."""
    ranks = entry["ranks"]
    speed = entry["samples_per_s"]
    assert 0 < speed["min"] <= speed["median"] <= speed["max"] < math.inf, label
    assert len(entry["samples_per_s_per_round"]) == 1 and entry["steps_measured"] == 3, label
    assert set(entry["breakdown_s"]) == set(CATEGORIES), label
    for category, value in entry["breakdown_s"].items():
        if value is None:  # only DDP's communication, which runs inside its backward
            assert category in ("comm", "wait") and not entry["comm_measured"], label
        else:
            assert value >= -1e-6, (label, category, value)
    assert entry["blas_threads_per_rank"] == 2 // ranks, label
    assert entry["blas"] and entry["blas"] != "unknown", label
    assert len(entry["peak_rss_bytes_per_rank"]) == ranks and min(entry["peak_rss_bytes_per_rank"]) > 10 * 2**20
    assert len(entry["optimizer_state_bytes_per_rank"]) == ranks
    # Adam keeps two float32 moments for every parameter, spread over the ranks (torch's ZeRO unevenly:
    # it hands out whole tensors)
    assert sum(entry["optimizer_state_bytes_per_rank"]) >= 8 * PARAMS, label
    assert math.isfinite(entry["loss_first"]) and math.isfinite(entry["loss_last"]), label


def test_bench_runs_disttrain_and_numpy_at_one_and_two_ranks_and_reports_every_field(tmp_path):
    names = [name for name, system in SYSTEMS.items() if not system.needs_torch]
    stdout, result = run_bench(tmp_path, "--systems", ",".join(names), "--ranks", "1,2", "--cores", "2",
                               "--no-torch")
    expected = {f"{name}@{n}" for name in names for n in (1, 2) if SYSTEMS[name].runs_at(n)}
    ok = {r["label"]: r for r in result["results"] if r["status"] == "ok"}
    assert set(ok) == expected, [r for r in result["results"] if r["status"] != "ok"]
    assert result["config"]["workload"]["param_count"] == PARAMS
    for label, entry in ok.items():
        check_entry(label, entry)
    # same model, initial parameters and data everywhere: the first losses agree
    assert result["loss_check"]["spread"] < 1e-4
    # ZeRO-1 halves the optimizer state per rank compared with the non-sharded run on the same layout:
    # the two ranks' states add up to one full state, each within one alignment quantum of half of it
    sharded = ok["disttrain-zero1@2"]["optimizer_state_bytes_per_rank"]
    full = ok["disttrain-noshard@2"]["optimizer_state_bytes_per_rank"][0]
    assert len(sharded) == 2 and sum(sharded) == full
    assert all(abs(part - full / 2) <= 2 * 2 * 16 * 4 for part in sharded)  # Adam: 2 arrays x 2 ranks x 16 floats
    for label in ("disttrain-zero1@2", "numpy@2"):
        assert ok[label]["breakdown_s"]["wait"] is not None and ok[label]["comm_vs_raw"]["raw_s"] > 0
    ratio_names = {row["name"] for row in result["ratios"]}
    assert {"disttrain-zero1@2 / numpy@2", "disttrain-zero1@1 / numpy@1", "disttrain-plain@1 / numpy@1"} <= ratio_names
    assert all(row["throughput_ratio"] > 0 for row in result["ratios"])
    assert "disttrain-zero1@2" in stdout and "samples/s" in stdout and "BLAS" in stdout
    update = result["optimizer_update"]
    assert update["elements"] == -(-PARAMS // 2) and update["disttrain (numpy)"] > 0
    assert update["torch fused"] is None and "Adam update alone" in stdout


@pytest.mark.slow
@pytest.mark.skipif(not torch_available(), reason="torch not installed (make bench-deps)")
def test_bench_runs_pytorch_alone_and_ddp_with_zero_redundancy_optimizer(tmp_path):
    # torch's start-up (import, DDP construction) takes seconds per rank: two runs cover its three code paths
    _, result = run_bench(tmp_path, "--systems", "disttrain-zero1,torch,torch-ddp-zero", "--ranks", "1,2",
                          "--cores", "2")
    ok = {r["label"]: r for r in result["results"] if r["status"] == "ok"}
    assert {"torch@1", "torch-ddp-zero@2"} <= set(ok), result["results"]
    for label, entry in ok.items():
        check_entry(label, entry)
    assert ok["torch-ddp-zero@2"]["breakdown_s"]["comm"] is None  # inside DDP's backward, not separable
    assert ok["torch-ddp-zero@2"]["raw_collectives"]["gloo_allreduce"] > 0
    assert result["loss_check"]["spread"] < 1e-4
    assert {"disttrain-zero1@2 / torch-ddp-zero@2", "disttrain-zero1@1 / torch@1"} <= {r["name"] for r in result["ratios"]}


def test_bench_without_torch_says_how_to_install_it_and_skips_only_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "torch_available", lambda: False)
    out = tmp_path / "bench.json"
    code = runner.main([*TINY, "--systems", "numpy,torch,torch-ddp", "--ranks", "1", "--json", str(out)])
    assert code == 0
    assert "torch not installed: run make bench-deps" in capsys.readouterr().out
    with open(out) as f:
        results = {r["label"]: r for r in json.load(f)["results"]}
    assert results["numpy@1"]["status"] == "ok"
    for label in ("torch@1", "torch-ddp@1"):
        assert results[label]["status"] == "skipped"
        assert results[label]["reason"] == "torch not installed: run make bench-deps"


def test_a_run_that_fails_in_one_round_is_reported_from_the_others_and_fails_the_exit_code(tmp_path, monkeypatch, capsys):
    real_launch, calls = runner.launch, []

    def launch_failing_numpy_in_round_two(name, ranks, *args, **kwargs):
        calls.append(name)
        if name == "numpy" and calls.count("numpy") == 2:
            return {"ok": False, "error": "exit code 9:\nkilled by the test"}
        return real_launch(name, ranks, *args, **kwargs)
    monkeypatch.setattr(runner, "launch", launch_failing_numpy_in_round_two)
    out = tmp_path / "bench.json"
    argv = [*TINY, "--rounds", "2", "--systems", "disttrain-zero1,numpy", "--ranks", "1", "--json", str(out)]
    assert runner.main(argv) == 1
    assert "numpy@1" in capsys.readouterr().out
    with open(out) as f:
        result = json.load(f)
    numpy_entry = next(r for r in result["results"] if r["label"] == "numpy@1")
    assert numpy_entry["status"] == "ok" and numpy_entry["rounds_measured"] == [0]
    assert numpy_entry["failed_rounds"] and numpy_entry["failed_rounds"][0].startswith("round 2")
    row = next(r for r in result["ratios"] if r["name"] == "disttrain-zero1@1 / numpy@1")
    assert len(row["throughput_ratio_per_round"]) == 1  # only the round both systems completed


def test_waiting_is_the_time_until_the_last_rank_enters_the_collective():
    def rank(enter, leave):
        return {"hostname": "h", "recorder": {"phases": ["forward", "sync"],
                                              "steps": [{"t": [0.0, 0.010, 0.030],
                                                         "coll": [["allreduce", enter, leave]]}]}}
    # rank 1 reaches the collective 5 ms after rank 0; both leave at 25 ms
    steps = report.analyse_steps([rank(0.012, 0.025), rank(0.017, 0.025)], comm_measured=True)
    per_rank = steps[0]["per_rank"]
    assert per_rank[0]["wait"] == pytest.approx(0.005) and per_rank[1]["wait"] == pytest.approx(0.0)
    assert per_rank[0]["comm"] == pytest.approx(0.008) and per_rank[1]["comm"] == pytest.approx(0.008)
    assert per_rank[0]["forward"] == pytest.approx(0.010)
    assert per_rank[0]["other"] == pytest.approx(0.030 - 0.010 - 0.013)  # sync's time outside the call
    assert steps[0]["step_s"] == pytest.approx(0.030)


def test_bench_rejects_unknown_systems_and_malformed_layers():
    with pytest.raises(SystemExit):
        runner.main(["--systems", "numpy,nosuch", "--json", os.devnull])
    with pytest.raises(SystemExit):
        runner.main(["--layers", "784,a,10", "--json", os.devnull])


CNN_SMALL = ["--preset", "cnn", "--batch", "8", "--steps", "3", "--warmup", "1", "--rounds", "1", "--quiet",
             "--no-optimizer"]


def run_cnn_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    env["MPIEXEC_TIMEOUT"] = "240"
    proc = subprocess.run([sys.executable, "-m", "disttrain.bench", *CNN_SMALL, "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(out) as f:
        return proc.stdout, json.load(f)


def check_op_breakdown(label, entry):
    b = entry["op_breakdown_s"]
    assert set(b) == {"conv forward", "conv backward", "pool forward", "pool backward", "rest", "step"}, label
    assert all(b[c] > 0 for c in ("conv forward", "conv backward", "pool forward", "pool backward")), (label, b)
    assert b["rest"] >= 0 and b["step"] > 0, (label, b)  # each step holds its ops


def test_cnn_preset_trains_the_cnn_at_one_and_two_ranks_with_a_per_op_breakdown(tmp_path):
    stdout, result = run_cnn_bench(tmp_path, "--systems", "disttrain-plain,disttrain-zero1,numpy", "--ranks", "1,2",
                                   "--cores", "2", "--no-torch")
    workload = result["config"]["workload"]
    assert workload["model"] == "cnn" and workload["param_count"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 10 * 1568 + 10
    ok = {r["label"]: r for r in result["results"] if r["status"] == "ok"}
    assert set(ok) == {"disttrain-plain@1", "disttrain-zero1@1", "disttrain-zero1@2"}, result["results"]
    skipped = {r["label"]: r["reason"] for r in result["results"] if r["status"] == "skipped"}
    assert "MLP only" in skipped["numpy@1"] and "MLP only" in skipped["numpy@2"]
    for label, entry in ok.items():
        check_op_breakdown(label, entry)
    assert result["loss_check"]["spread"] < 1e-4
    assert "CNN 1x28x28" in stdout and "per-op step breakdown" in stdout


@pytest.mark.slow
@pytest.mark.skipif(not torch_available(), reason="torch not installed (make bench-deps)")
def test_cnn_preset_gives_pytorch_the_same_network_weights_and_data(tmp_path):
    _, result = run_cnn_bench(tmp_path, "--systems", "disttrain-plain,torch,torch-ddp", "--ranks", "1,2",
                              "--cores", "2")
    ok = {r["label"]: r for r in result["results"] if r["status"] == "ok"}
    assert {"disttrain-plain@1", "torch@1", "torch-ddp@2"} <= set(ok), result["results"]
    for label, entry in ok.items():
        check_op_breakdown(label, entry)
    # torch's conv -> ReLU -> pool and disttrain's conv -> pool(relu=True) agree from the same weights
    assert result["loss_check"]["spread"] < 1e-4


def test_layers_option_is_refused_for_the_cnn_preset():
    with pytest.raises(SystemExit, match="--layers sets the sizes of an MLP"):
        runner.main(["--preset", "cnn", "--layers", "784,10", "--json", os.devnull])
