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
"""

from __future__ import annotations

import datetime
import os

from .workload import Workload, initial_parameters

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
        layers = []
        params = initial_parameters(workload)
        for i, (weight, bias) in enumerate(params):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weight))
                linear.bias.copy_(torch.from_numpy(bias))
            layers.append(linear)
            if i < len(params) - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
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


def make(variant: str, workload: Workload, rank: int, ranks: int, recorder, options: dict) -> TorchSystem:
    return TorchSystem(variant, workload, rank, ranks, recorder, options)
