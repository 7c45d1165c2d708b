"""The alpha-beta model's step prediction (scripts/scaling/fit_model.py) against the measured disttrain
runs: the compute parts come from the run without overlap (its backward is pure compute), the
collectives from fits measured on the same links in the same invocation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scaling"))

import fit_model  # noqa: E402

# system -> the system without overlap whose compute parts predict it (same buckets)
COMPUTE_FROM = {"disttrain": "disttrain-no-overlap", "disttrain-no-overlap": "disttrain-no-overlap"}


def compute_parts(result: dict) -> dict:
    """forward, backward, update and the rest (reset) of a run without overlap: each the median over
    rounds of the slowest rank's median (a step waits for the slowest rank)."""
    phases = result["phase_medians_s"]
    return {"forward_s": phases["forward"], "backward_s": phases["backward"], "update_s": phases.get("update", 0.0),
            "other_s": phases.get("reset", 0.0)}


def model_rows(results: list, collectives: dict) -> list:
    """Predicted vs measured step for every disttrain exact system with a compute source and fits."""
    by_key = {(r["rate"], r["config"], r["system"]): r for r in results}
    rows = []
    for result in results:
        source = by_key.get((result["rate"], result["config"], COMPUTE_FROM.get(result["system"])))
        measurement = collectives.get(result["rate"], {}).get(result["config"])
        if not source or "median_step_s" not in source or "median_step_s" not in result or not measurement:
            continue
        setup = result["setup"]
        impl = "hierarchical" if setup.get("hierarchical") is True else "flat"
        fits = fit_model.fit_collectives(measurement).get(impl)
        if fits is None:
            continue
        buckets = [4 * n for n in setup["bucket_elements"]]
        ready = fit_model.bucket_ready_fractions(setup["param_elements"], setup["bucket_elements"])
        predicted = fit_model.predict_step(compute_parts(source), fits, buckets, ready, bool(setup.get("overlap")))
        rows.append({"rate": result["rate"], "config": result["config"], "system": result["system"],
                     "overlap": bool(setup.get("overlap")), "impl": impl, "buckets": len(buckets),
                     "measured_step_s": result["median_step_s"], "predicted_step_s": predicted["step_s"],
                     "error": predicted["step_s"] / result["median_step_s"] - 1,
                     "reduce_scatter_s": predicted["reduce_scatter_s"],
                     "hidden_reduce_scatter_s": predicted["hidden_reduce_scatter_s"],
                     "allgather_s": predicted["allgather_s"], "compute_parts_from": source["system"],
                     **{f"compute_{k}": v for k, v in compute_parts(source).items()}})
    return rows
