"""From what the workers wrote to the benchmark's answer: per-system figures, ratios, table, JSON.

How each figure is obtained (also written into the JSON under "method"):
- step time: per step, the longest of the ranks' own step durations (start of forward to end of the
  last phase); samples/s of a step = global batch / step time. Median and min-max over all measured
  steps of all rounds; "per_round" holds each round's median, and ratios are also given round by round
  (paired: the same round of both systems). "p90", the upper decile of per-step samples/s, is the speed
  of the least disturbed steps: on a shared machine it is the steadier figure to compare.
- forward / backward / optimizer: the time between the phase boundaries each system records with
  perf_counter from the outside, minus the time spent inside collective calls within that phase (for
  disttrain `opt.step()` includes the parameter allgather; that goes to comm/wait, not optimizer).
- comm and wait: every collective call is timed on every rank (enter, leave) on CLOCK_MONOTONIC, which
  all processes of one machine share. For the k-th call of a step, the collective cannot finish before
  the last rank has entered it, so rank r's wait = (latest entry over ranks) - (r's entry), capped at
  the call's duration, and comm = the rest of the call (leave - latest entry): the transfer itself.
  No barrier is added to the step. (Ranks on different hosts: wait is not separated, comm = whole call.)
- other: step time minus all the above: batch wrapping, the CPU part of gradient synchronisation
  (e.g. scaling the flat gradient), reset_grad / zero_grad, Python glue.
- PyTorch DDP runs its allreduce inside backward (autograd hooks, overlapped), so its comm and wait
  are not separable from outside: they are reported as None and counted in backward; ZeRO's
  parameter broadcast is counted in its optimizer step.
- breakdown figures are the median over steps of the mean over ranks; "per_rank" has each rank's medians.
- peak RSS: getrusage(RUSAGE_SELF).ru_maxrss of each rank at the end of the run (max over rounds); it
  includes the interpreter and the framework's import (torch alone is ~300 MB): "rss_after_setup"
  (VmRSS once the model and optimizer exist) and "rss_start" help separate the two.
- optimizer-state bytes: disttrain's `opt.state_bytes()`, the numpy reference's m and v arrays, the
  bytes of the tensors in torch's (local) optimizer state.
- per-op breakdown (cnn workload): extra steps after the measured ones, instrumented: disttrain's
  conv2d / max_pool2d calls and their backward timed one by one, torch's from its autograd profiler's
  top-level events; "rest" is the instrumented step minus those (loss, linear layer, ReLU, flatten,
  gradient synchronisation, optimizer, and the instrumentation itself). Median over those steps of
  the mean over ranks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import statistics
import time

from . import SYSTEMS
from .workload import OP_CATEGORIES

CATEGORIES = ("forward", "backward", "comm", "wait", "optimizer", "other")
# the throughput targets disttrain is held to: (system, ranks, baseline, ranks) -> minimum ratio
TARGETS = {
    "default": {("disttrain-zero1", 2, "numpy", 2): 0.90, ("disttrain-zero1", 1, "numpy", 1): 0.90,
                ("disttrain-plain", 1, "numpy", 1): 0.90, ("disttrain-zero1", 2, "torch-ddp", 2): 1.15,
                ("disttrain-zero1", 2, "torch-ddp-zero", 2): 1.30},
    "small": {("disttrain-plain", 1, "torch", 1): 0.80, ("disttrain-zero1", 1, "torch", 1): 0.80,
              ("disttrain-zero1", 2, "torch-ddp", 2): 1.00},
    "cnn": {("disttrain-plain", 1, "torch", 1): 0.80, ("disttrain-zero1", 1, "torch", 1): 0.80,
            ("disttrain-zero1", 2, "torch-ddp", 2): 1.50},
}
# which raw collectives a system's communication amounts to, for the comm / raw ratio
RAW_REFERENCE = {"numpy": ("reduce_scatter_block", "allgather_in_place"),
                 "disttrain-zero1": ("reduce_scatter_block", "allgather_in_place"),
                 "disttrain-allreduce": ("allreduce_in_place", "allgather_in_place"),
                 "disttrain-noshard": ("allreduce_in_place",)}


# ------------------------------------------------------------------------------------------ analysis
def analyse_steps(ranks_data: list, comm_measured: bool) -> list:
    """Per measured step: {"step_s", "breakdown": {category: mean over ranks}, "per_rank": [...],
    "phase_cpu": {phase: mean over ranks}}, from one run's rank records."""
    phases = ranks_data[0]["recorder"]["phases"]
    same_host = len({data["hostname"] for data in ranks_data}) == 1
    n_steps = min(len(data["recorder"]["steps"]) for data in ranks_data)
    steps = []
    for s in range(n_steps):
        records = [data["recorder"]["steps"][s] for data in ranks_data]
        calls = [record["coll"] for record in records]
        aligned = same_host and all(len(c) == len(calls[0]) and [x[0] for x in c] == [x[0] for x in calls[0]]
                                    for c in calls)
        per_rank = []
        for r, record in enumerate(records):
            t = record["t"]
            total = t[-1] - t[0]
            in_phase = [0.0] * len(phases)
            wait = comm = 0.0
            for k, (_, enter, leave) in enumerate(calls[r]):
                duration = leave - enter
                waited = min(max(0.0, max(c[k][1] for c in calls) - enter), duration) if aligned else 0.0
                wait += waited
                comm += duration - waited
                for j in range(len(phases)):
                    if t[j] <= enter < t[j + 1] or j == len(phases) - 1:
                        in_phase[j] += duration
                        break
            phase_cpu = {name: (t[j + 1] - t[j]) - in_phase[j] for j, name in enumerate(phases)}
            breakdown = {name: phase_cpu.get(name, 0.0) for name in ("forward", "backward", "optimizer")}
            if comm_measured:
                breakdown["comm"] = comm
                breakdown["wait"] = wait if aligned or len(records) == 1 else None
            else:
                breakdown["comm"] = breakdown["wait"] = None
            breakdown["other"] = total - sum(v for v in breakdown.values() if v is not None)
            per_rank.append({"total": total, "breakdown": breakdown, "phase_cpu": phase_cpu})
        steps.append({
            "step_s": max(p["total"] for p in per_rank),
            "breakdown": {c: _mean([p["breakdown"][c] for p in per_rank]) for c in CATEGORIES},
            "phase_cpu": {name: _mean([p["phase_cpu"][name] for p in per_rank]) for name in phases},
            "per_rank": [p["breakdown"] for p in per_rank],
        })
    return steps


