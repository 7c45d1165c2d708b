"""The alpha-beta model of disttrain's collectives: fit it to measured times, check it against measured
training steps, and extrapolate to more hosts and faster links.

    python scripts/scaling/fit_model.py docs/scaling.json     # re-analyse saved measurements, print tables

Model (ring algorithms over p ranks, n bytes of the full float32 buffer):
    reduce_scatter(n) = allgather(n) = (p - 1) alpha + (p - 1)/p n beta
    allreduce(n)      = 2 (p - 1) alpha + 2 (p - 1)/p n beta
Each measured curve T(n) is fitted as T = A + B n, A from small messages (up to 64 KB) and B from large
ones (1 MB and up), then alpha = A / (k (p - 1)) and beta = B / (k (p - 1)/p) with k = 2 for allreduce,
1 otherwise. One ZeRO-1 step communicates reduce_scatter + allgather per bucket plus one 40-byte stats
allreduce; the predicted step is the slowest rank's forward+backward plus that predicted communication
plus the optimizer and bookkeeping as measured.

Overlap (DataParallel(overlap=True)): a bucket's reduce-scatter starts once backward has produced all
its gradients, buckets from the last to the first, one at a time on one thread. `predict_step` takes
forward, backward and update times measured without overlap and schedules the reduce-scatters:
    step = forward + max(backward, end of the last reduce-scatter) + update + allgather
where a bucket is ready when backward has reached its first parameter (backward time taken as
proportional to parameter elements, as an MLP's matmuls are). In the two limits this is
forward + max(backward, RS of all buckets but the last-launched) + RS of the last-launched + ...
(communication-bound) and forward + backward + RS of the last-launched + ... (compute-bound). With one
bucket (the 25 MB default and the benchmark MLP's 7.5 MB of gradients) nothing overlaps.
"""

from __future__ import annotations

import json
import sys

import numpy as np

RING_FACTOR = {"allreduce": 2, "reduce_scatter": 1, "allgather": 1}
STATS_BYTES = 40  # the trainer's per-step float64 stats allreduce (5 values)
HOSTS = (8, 16, 32, 64)
GBITS = (1, 10, 100)
TARGET = 0.15  # predicted within +-15% of measured at 2 hosts
LATENCY_BYTES = 64 << 10  # messages up to this size measure the start-up cost alpha
BANDWIDTH_BYTES = 1 << 20  # messages from this size on measure the per-byte cost beta
WARMUP_STEPS = 5  # train_steps.py's default: steps run but left out of its medians


def fit_curve(points: list) -> dict:
    """T = A + B n through [(bytes, seconds)]: A from the latency regime (median time of the messages up
    to LATENCY_BYTES), B by least squares of T - A = B n over the bandwidth regime (BANDWIDTH_BYTES and
    up). One line through every size would let the many small messages pull B off: the link's token
    bucket (256 KB burst) passes small messages at memory speed, and on shared cores they are noisy.

    Returns {"A", "B", "max_rel_error"}: the largest |fit - measured| / measured over the bandwidth regime."""
    small = [t for n, t in points if n <= LATENCY_BYTES]
    large = [(n, t) for n, t in points if n >= BANDWIDTH_BYTES]
    if not small or not large:
        raise ValueError(f"need sizes <= {LATENCY_BYTES} and >= {BANDWIDTH_BYTES} bytes, got {sorted(points)}")
    intercept = float(np.median(small))
    n = np.array([p[0] for p in large], float)
    t = np.array([p[1] for p in large], float)
    slope = float(np.sum(n * (t - intercept)) / np.sum(n * n))
    fitted = intercept + slope * n
    return {"A": intercept, "B": slope, "max_rel_error": float(np.max(np.abs(fitted - t) / t))}


def alpha_beta(fit: dict, collective: str, p: int) -> dict:
    """alpha (s per message step) and beta (s per byte) of the ring model behind fitted A + B n."""
    k = RING_FACTOR[collective]
    return {"alpha_s": fit["A"] / (k * (p - 1)), "beta_s_per_byte": fit["B"] / (k * (p - 1) / p),
            "bandwidth_gbit_s": 8e-9 / (fit["B"] / (k * (p - 1) / p))}


