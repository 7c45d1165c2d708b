"""`disttrain plot`: PNG charts of a run's metrics.jsonl or of a benchmark JSON (matplotlib optional)."""

from __future__ import annotations

import json
import os


class PlotError(RuntimeError):
    """Nothing to plot, unreadable input, or matplotlib missing; the message says which."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed: pip install 'disttrain[plot]' "
                        "(or: pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl (lines cut short by a crash are skipped)."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def plot(path: str, output: str | None = None) -> str:
    """Write a PNG for `path` (a run directory, its metrics.jsonl, or a benchmark .json); returns its path."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist (expected a run directory with metrics.jsonl, or a benchmark JSON)")
    if path.endswith(".jsonl"):
        return _plot_run(read_metrics(path), output or os.path.join(os.path.dirname(path), "metrics.png"))
    with open(path) as handle:
        try:
            data = json.load(handle)
        except ValueError as error:
            raise PlotError(f"{path} is not JSON: {error}") from None
    return _plot_bench(data, output or os.path.splitext(path)[0] + ".png")


def _plot_run(records: list, output: str) -> str:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise PlotError("metrics.jsonl holds no train or eval records yet")
    plt = _pyplot()
    has_accuracy = any("test_accuracy" in r for r in evals)
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    if train:
        loss_axis.plot([r["step"] for r in train], _values(train, "loss"), label="train loss", lw=1)
    if evals:
        loss_axis.plot([r["step"] for r in evals], _values(evals, "test_loss"), "o-", label="test loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.set_yscale("log")
    loss_axis.legend()
    if has_accuracy:
        accuracy = [r for r in evals if "test_accuracy" in r]
        axes[0][1].plot([r["step"] for r in accuracy], _values(accuracy, "test_accuracy"), "o-", color="C2")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("test accuracy")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def _values(records: list, key: str) -> list:
    """records' `key` as floats; a missing value or null (a non-finite number in metrics.jsonl) is NaN,
    which leaves a gap in the line."""
    return [float("nan") if r.get(key) is None else r[key] for r in records]


def _plot_bench(data: dict, output: str) -> str:
    systems = data.get("systems") or data.get("results")
    if not systems:
        raise PlotError("the JSON holds no benchmark systems to plot")
    plt = _pyplot()
    rows = systems.items() if isinstance(systems, dict) else [(s.get("name", str(i)), s) for i, s in enumerate(systems)]
    names, values = [], []
    for name, result in rows:
        value = result.get("samples_per_s_median") or result.get("samples_per_s", {}).get("median") \
            if isinstance(result, dict) else None
        if value:
            names.append(name)
            values.append(value)
    if not names:
        raise PlotError("no samples/s figures in the benchmark JSON")
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    axis.barh(names, values, color="C0")
    axis.set_xlabel("samples/s (median)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
