"""The optimizer update alone: disttrain's Adam (numba kernel, and the chunked-numpy fallback) beside
PyTorch's fused and foreach Adam, over the same number of float32 elements, on one thread.

Each implementation updates its own parameter, gradient and two moment arrays; the four are timed in
turn, round after round, so machine noise falls on all alike. Reported: the median seconds of one
update and the ratio to torch's fused Adam (the target: disttrain within 1.5x of it).
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _disttrain_adam(elements: int, use_numba: bool):
    import disttrain as dt
    from disttrain import fused

    rng = np.random.default_rng(0)
    param = dt.Tensor(rng.standard_normal(elements, dtype=np.float32), requires_grad=True)
    param.grad = rng.standard_normal(elements, dtype=np.float32)
    optimizer = dt.optim.Adam([param], lr=1e-3)
    kernels = fused._numba_kernels() if use_numba else False
    if use_numba and not kernels:
        return None

    def step():  # this path only, whatever the element count
        saved = fused._kernels, fused.NUMBA_MIN_ELEMENTS
        fused._kernels, fused.NUMBA_MIN_ELEMENTS = kernels, 0
        try:
            optimizer.step()
        finally:
            fused._kernels, fused.NUMBA_MIN_ELEMENTS = saved
    return step


def _torch_adam(elements: int, flavour: str):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    param = torch.nn.Parameter(torch.randn(elements, dtype=torch.float32))
    param.grad = torch.randn(elements, dtype=torch.float32)
    optimizer = torch.optim.Adam([param], lr=1e-3, **{flavour: True})
    return optimizer.step


def adam_update_times(elements: int, rounds: int = 7, repeats: int = 5, with_torch: bool = True) -> dict:
    """{name: median seconds of one Adam update over `elements` floats} (None where unavailable or
    torch is not wanted), plus "elements"; one thread everywhere."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        steps = {"disttrain (numba)": _disttrain_adam(elements, True),
                 "disttrain (numpy)": _disttrain_adam(elements, False),
                 "torch fused": _torch_adam(elements, "fused") if with_torch else None,
                 "torch foreach": _torch_adam(elements, "foreach") if with_torch else None}
        times = {name: [] for name, step in steps.items() if step is not None}
        for name in times:
            steps[name]()  # compile / first-touch outside the timing
        for _ in range(rounds):
            for name in times:
                start = time.perf_counter()
                for _ in range(repeats):
                    steps[name]()
                times[name].append((time.perf_counter() - start) / repeats)
    result = {"elements": elements}
    result.update({name: (statistics.median(times[name]) if name in times else None) for name in steps})
    return result


def format_times(result: dict) -> list:
    """Table lines for adam_update_times()'s result."""
    reference = result.get("torch fused")
    lines = [f"Adam update alone over {result['elements']:,} float32 elements, 1 thread (median ms):"]
    for name, seconds in result.items():
        if name == "elements":
            continue
        if seconds is None:
            lines.append(f"  {name:<20} {'n/a':>8}   ({'torch not installed or skipped' if 'torch' in name else 'numba not installed'})")
            continue
        ratio = f"  {seconds / reference:5.2f} x torch fused" if reference else ""
        lines.append(f"  {name:<20} {seconds * 1e3:8.3f}{ratio}")
    if reference:
        lines.append("  (target: disttrain's update within 1.5 x torch's fused Adam)")
    return lines