def quick_samples_per_s(ranks_data: list) -> float:
    """Median samples/s of one run (for progress lines)."""
    batch = ranks_data[0]["workload"]["global_batch"]
    system = SYSTEMS[ranks_data[0]["system"]]
    steps = analyse_steps(ranks_data, system.comm_measured)
    return batch / statistics.median(s["step_s"] for s in steps) if steps else float("nan")


def summarise_system(name: str, ranks: int, indexed_rounds: list) -> dict:
    """Everything the report says about one (system, ranks) from [(round index, rank records), ...]."""
    system = SYSTEMS[name]
    rounds = [ranks_data for _, ranks_data in indexed_rounds]
    batch = rounds[0][0]["workload"]["global_batch"]
    pooled, per_round = [], {}
    for round_index, ranks_data in indexed_rounds:
        steps = analyse_steps(ranks_data, system.comm_measured)
        pooled.extend(steps)
        per_round[round_index] = batch / statistics.median(s["step_s"] for s in steps)
    speeds = [batch / s["step_s"] for s in pooled]
    step_times = [s["step_s"] for s in pooled]
    breakdown = {c: _median_or_none([s["breakdown"][c] for s in pooled]) for c in CATEGORIES}
    phases = rounds[0][0]["recorder"]["phases"]
    per_rank = []
    for r in range(ranks):
        records = [ranks_data[r] for ranks_data in rounds]
        per_rank.append({
            "rank": r,
            "breakdown_s": {c: _median_or_none([s["per_rank"][r][c] for s in pooled]) for c in CATEGORIES},
            "peak_rss_bytes": max(d["peak_rss_bytes"] for d in records),
            "rss_after_setup_bytes": max(d["rss_after_setup_bytes"] for d in records),
            "rss_start_bytes": max(d["rss_start_bytes"] for d in records),
            "optimizer_state_bytes": records[0]["optimizer_state_bytes"],
            "blas_threads": records[0]["threads"],
        })
    first = rounds[0]
    losses = [statistics.fmean(d["losses"][i] for d in first) for i in range(len(first[0]["losses"]))]
    raw = _raw_collectives(rounds)
    result = {
        "system": name, "ranks": ranks, "label": f"{name}@{ranks}", "name": f"{name}@{ranks}", "status": "ok",
        "description": system.description,
        "samples_per_s": {"median": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
                          "p90": _upper_decile(speeds),
                          "mean_over_wall": batch * len(step_times) / sum(step_times)},
        "samples_per_s_per_round": [per_round[i] for i in sorted(per_round)],
        "rounds_measured": sorted(per_round),
        "samples_per_s_steps": speeds,
        "step_s": {"median": statistics.median(step_times), "min": min(step_times), "max": max(step_times)},
        "breakdown_s": breakdown,
        "phase_cpu_s": {p: statistics.median(s["phase_cpu"][p] for s in pooled) for p in phases},
        "comm_measured": system.comm_measured,
        "per_rank": per_rank,
        "peak_rss_bytes_per_rank": [p["peak_rss_bytes"] for p in per_rank],
        "optimizer_state_bytes_per_rank": [p["optimizer_state_bytes"] for p in per_rank],
        "blas_threads_per_rank": first[0]["threads"],
        "blas": describe_blas(first[0]),
        "blas_pools": first[0]["blas"],
        "steps_measured": len(pooled), "rounds": len(rounds),
        "loss_first": losses[0], "loss_last": losses[-1], "losses_round1": losses,
        "raw_collectives": raw,
        "details": first[0]["describe"],
        "profiled": any(d.get("profiled") for ranks_data in rounds for d in ranks_data),
        "op_breakdown_s": op_breakdown(rounds),
    }
    reference = RAW_REFERENCE.get(name)
    if raw and reference and all(key in raw for key in reference) and breakdown["comm"] is not None:
        raw_s = sum(raw[key] for key in reference)
        cold_s = sum(raw.get(key + "_cold", raw[key]) for key in reference)
        result["comm_vs_raw"] = {"raw_calls": list(reference), "raw_s": raw_s, "raw_cold_s": cold_s,
                                 "comm_s": breakdown["comm"],
                                 "comm_plus_wait_s": breakdown["comm"] + (breakdown["wait"] or 0.0),
                                 "ratio": breakdown["comm"] / raw_s if raw_s > 0 else None,
                                 "ratio_cold": breakdown["comm"] / cold_s if cold_s > 0 else None}
    return result


