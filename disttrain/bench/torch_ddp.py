"""The PyTorch peers: what a user would otherwise pick for data-parallel training on CPUs.

Variants (same model, initial parameters, data and Adam hyperparameters as every other system):
  plain      1 process, no DistributedDataParallel: nn.Sequential + torch.optim.Adam
  ddp        DistributedDataParallel (gloo backend, default 25 MB buckets) + torch.optim.Adam
  ddp-zero   DistributedDataParallel + ZeroRedundancyOptimizer(torch.optim.Adam)

Ranks come from the launcher (the venv's mpiexec sets PMI_RANK / PMI_SIZE); the process group meets
over TCP on 127.0.0.1 at the port the runner chose. torch.optim.Adam runs with its defaults unless
`torch_fused_adam` is set. Phases are forward (+ loss), backward (DDP's gradient allreduce runs inside
it, overlapped by its hooks, so communication and waiting are not separable from outside and are
reported as part of backward), optimizer (ZeRO's parameter broadcast included) and zero_grad.

The cnn workload's model is PyTorch's own form of the recipe, conv -> ReLU -> max-pool per block;
`breakdown_step` runs one step under torch's autograd profiler and sums the wall time of its
convolution and max-pooling events, forward and backward (the profiler's own cost lands in "rest").
"""

from __future__ import annotations

import datetime
import os

from .workload import OP_CATEGORIES, Workload, initial_parameters

VARIANTS = ("plain", "ddp", "ddp-zero")


def torch_available() -> bool:
    """True when `import torch` would find a package (without importing it: that takes seconds)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None


class TorchSystem:
    """One rank of a PyTorch variant; `step(x, y)` runs and records one training step."""

    def __init__(self, variant: str, workload: Workload, rank: int, ranks: int, recorder, options: dict):
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        if variant not in VARIANTS:
            raise ValueError(f"torch variant must be one of {VARIANTS}, got {variant!r}")
        self.torch, self.dist, self.F = torch, dist, F
        self.variant, self.recorder, self.rank, self.ranks = variant, recorder, rank, ranks
        torch.set_num_threads(options["threads"])
        if variant == "plain":
            if ranks != 1:
                raise ValueError("the 'plain' torch variant runs on one process only")
        else:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are on this machine
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{options['port']}", rank=rank,
                                    world_size=ranks, timeout=datetime.timedelta(seconds=options.get("timeout", 300)))
        self.model = build_model(torch, workload)
        self.param_elements = sum(p.numel() for p in self.model.parameters())
        if variant != "plain":
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.model)
        adam = dict(lr=workload.lr, betas=(workload.beta1, workload.beta2), eps=workload.eps)
        if options.get("torch_fused_adam"):
            adam["fused"] = True
        if variant == "ddp-zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer
            self.optimizer = ZeroRedundancyOptimizer(self.model.parameters(), optimizer_class=torch.optim.Adam, **adam)
            self.local_optimizer = self.optimizer.optim
        else:
            self.optimizer = torch.optim.Adam(self.model.parameters(), **adam)
            self.local_optimizer = self.optimizer
        recorder.phases = ["forward", "backward", "optimizer", "reset"]

    def step(self, x, y) -> float:
        rec, torch = self.recorder, self.torch
        loss = self.F.cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        rec.mark()
        loss.backward()
        rec.mark()
        self.optimizer.step()
        rec.mark()
        self.optimizer.zero_grad(set_to_none=True)
        rec.mark()
        return float(loss.item())

    def breakdown_step(self, x, y) -> dict:
        """One training step under the autograd profiler: {category: seconds} for OP_CATEGORIES, plus
        "step" (the whole step, profiled)."""
        import time

        from torch.autograd.profiler import profile

        with profile() as prof:
            start = time.perf_counter()
            self.step(x, y)
            step = time.perf_counter() - start
        times = dict.fromkeys(OP_CATEGORIES, 0.0)
        times["step"] = step
        for event in prof.function_events:
            if event.name in TORCH_OP_EVENTS:
                times[TORCH_OP_EVENTS[event.name]] += event.cpu_time_total * 1e-6
        return times

    def state_bytes(self) -> int:
        torch = self.torch
        return int(sum(value.numel() * value.element_size() for state in self.local_optimizer.state.values()
                       for value in state.values() if torch.is_tensor(value)))

    def barrier(self) -> None:
        if self.variant != "plain":
            self.dist.barrier()

    def raw_collectives(self) -> dict | None:
        """Median seconds of a gloo allreduce of the whole gradient's element count (after a barrier)."""
        if self.variant == "plain" or self.ranks == 1:
            return None
        import statistics
        import time
        torch, dist = self.torch, self.dist
        buffer = torch.ones(self.param_elements, dtype=torch.float32)
        times = []
        for i in range(18):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if i >= 3:
                times.append(time.perf_counter() - start)
        return {"elements": self.param_elements, "bytes": self.param_elements * 4,
                "gloo_allreduce": statistics.median(times)}

    def describe(self) -> dict:
        torch = self.torch
        info = {"torch": torch.__version__, "adam_fused": bool(self.optimizer.defaults.get("fused"))
                if hasattr(self.optimizer, "defaults") else None}
        config = torch.__config__.parallel_info()
        for line in config.splitlines():
            if "Math Kernel Library" in line or line.startswith("ATen parallel backend"):
                info.setdefault("torch_parallel", []).append(line.strip())
        return info

    def close(self) -> None:
        if self.variant != "plain" and self.dist.is_initialized():
            self.dist.barrier()  # no rank tears down (rank 0 hosts the TCP store) while another still talks
            self.dist.destroy_process_group()


# profiler events -> categories: none of them nests inside another (their children, e.g.
# aten::mkldnn_convolution, are not listed); under DDP they sit below its forward's event
TORCH_OP_EVENTS = {
    "aten::conv2d": "conv forward",
    "autograd::engine::evaluate_function: ConvolutionBackward0": "conv backward",
    "aten::max_pool2d": "pool forward",
    "autograd::engine::evaluate_function: MaxPool2DWithIndicesBackward0": "pool backward",
}


def build_model(torch, workload: Workload):
    """The workload's model from torch.nn layers, holding its initial parameters."""
    params = initial_parameters(workload)
    if workload.model == "cnn":
        layers, c_in = [torch.nn.Unflatten(1, tuple(workload.image))], workload.image[0]
        for c_out in workload.channels:
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c_in = c_out
        layers += [torch.nn.Flatten(), torch.nn.Linear(workload.flat_features, workload.layers[-1])]
    else:
        layers = []
        for weight, _ in params:
            layers += [torch.nn.Linear(weight.shape[1], weight.shape[0]), torch.nn.ReLU()]
        layers.pop()
    model = torch.nn.Sequential(*layers)
    values = [value for pair in params for value in pair]
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), values, strict=True):
            parameter.copy_(torch.from_numpy(value))
    return model


def make(variant: str, workload: Workload, rank: int, ranks: int, recorder, options: dict) -> TorchSystem:
    return TorchSystem(variant, workload, rank, ranks, recorder, options)
