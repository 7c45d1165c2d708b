"""From the benchmark's jobs to its answer: per-system figures, the bytes check, ratios, the table.

How each figure is obtained (also in the JSON's "method"):
- step time: rank 0's time from the start of one measured step to the start of the next (steps run in
  lockstep: each waits for the others' gradients). Per round its median; the figure is the median of
  the rounds' medians; the spread is the quartiles (and min, max) of every measured step of every round.
- samples/s: global batch / median step time.
- ratios: speed of a system over a baseline's, paired round by round (the two ran back to back in the
  same round), the median over rounds; "overall" is the ratio of the two median step times.
- bytes per host per step: what each host's eth0 sent (received) during the measured steps, minus the
  idle rate the same counters showed over a pause just before (background traffic), over the steps;
  the median over rounds.
- loss: the global mean loss of the first batch under the parameters after warm-up + measured steps,
  against the exact disttrain run's (same configuration and link).
"""

from __future__ import annotations

import statistics

from systems import BASELINES, EXACT, SYSTEMS, min_bytes_sent_per_host

METHOD = __doc__.split("\n\n", 1)[1].strip()


def per_step_bytes(run: dict, direction: str) -> list:
    """Per host (in host order): bytes its eth0 moved in `direction` ("sent"/"received") per measured
    step, with the idle rate subtracted."""
    values = []
    for counters in run["link_bytes"].values():
        idle, window = counters["idle"], counters["window"]
        idle_rate = idle[direction] / idle["seconds"] if idle["seconds"] > 0 else 0.0
        values.append(max(0.0, window[direction] - idle_rate * window["seconds"]) / run["steps"])
    return values


def quantiles(values: list) -> dict:
    """Median, quartiles, min and max of `values`."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def summarise(runs: list, layers: tuple, batch: int) -> dict:
    """One (link rate, configuration, system)'s figures from its rounds' job records."""
    first = runs[0]
    system = SYSTEMS[first["system"]]
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    result = {"rate": first["rate"], "config": first["config"], "system": system.name, "label": system.label,
              "status": failed[0]["status"] if failed else "ok", "reason": failed[0].get("reason") if failed else None,
              "rounds": len(runs), "rounds_ok": len(ok)}
    if not ok:
        return result
    round_medians = [statistics.median(r["step_s"]) for r in ok]
    median_step = statistics.median(round_medians)
    sent = [statistics.median(values) for values in zip(*(per_step_bytes(r, "sent") for r in ok))]
    received = [statistics.median(values) for values in zip(*(per_step_bytes(r, "received") for r in ok))]
    floor = min_bytes_sent_per_host(system, layers, len(sent))
    job_floor_ok = all(min(h["sent"] for h in r["job_bytes"]) >= floor * (r["warmup"] + r["steps"]) for r in ok)
    result.update({
        "median_step_s": median_step, "round_median_step_s": round_medians,
        "step_s_spread": quantiles([s for r in ok for s in r["step_s"]]), "samples_per_s": batch / median_step,
        "steps_measured": ok[0]["steps"], "steps_total": ok[0]["warmup"] + ok[0]["steps"],
        "bytes_sent_per_host_per_step": sent, "bytes_received_per_host_per_step": received,
        "min_bytes_sent_per_host_per_step": floor,
        "bytes_crossed": min(sent) >= floor and job_floor_ok,
        "final_loss": ok[0]["final_loss"], "final_loss_rounds": [r["final_loss"] for r in ok],
        "losses": ok[0]["losses"], "params_identical": all(r["params_identical"] for r in ok),
        "phase_medians_s": {name: statistics.median(max(r["phase_medians_s"][name]) for r in ok)
                            for name in ok[0]["phase_medians_s"]},
        "setup": ok[0]["setup"], "load_avg_1min": statistics.fmean(r["load"]["loadavg_1min"] for r in runs),
        "runnable_others": statistics.fmean(r["load"]["runnable_others"] for r in runs)})
    return result


def paired_ratio(system_runs: list, baseline_runs: list) -> float | None:
    """Median over rounds where both ran of (baseline's median step / system's): > 1 = faster."""
    ratios = [statistics.median(b["step_s"]) / statistics.median(s["step_s"])
              for s, b in zip(system_runs, baseline_runs) if s["status"] == "ok" and b["status"] == "ok"]
    return statistics.median(ratios) if ratios else None


def analyse(runs: list, layers: tuple, batch: int) -> list:
    """Every (rate, config, system)'s summary, with its ratios to the baselines and its loss against
    the exact run's, in the order the systems ran."""
    groups = {}
    for run in runs:
        groups.setdefault((run["rate"], run["config"], run["system"]), []).append(run)
    results = []
    for (rate, config, name), group in groups.items():
        result = summarise(sorted(group, key=lambda r: r["round"]), layers, batch)
        exact = groups.get((rate, config, EXACT))
        exact_ok = [r for r in exact or [] if r["status"] == "ok"]
        if "final_loss" in result and exact_ok:
            result["loss_vs_exact"] = result["final_loss"] - exact_ok[0]["final_loss"]
        result["speed_vs"] = {}
        for baseline in BASELINES:
            if baseline != name and (rate, config, baseline) in groups and result["status"] != "unavailable":
                by_round = sorted(groups[(rate, config, baseline)], key=lambda r: r["round"])
                result["speed_vs"][baseline] = paired_ratio(sorted(group, key=lambda r: r["round"]), by_round)
        results.append(result)
    return results