def ring_time(collective: str, nbytes: float, p: int, alpha: float, beta: float) -> float:
    """The ring model's time of one collective of `nbytes` over p ranks."""
    k = RING_FACTOR[collective]
    return k * ((p - 1) * alpha + (p - 1) / p * nbytes * beta)


def fit_collectives(measurement: dict) -> dict:
    """{impl: {collective: fit + alpha/beta}} for one configuration's measure_collectives.py output."""
    p = measurement["world_size"]
    fits = {}
    for result in measurement["results"]:
        fits.setdefault(result["impl"], {}).setdefault(result["collective"], []).append(
            (result["bytes"], result["seconds"]))
    return {impl: {collective: {**fit_curve(points), **alpha_beta(fit_curve(points), collective, p),
                                "points": len(points)}
                   for collective, points in by_collective.items()}
            for impl, by_collective in fits.items()}


def predicted_comm(fits: dict, bucket_bytes: list) -> float:
    """Seconds of one ZeRO-1 step's communication: reduce_scatter + allgather per bucket, stats allreduce."""
    seconds = fits["allreduce"]["A"] + fits["allreduce"]["B"] * STATS_BYTES
    for nbytes in bucket_bytes:
        seconds += sum(fits[c]["A"] + fits[c]["B"] * nbytes for c in ("reduce_scatter", "allgather"))
    return seconds


def bucket_ready_fractions(param_elements: list, bucket_elements: list) -> list:
    """For each bucket (flat order), the fraction of backward done when all its gradients exist.

    Parameters lie in the flat buffer in forward order and backward produces them last to first, in a
    time taken as proportional to their elements: parameter i is done at (elements of i..last) / total,
    and a bucket when the first parameter overlapping it is (padding-only buckets: at once)."""
    total = sum(param_elements)
    done_at, remaining = [], total
    for elements in param_elements:
        done_at.append(remaining / total)
        remaining -= elements
    fractions, lo = [], 0
    for length in bucket_elements:
        starts, first = 0, None
        for index, elements in enumerate(param_elements):
            if starts < lo + length and starts + elements > lo:
                first = index
                break
            starts += elements
        fractions.append(done_at[first] if first is not None else 0.0)
        lo += length
    return fractions


def overlapped_sync_end(backward_s: float, ready_fractions: list, rs_seconds: list) -> float:
    """Seconds after backward starts when the last bucket's reduce-scatter ends: buckets launched from
    the last to the first, each once it is ready (ready_fractions x backward_s) and the one before it
    has finished (one communication thread)."""
    end = 0.0
    for ready, seconds in zip(reversed(ready_fractions), reversed(rs_seconds)):
        end = max(end, ready * backward_s) + seconds
    return end


def predict_step(parts: dict, fits: dict, bucket_bytes: list, ready_fractions: list, overlap: bool) -> dict:
    """Predicted step of the low-level ZeRO-1 loop from its compute parts and the fitted collectives.

    `parts`: forward_s, backward_s (pure compute: measured without overlap), update_s (Adam on the
    shard) and other_s (the rest). Without overlap: forward + backward + reduce-scatter of every bucket +
    one small allreduce (which parameters had gradients) + update + allgather of every bucket + other.
    With overlap the reduce-scatters run as scheduled by overlapped_sync_end. Returns the step and its
    pieces (reduce_scatter_s in all, hidden_reduce_scatter_s the part that ran during backward)."""
    rs = [fits["reduce_scatter"]["A"] + fits["reduce_scatter"]["B"] * n for n in bucket_bytes]
    allgather = sum(fits["allgather"]["A"] + fits["allgather"]["B"] * n for n in bucket_bytes)
    flags = fits["allreduce"]["A"]
    backward = parts["backward_s"]
    if overlap:
        sync_end = overlapped_sync_end(backward, ready_fractions, rs)
        exposed = max(0.0, sync_end - backward)
    else:
        exposed = sum(rs)
    step = parts["forward_s"] + backward + exposed + flags + parts["update_s"] + allgather + parts.get("other_s", 0.0)
    return {"step_s": step, "reduce_scatter_s": sum(rs), "hidden_reduce_scatter_s": max(0.0, sum(rs) - exposed),
            "allgather_s": allgather}