def op_breakdown(rounds: list) -> dict | None:
    """{category: median seconds per step} over the instrumented steps of every round (each step the
    mean over ranks), with "rest" = step - the op categories; None without such steps."""
    per_step = []
    for ranks_data in rounds:
        records = [d.get("op_breakdown") or [] for d in ranks_data]
        for k in range(min(len(r) for r in records)):
            step = {c: _mean([r[k][c] for r in records]) for c in (*OP_CATEGORIES, "step")}
            step["rest"] = step["step"] - sum(step[c] for c in OP_CATEGORIES)
            per_step.append(step)
    if not per_step:
        return None
    return {c: statistics.median(s[c] for s in per_step) for c in (*OP_CATEGORIES, "rest", "step")}


def describe_blas(rank_data: dict) -> str:
    """e.g. 'openblas 0.3.31 (pthreads) x1' or, for torch, its MKL and OpenMP pool."""
    parts = []
    torch_lines = rank_data.get("describe", {}).get("torch_parallel") or []
    for line in torch_lines:
        if "Math Kernel Library" in line:
            version = line.split("Version")[-1].split("-")[0].strip() if "Version" in line else ""
            parts.append(f"torch MKL {version}".strip())
    for pool in rank_data["blas"]:
        if torch_lines and pool["user_api"] == "blas":
            continue  # numpy's BLAS is loaded in torch's processes too, but torch's matmuls do not use it
        name = pool["internal_api"] + (f" {'.'.join(str(pool['version']).split('.')[:3])}" if pool["version"] else "")
        layer = f" ({pool['threading_layer']})" if pool.get("threading_layer") else ""
        parts.append(f"{name}{layer} x{pool['num_threads']}")
    return ", ".join(parts) or "unknown"