def byte_failures(results: list) -> list:
    """One line per system run whose hosts sent fewer bytes than its floor: traffic that did not cross
    the veths (e.g. MPI used shared memory between the fake hosts)."""
    return [f"{r['system']} at {r['config']}, {r['rate']}: hosts sent "
            f"{', '.join(f'{b / 1e6:.3f}' for b in r['bytes_sent_per_host_per_step'])} MB per step, below the "
            f"floor of {r['min_bytes_sent_per_host_per_step'] / 1e6:.3f} MB: the gradients did not cross the "
            f"fake hosts' links (shared memory between them?)"
            for r in results if "bytes_crossed" in r and not r["bytes_crossed"]]


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}x"


def _row(r: dict) -> str:
    head = f"| {r['config']} | {r['label']} |"
    if r["status"] == "unavailable":
        return head + " not available in this build | | | | | |"
    if "median_step_s" not in r:
        return head + f" {r['status']}: {short(r['reason'])} | | | | | |"
    spread = r["step_s_spread"]
    loss = f"{r['final_loss']:.4f}"
    if "loss_vs_exact" in r and r["system"] != EXACT:
        loss += f" ({r['loss_vs_exact']:+.1e})"
    status = "" if r["status"] == "ok" else f" ({r['status']} in {r['rounds'] - r['rounds_ok']} round(s))"
    return (f"{head} {r['median_step_s'] * 1e3:.0f} ({spread['q1'] * 1e3:.0f}-{spread['q3'] * 1e3:.0f}){status} | "
            f"{r['samples_per_s']:,.0f} | {_ratio(r['speed_vs'].get(BASELINES[0]))} | "
            f"{_ratio(r['speed_vs'].get(BASELINES[1]))} | "
            f"{max(r['bytes_sent_per_host_per_step']) / 1e6:.2f} | {loss} |")


def short(reason: str | None, limit: int = 160) -> str:
    """The first line of a reason, cut to `limit` characters, safe inside a markdown table."""
    line = (reason or "").strip().splitlines()[0] if (reason or "").strip() else "no message"
    line = line.replace("|", "/")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def markdown(data: dict) -> str:
    """The README tables: link rates reached, then per link rate every configuration and system."""
    lines = [f"Note: {note}." for note in data.get("notes", [])] + ([""] if data.get("notes") else [])
    lines += ["| tc tbf rate (burst) | one TCP stream reached (payload) | on the wire |", "|---|---|---|"]
    for link in data["link_rates"]:
        lines.append(f"| {link['rate']} ({link['burst']}) | {link['payload_gbit_s']:.2f} Gbit/s | "
                     f"{link['wire_gbit_s']:.2f} Gbit/s |")
    settings = data["settings"]
    for rate in settings["rates"]:
        rows = [r for r in data["results"] if r["rate"] == rate]
        if not rows:
            continue
        steps = rows[0].get("steps_total", settings["warmup"] + settings["steps"])
        lines += ["", f"Link shaped to {rate}; MLP {'-'.join(map(str, settings['layers']))}, global batch "
                      f"{settings['batch']}, Adam, {settings['rounds']} interleaved round(s) of {settings['warmup']} "
                      f"warm-up + {settings['steps']} measured steps:", "",
                  f"| hosts x ranks | system | step ms (quartiles) | samples/s | vs torch DDP | vs DDP+fp16 | "
                  f"MB sent per host per step | loss after {steps} steps (vs exact) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_row(r) for r in rows]
    if data.get("model"):
        lines += ["", "| link | hosts x ranks | system | measured step ms | predicted ms | error | "
                      "reduce-scatter hidden behind backward |", "|---|---|---|---|---|---|---|"]
        for m in data["model"]:
            lines.append(f"| {m['rate']} | {m['config']} | {m['system']} | {m['measured_step_s'] * 1e3:.0f} | "
                         f"{m['predicted_step_s'] * 1e3:.0f} | {m['error']:+.0%} | "
                         f"{m['hidden_reduce_scatter_s'] * 1e3:.0f} of {m['reduce_scatter_s'] * 1e3:.0f} ms |")
    return "\n".join(lines)
