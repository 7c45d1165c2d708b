"""The GPT benchmark's parts: a worker run of each side, the same losses on both sides from the same
weights and batches, and the round-by-round ratios and report."""

import importlib.util
import json
import sys

import numpy as np
import pytest

import launch
from disttrain.bench import gpt


def _worker(tmp_path, side, steps=3, mode="speed", extra=()):
    out = tmp_path / side
    launch.run([sys.executable, "-m", "disttrain.bench.gpt_worker", "--side", side, "--mode", mode, "--steps",
                str(steps), "--warmup", "1", "--threads", "1", "--out", str(out), *extra], timeout=300,
               DISTTRAIN_CACHE_DIR=str(tmp_path / "cache"))
    with open(f"{out}.rank0.json") as handle:
        return json.load(handle)


def test_a_disttrain_speed_run_reports_tokens_phases_and_memory(tmp_path):
    record = _worker(tmp_path, "disttrain")
    assert record["tokens_per_s"] > 0 and record["seconds"] > 0
    assert set(record["phases"]) == {"forward", "backward", "sync", "optimizer"}
    assert len(record["losses"]) == 3 and all(3.0 < loss < 6.0 for loss in record["losses"])
    assert record["peak_rss_bytes"] > 50 * 2**20


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (make bench-deps installs the CPU build)")
def test_both_sides_take_the_same_steps_from_the_same_weights_and_batches(tmp_path):
    ours = _worker(tmp_path, "disttrain")["losses"]
    theirs = _worker(tmp_path, "torch-written")["losses"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]


def test_ratios_are_taken_against_the_faster_torch_variant_round_by_round():
    tokens = {("disttrain", 2): [120.0, 90.0, 150.0], ("torch-fused", 2): [100.0, 100.0, 100.0],
              ("torch-written", 2): [80.0, 50.0, 125.0]}
    ratio = gpt.ratios(tokens, 2, ["disttrain", "torch-fused", "torch-written"])
    assert ratio["per_round"] == pytest.approx([1.2, 0.9, 1.2]) and ratio["median"] == pytest.approx(1.2)
    assert gpt.ratios(tokens, 1, ["disttrain", "torch-fused"]) is None


def test_the_report_states_each_target_and_whether_it_is_met():
    summary = {"config": {"source": "abc", "load_average": [1.0, 1.0]},
               "tokens_per_s": {"disttrain@1": [80.0], "torch-fused@1": [100.0]},
               "ratio_one_process": {"per_round": [0.8], "median": 0.8},
               "ratio_ranks": {"per_round": [1.1], "median": 1.1},
               "peak_rss_bytes": {"disttrain@1": [2**29]},
               "curves": {"disttrain": {"losses": [3.0] * 20, "eval": {"0": 5.0, "20": 2.039}},
                          "torch-fused": {"losses": [3.0] * 20, "eval": {"0": 5.0, "20": 2.0}}}}
    text = gpt.format_report(summary, 2)
    assert "1 process: 0.80x (rounds: 0.80); target >= 0.8x: meets" in text
    assert "2 ranks: 1.10x (rounds: 1.10); target >= 1.2x: MISSES" in text
    assert "1.95% apart; target within 2%: meets" in text and "disttrain@1 512" in text