def summarise(config: dict, runs: list, results: dict, skipped: list, failures: dict,
              warnings: dict | None = None) -> dict:
    """The whole report as a JSON-ready dict. `results[(name, ranks)]` is [(round index, rank records)];
    `failures` and `warnings` map (name, ranks) to ["round i: what happened", ...]."""
    systems = []
    warnings = warnings or {}
    for name, ranks in runs:
        label = f"{name}@{ranks}"
        if not results.get((name, ranks)):
            systems.append({"system": name, "ranks": ranks, "label": label, "name": label, "status": "failed",
                            "reason": "\n".join(failures.get((name, ranks), ["no result"]))})
            continue
        entry = summarise_system(name, ranks, results[(name, ranks)])
        entry["failed_rounds"] = failures.get((name, ranks), [])
        entry["warnings"] = warnings.get((name, ranks), [])
        systems.append(entry)
    for name, ranks, reason in skipped:
        systems.append({"system": name, "ranks": ranks, "label": f"{name}@{ranks}", "name": f"{name}@{ranks}",
                        "status": "skipped", "reason": reason})
    ok = {(s["system"], s["ranks"]): s for s in systems if s["status"] == "ok"}
    first_losses = [s["loss_first"] for s in ok.values()]
    return {
        "schema": "disttrain-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "results": systems,
        "ratios": ratios(ok, config),
        "loss_check": {"first_step_losses": {s["label"]: s["loss_first"] for s in ok.values()},
                       "spread": (max(first_losses) - min(first_losses)) if first_losses else None},
        "method": __doc__.split("How each figure is obtained (also written into the JSON under \"method\"):")[-1].strip(),
    }


def ratios(ok: dict, config: dict) -> list:
    """disttrain / hand-written and disttrain / PyTorch at equal rank counts: pooled medians and per round."""
    targets = TARGETS.get(config.get("preset") or "", {})
    rows = []
    for (name, ranks), mine in ok.items():
        if SYSTEMS[name].module != "library":
            continue
        for (other, other_ranks), theirs in ok.items():
            if other_ranks != ranks or SYSTEMS[other].module == "library":
                continue
            a_rounds = dict(zip(mine["rounds_measured"], mine["samples_per_s_per_round"]))
            b_rounds = dict(zip(theirs["rounds_measured"], theirs["samples_per_s_per_round"]))
            paired = [a_rounds[i] / b_rounds[i] for i in sorted(set(a_rounds) & set(b_rounds))]
            opt_a, opt_b = mine["breakdown_s"]["optimizer"], theirs["breakdown_s"]["optimizer"]
            target = targets.get((name, ranks, other, other_ranks))
            pooled = mine["samples_per_s"]["median"] / theirs["samples_per_s"]["median"]
            rows.append({"name": f"{name}@{ranks} / {other}@{other_ranks}", "numerator": mine["label"],
                         "denominator": theirs["label"], "throughput_ratio": pooled,
                         "throughput_ratio_p90": mine["samples_per_s"]["p90"] / theirs["samples_per_s"]["p90"],
                         "throughput_ratio_per_round": paired,
                         "throughput_ratio_round_median": statistics.median(paired) if paired else None,
                         "optimizer_time_ratio": opt_a / opt_b if opt_b else None,
                         "target": target, "meets_target": None if target is None else pooled >= target})
    return rows