def compare_training(run: dict, fits: dict) -> dict:
    """Predicted vs measured step and communication time of one measured training configuration.

    A step is the slowest rank's forward+backward, then the collectives, then the optimizer and the
    bookkeeping: predicted = slowest_compute_s + predicted communication + (optimizer and the rest, as
    rank 0 measured them). Its communication is compared with least_comm_s, the collectives' own time
    (the rank arriving last does not wait for the others)."""
    buckets = [4 * elements for elements in run["bucket_elements"]]
    comm = predicted_comm(fits, buckets)
    rest = run["step_s"] - run["compute_s"] - run["comm_s"]  # optimizer and bookkeeping, rank 0
    step = run["slowest_compute_s"] + comm + rest
    return {"predicted_comm_s": comm, "measured_comm_s": run["least_comm_s"], "predicted_step_s": step,
            "measured_step_s": run["step_s"], "step_error": step / run["step_s"] - 1,
            "comm_error": comm / run["least_comm_s"] - 1, "within_target": abs(step / run["step_s"] - 1) <= TARGET}


def extrapolate(run: dict, constants: dict, hosts=HOSTS, gbits=GBITS) -> list:
    """Predicted ZeRO-1 step at `hosts` hosts x 1 rank for each link speed, from a measured 2-host x 1-rank
    run and its fitted constants. Assumptions: weak scaling - every rank keeps the measured per-rank
    batch, so forward/backward time per step stays as measured; the optimizer updates a 1/p shard, so its
    time scales by 2/p; alpha stays as fitted; beta scales with the link (the efficiency measured at the
    shaped 1 Gbit/s kept); ring reduce-scatter + allgather per bucket plus the stats allreduce."""
    buckets = [4 * elements for elements in run["bucket_elements"]]
    rs, ag, ar = constants["reduce_scatter"], constants["allgather"], constants["allreduce"]
    other = run["slowest_compute_s"] + run["step_s"] - run["compute_s"] - run["comm_s"] - run["optimizer_s"]
    rows = []
    for gbit in gbits:
        for p in hosts:
            comm = ring_time("allreduce", STATS_BYTES, p, ar["alpha_s"], ar["beta_s_per_byte"] / gbit)
            for nbytes in buckets:
                comm += ring_time("reduce_scatter", nbytes, p, rs["alpha_s"], rs["beta_s_per_byte"] / gbit)
                comm += ring_time("allgather", nbytes, p, ag["alpha_s"], ag["beta_s_per_byte"] / gbit)
            compute = other + run["optimizer_s"] * run["world_size"] / p
            step = compute + comm
            per_rank_batch = run["batch"] / run["world_size"]
            rows.append({"hosts": p, "gbit_s": gbit, "step_s": step, "comm_s": comm, "compute_s": compute,
                         "comm_fraction": comm / step, "samples_per_s": p * per_rank_batch / step,
                         "global_batch": int(p * per_rank_batch)})
    return rows


def analyse(measured: dict) -> dict:
    """Fits per configuration, predicted-vs-measured per training run, and the extrapolation table."""
    fits = {name: fit_collectives(m) for name, m in measured["collectives"].items()}
    comparisons = []
    for run in measured["training"]:
        config = f"{run['nodes']}x{run['ranks_per_node']}"
        impl = "hierarchical" if run["hierarchical"] else "flat"
        comparisons.append({"model": run["model"], "config": config, "impl": impl,
                            **compare_training(run, fits[config][impl])})
    predictions = {}
    for run in measured["training"]:
        if run["ranks_per_node"] == 1 and not run["hierarchical"]:
            predictions[run["model"]] = extrapolate(run, fits[f"{run['nodes']}x1"]["flat"])
    return {"fits": fits, "comparison": comparisons, "prediction": predictions}


