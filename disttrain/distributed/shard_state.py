"""A ShardedOptimizer's state as plain data keyed by parameter name and element range, never by
"rank r's state": what one world size saves, any other loads.

A state dict holds "segments": [{"param": name, "start": s, "stop": e, "arrays": {key: float32 array of
e - s elements}, "scalars": {key: number}}], one per piece of a parameter that has state (a parameter
never updated has none), "stateful" (the names of those parameters), and "class", "hyperparameters",
"sharded" and "world_size". Loading assembles each of this rank's pieces from the saved segments of
the same parameter that overlap it; the arrays may be any mapping that loads on access.
"""

from __future__ import annotations

import numpy as np


def state_dict(optimizer, copy: bool = True) -> dict:
    """This rank's state of `optimizer` (a ShardedOptimizer); arrays are copies unless copy=False
    (then views of the live state: write them out before the next step)."""
    segments = []
    for (_, name, start, stop, _, _), state in zip(optimizer.segments, optimizer.optimizer.state):
        arrays = {key: np.array(value, copy=True) if copy else value
                  for key, value in state.items() if isinstance(value, np.ndarray)}
        scalars = {key: value for key, value in state.items() if not isinstance(value, np.ndarray)}
        if arrays or scalars:
            segments.append({"param": name, "start": start, "stop": stop, "arrays": arrays, "scalars": scalars})
    return {"class": type(optimizer.optimizer).__name__, "hyperparameters": optimizer.optimizer.hyperparameters(),
            "sharded": optimizer.shard, "world_size": optimizer.comm.size, "segments": segments,
            "stateful": sorted({segment["param"] for segment in segments})}


def load_state_dict(optimizer, saved: dict) -> None:
    """Give `optimizer` (a ShardedOptimizer) the state in `saved` for each of its pieces (see assemble).
    Hyperparameters are restored only if `saved` has them. Raises ValueError for another optimizer
    class or state that covers a piece only in part."""
    wrapped = optimizer.optimizer
    if saved.get("class") not in (None, type(wrapped).__name__):
        raise ValueError(f"optimizer state is for {saved['class']}, this optimizer is {type(wrapped).__name__}")
    states = assemble(saved, [(name, start, stop) for _, name, start, stop, _, _ in optimizer.segments])
    states += [{}] * (len(wrapped.params) - len(states))  # the zero-length piece of a rank that owns only padding
    wrapped.load_state_dict({"state": states, "hyperparameters": saved.get("hyperparameters", {})})


def assemble(saved: dict, pieces) -> list:
    """The state of each (param name, start, stop) piece, from `saved`'s segments of that parameter
    that overlap it: {**scalars, key: float32 array of stop - start elements}, or {} for a parameter
    with no saved state. `saved["stateful"]`, if present, names the parameters that must have state.
    Raises ValueError naming the parameter and elements when saved state covers a piece only in part."""
    by_param = {}
    for segment in saved["segments"]:
        by_param.setdefault(segment["param"], []).append(segment)
    required = set(saved.get("stateful", ()))
    states = []
    for name, start, stop in pieces:
        overlapping = [seg for seg in by_param.get(name, ()) if seg["start"] < stop and start < seg["stop"]]
        if not overlapping and name not in required:
            states.append({})
            continue
        keys = sorted({key for seg in overlapping for key in seg["arrays"]})
        arrays = {key: np.zeros(stop - start, np.float32) for key in keys}
        covered = 0
        for seg in overlapping:
            a, b = max(start, seg["start"]), min(stop, seg["stop"])
            for key in keys:
                arrays[key][a - start:b - start] = np.asarray(seg["arrays"][key])[a - seg["start"]:b - seg["start"]]
            covered += b - a
        if covered != stop - start:
            raise ValueError(f"optimizer state of parameter '{name}' covers {covered} of its elements "
                             f"[{start}, {stop}) (a shard is missing)")
        states.append({**overlapping[0]["scalars"], **arrays})
    return states


def consolidate(optimizer) -> dict | None:
    """COLLECTIVE. The full state on rank 0: {"state": {key: {param name: array of the parameter's
    shape}}, "scalars": the first parameter's scalars (layout order), "parameter_scalars": {name:
    scalars}, "hyperparameters"}; None on other ranks. Parameters without state hold zeros."""
    comm, layout = optimizer.comm, optimizer.ddp.layout
    mine = state_dict(optimizer, copy=False)
    described = comm.allgather_object(([key for seg in mine["segments"] for key in seg["arrays"]],
                                       {seg["param"]: seg["scalars"] for seg in mine["segments"]}))
    keys = sorted({key for rank_keys, _ in described for key in rank_keys})
    scalars = {name: value for _, rank_scalars in described for name, value in rank_scalars.items()}
    full = {}
    for key in keys:
        buffer = np.zeros(layout.padded_total, np.float32)
        for (*_, flat_lo, flat_hi), state in zip(optimizer.segments, optimizer.optimizer.state):
            if key in state:
                buffer[flat_lo:flat_hi] = state[key]
        if optimizer.shard:
            for lo, hi in layout.buckets:
                comm.allgather(buffer[lo:hi])
        full[key] = {name: buffer[offset:offset + int(np.prod(shape))].reshape(shape).copy()
                     for name, offset, shape in layout.entries}
    if comm.rank != 0:
        return None
    ordered = {name: scalars[name] for name, _, _ in layout.entries if name in scalars}
    return {"state": full, "scalars": next(iter(ordered.values()), {}), "parameter_scalars": ordered,
            "hyperparameters": optimizer.optimizer.hyperparameters()}