# ------------------------------------------------------------------------------------------ output
def format_table(summary: dict) -> str:
    config = summary["config"]
    w = config["workload"]
    model = w.get("description") or f"MLP {'-'.join(map(str, w['layers']))}"
    lines = [f"disttrain bench: {model} ({w['param_count']:,} parameters), "
             f"global batch {w['global_batch']}, Adam lr {w['lr']}, float32, seed {w['seed']}; "
             f"{config['rounds']} round(s) x {config['steps']} steps after {config['warmup']} warm-up; "
             f"{config['cores']} cores"]
    if config.get("worker_env"):
        lines.append("worker environment: " + " ".join(f"{k}={v}" for k, v in config["worker_env"].items()))
    if config.get("source"):
        lines.append(f"disttrain source: {config['source']}")
    if config.get("load_average"):
        before, after = config["load_average"]
        lines.append(f"1-min load average before / after: {before:.2f} / {after:.2f} (other processes share these cores)")
    if config.get("torch_note"):
        lines.append(config["torch_note"])
    head = (f"{'system':<22}{'N x thr':>8}  {'samples/s':>10} {'[min - max]':>19}  {'step ms':>7} "
            f"{'fwd':>7}{'bwd':>7}{'comm':>7}{'wait':>7}{'opt':>7}{'other':>7}  {'peak RSS MiB/rank':>18}  "
            f"{'opt state MiB/rank':>18}")
    lines += ["", head, "-" * len(head)]
    for s in summary["results"]:
        if s["status"] != "ok":
            continue
        sps, b = s["samples_per_s"], s["breakdown_s"]
        cells = "".join(_ms(b[c], "(bwd)" if c in ("comm", "wait") and not s["comm_measured"] else "-")
                        for c in CATEGORIES)
        rss = "/".join(f"{v / 2**20:.0f}" for v in s["peak_rss_bytes_per_rank"])
        state = "/".join(f"{v / 2**20:.1f}" for v in s["optimizer_state_bytes_per_rank"])
        lines.append(f"{s['label']:<22}{s['ranks']:>4} x {s['blas_threads_per_rank']:<2} {sps['median']:>10,.0f} "
                     f"[{sps['min']:>8,.0f} - {sps['max']:>8,.0f}]  {s['step_s']['median'] * 1e3:>7.1f} "
                     f"{cells}  {rss:>18}  {state:>18}")
    lines.append("(breakdown in ms: median over steps of the mean over ranks; comm/wait '(bwd)': inside DDP's backward)")
    for s in summary["results"]:
        if s["status"] != "ok":
            lines.append(f"{s['label']:<22}{s['status'].upper()}: {_brief(s['reason'])}")
        for kind in ("failed_rounds", "warnings"):
            for text in s.get(kind, []):
                lines.append(f"{s['label']:<22}{'failed' if kind == 'failed_rounds' else 'warning'} in {_brief(text)}")

    blas = {}
    for s in summary["results"]:
        if s["status"] == "ok":
            blas.setdefault(s["blas"], []).append(s["label"])
    lines += ["", "BLAS / threads per rank:"]
    lines += [f"  {text}: {', '.join(labels)}" for text, labels in blas.items()]
    backends = {s["details"].get("optimizer_backend") for s in summary["results"]
                if s["status"] == "ok" and SYSTEMS[s["system"]].module == "library"} - {None}
    if backends:
        lines.append(f"disttrain optimizer updates: {', '.join(sorted(backends))} "
                     f"(the hand-written reference's Adam is chunked numpy)")

    check = summary["loss_check"]
    if check["spread"] is not None:
        values = list(check["first_step_losses"].values())
        lines.append(f"first-step loss (same model, data, init everywhere): {min(values):.6f} .. {max(values):.6f} "
                     f"(spread {check['spread']:.2e})")

    if summary["ratios"]:
        lines += ["", f"{'ratio (throughput, equal N)':<46}{'median':>8}{'per round':>22}{'p90':>7}{'target':>11}"
                      f"{'opt-time ratio':>16}"]
        for row in summary["ratios"]:
            per_round = ",".join(f"{v:.2f}" for v in row["throughput_ratio_per_round"])
            target = "" if row["target"] is None else (f">={row['target']:.2f}" + (" ok" if row["meets_target"] else " NO"))
            opt = "" if row["optimizer_time_ratio"] is None else f"{row['optimizer_time_ratio']:.2f}"
            lines.append(f"{row['name']:<46}{row['throughput_ratio']:>8.3f}  {per_round:>20}"
                         f"{row['throughput_ratio_p90']:>7.3f}{target:>11}{opt:>16}")
        lines.append("(median: of all measured steps; per round: each round's medians, paired; p90: the upper decile "
                     "of per-step samples/s, the least disturbed steps)")

    lines += format_op_breakdown(summary)

    comm_rows = [s for s in summary["results"] if s["status"] == "ok" and s.get("comm_vs_raw")]
    if comm_rows:
        lines += ["", "communication vs raw MPI collectives of the same bytes (ms):"]
        for s in comm_rows:
            c = s["comm_vs_raw"]
            lines.append(f"  {s['label']:<24} comm {c['comm_s'] * 1e3:6.2f}  comm+wait {c['comm_plus_wait_s'] * 1e3:6.2f}"
                         f"  raw {' + '.join(c['raw_calls'])} warm {c['raw_s'] * 1e3:6.2f} / cold "
                         f"{c['raw_cold_s'] * 1e3:6.2f}  ratio {c['ratio']:.2f} / {c['ratio_cold']:.2f}")
        lines.append("  (raw: the same in-place MPI calls alone, cache warm / evicted; target comm <= 1.15 x raw)")
    gloo = [s for s in summary["results"] if s["status"] == "ok" and (s.get("raw_collectives") or {}).get("gloo_allreduce")]
    for s in gloo:
        lines.append(f"  {s['label']:<24} raw gloo allreduce of the gradient: {s['raw_collectives']['gloo_allreduce'] * 1e3:.2f}")
    if any(s.get("profiled") for s in summary["results"] if s["status"] == "ok"):
        lines.append("note: disttrain runs were profiled with cProfile: their times are inflated")
    return "\n".join(lines)