def markdown(measured: dict, analysis: dict) -> str:
    """The tables for the README: fitted constants, predicted vs measured, and the extrapolation."""
    lines = ["| configuration | collective | impl | A (ms) | B (ms/MB) | alpha (us) | beta (ns/B) | "
             "link (Gbit/s) | worst fit error |", "|---|---|---|---|---|---|---|---|---|"]
    for config, by_impl in analysis["fits"].items():
        for impl, by_collective in by_impl.items():
            for collective, f in by_collective.items():
                lines.append(f"| {config} | {collective} | {impl} | {f['A'] * 1e3:.3f} | {f['B'] * 1e9:.2f} | "
                             f"{f['alpha_s'] * 1e6:.0f} | {f['beta_s_per_byte'] * 1e9:.2f} | "
                             f"{f['bandwidth_gbit_s']:.2f} | {f['max_rel_error'] * 100:.0f}% |")
    lines += ["", "| model | hosts x ranks | sync | measured step (ms) | predicted step (ms) | error | "
              "measured comm (ms) | predicted comm (ms) |", "|---|---|---|---|---|---|---|---|"]
    for c in analysis["comparison"]:
        lines.append(f"| {c['model']} | {c['config']} | {c['impl']} | {c['measured_step_s'] * 1e3:.0f} | "
                     f"{c['predicted_step_s'] * 1e3:.0f} | {c['step_error'] * 100:+.1f}% | "
                     f"{c['measured_comm_s'] * 1e3:.0f} | {c['predicted_comm_s'] * 1e3:.0f} |")
    lines += flat_vs_hierarchical(measured)
    for model, rows in analysis["prediction"].items():
        lines += ["", f"Predicted, {model}, hosts x 1 rank, per-rank batch as measured "
                      f"(step ms / communication share):", "",
                  "| hosts | " + " | ".join(f"{g} Gbit/s" for g in GBITS) + " |",
                  "|---|" + "---|" * len(GBITS)]
        for p in HOSTS:
            cells = [next(r for r in rows if r["hosts"] == p and r["gbit_s"] == g) for g in GBITS]
            lines.append(f"| {p} | " + " | ".join(f"{r['step_s'] * 1e3:.0f} ms ({r['comm_fraction'] * 100:.0f}%)"
                                                  for r in cells) + " |")
    return "\n".join(lines)


def flat_vs_hierarchical(measured: dict) -> list:
    """Markdown lines comparing flat and hierarchical synchronisation where both were measured."""
    runs = {(r["model"], r["nodes"], r["ranks_per_node"], r["hierarchical"]): r for r in measured["training"]}
    lines = ["", "| model | hosts x ranks | step flat (ms) | step hierarchical (ms) | change | comm flat (ms) | "
             "comm hierarchical (ms) | received per host per step flat / hierarchical (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, nodes, ranks, hierarchical), run in runs.items():
        flat = runs.get((model, nodes, ranks, False))
        if not hierarchical or flat is None:
            continue
        per_step = [max(r["received_per_host"]) / (r["steps_measured"] + WARMUP_STEPS) / 1e6 for r in (flat, run)]
        lines.append(f"| {model} | {nodes}x{ranks} | {flat['step_s'] * 1e3:.0f} | {run['step_s'] * 1e3:.0f} | "
                     f"{run['step_s'] / flat['step_s'] - 1:+.1%} | {flat['least_comm_s'] * 1e3:.0f} | "
                     f"{run['least_comm_s'] * 1e3:.0f} | {per_step[0]:.1f} / {per_step[1]:.1f} |")
    return lines


def main(argv=None) -> int:
    """Re-analyse the measurements saved in a scaling JSON, write the analysis back, print the tables."""
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "docs/scaling.json"
    with open(path) as handle:
        data = json.load(handle)
    data["analysis"] = analyse(data["measured"])
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
    print(markdown(data["measured"], data["analysis"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