def format_op_breakdown(summary: dict) -> list:
    """Table lines of the per-op step breakdown (cnn workload), or none."""
    rows = [s for s in summary["results"] if s["status"] == "ok" and s.get("op_breakdown_s")]
    if not rows:
        return []
    names = ("conv forward", "conv backward", "pool", "rest", "step")
    lines = ["", "per-op step breakdown, ms (instrumented steps after the measured ones; pool = forward + backward):",
             f"  {'system':<22}" + "".join(f"{name:>15}" for name in names)]
    for s in rows:
        b = dict(s["op_breakdown_s"])
        b["pool"] = b["pool forward"] + b["pool backward"]
        lines.append(f"  {s['label']:<22}" + "".join(f"{b[name] * 1e3:>15.2f}" for name in names))
    return lines


def format_profiles(directory: str, top: int = 15) -> str:
    """The top entries (by own time) of rank 0's cProfile of each profiled run."""
    import io
    import pstats
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.rank0.prof"))):
        text = io.StringIO()
        pstats.Stats(path, stream=text).sort_stats("tottime").print_stats(top)
        body = text.getvalue()
        start = body.find("   ncalls")
        out.append(f"\n== cProfile {os.path.basename(path)} (rank 0, measured steps, by own time)\n" + body[start:].rstrip())
    return "\n".join(out)


def write_json(summary: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as out:
        json.dump(summary, out, indent=1, default=_json_default)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------ helpers
def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _brief(text: str) -> str:
    """The first and last non-empty lines of an error text (its summary and its final message)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return " / ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else (lines[0] if lines else "")


def _upper_decile(values) -> float:
    """The 90th percentile (the value 10% of the samples exceed); the maximum for fewer than 2 samples."""
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else max(values)


def _ms(value, missing: str) -> str:
    return f"{missing:>7}" if value is None else f"{value * 1e3:>7.2f}"


def _raw_collectives(rounds: list):
    """Raw collective seconds: mean over ranks, median over rounds (None if the system has none)."""
    samples = [d["raw_collectives"] for ranks_data in rounds for d in ranks_data if d.get("raw_collectives")]
    if not samples:
        return None
    keys = [k for k, v in samples[0].items() if isinstance(v, float)]
    result = {k: v for k, v in samples[0].items() if not isinstance(v, float)}
    for key in keys:
        per_round = [statistics.fmean(d["raw_collectives"][key] for d in ranks_data) for ranks_data in rounds]
        result[key] = statistics.median(per_round)
    return result


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
