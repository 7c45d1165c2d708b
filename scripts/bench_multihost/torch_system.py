"""One rank of a PyTorch DDP system: what a user picks for data-parallel training on CPUs today.

nn.Sequential of Linear/ReLU with the benchmark's initial weights, DistributedDataParallel over gloo
(default 25 MB buckets, its allreduce overlapped with backward by its hooks), torch.optim.Adam with the
same hyperparameters, cross-entropy. The system's "hook" option registers a DDP communication hook:
None, "fp16" (default_hooks.fp16_compress_hook) or "powersgd" (PowerSGD rank "rank", first two steps
exact, error feedback and warm start as PowerSGDState defaults). Ranks meet at `master` (host 0's
address and a fresh port) over the hosts' eth0; rank and world size come from the launcher (PMI_RANK,
PMI_SIZE).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time

from systems import System


class TorchRun:
    """The DDP model and Adam of one rank. COLLECTIVE to construct (every rank)."""

    def __init__(self, system: System, workload, initial: list, master: str, timeout_s: float = 300):
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel

        self.torch, self.dist, self.F = torch, dist, F
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")  # the fake host's link, not lo
        self.rank, self.size = int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
        dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=self.rank, world_size=self.size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        layers = []
        for index, (weight, bias) in enumerate(initial):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weight))
                linear.bias.copy_(torch.from_numpy(bias))
            layers += [linear] if index == len(initial) - 1 else [linear, torch.nn.ReLU()]
        self.model = DistributedDataParallel(torch.nn.Sequential(*layers))
        self.hook = system.options.get("hook")
        if self.hook == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
            self.model.register_comm_hook(state=None, hook=fp16_compress_hook)
        elif self.hook == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
            state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=system.options["rank"],
                                           start_powerSGD_iter=2)
            self.model.register_comm_hook(state, powersgd.powerSGD_hook)
        elif self.hook is not None:
            raise ValueError(f"torch hook must be None, 'fp16' or 'powersgd', got {self.hook!r}")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=workload.lr,
                                          betas=(workload.beta1, workload.beta2), eps=workload.eps)

    def step(self, x, y) -> dict:
        """One training step on this rank's rows; {"loss" (this rank's mean), phase: seconds}. DDP's
        allreduce runs inside backward (overlapped by its hooks), so "backward" includes it."""
        torch = self.torch
        t0 = time.perf_counter()
        loss = self.F.cross_entropy(self.model(torch.from_numpy(x)), torch.from_numpy(y))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return {"loss": float(loss.item()), "forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                "reset": t4 - t3}

    def eval_loss(self, x, y) -> float:
        """This rank's mean loss on (x, y) under the current parameters, without a gradient."""
        torch = self.torch
        with torch.no_grad():
            return float(self.F.cross_entropy(self.model.module(torch.from_numpy(x)), torch.from_numpy(y)).item())

    def param_digest(self) -> str:
        """SHA-256 of every parameter's bytes, in order (equal on every rank when the replicas agree)."""
        digest = hashlib.sha256()
        for param in self.model.module.parameters():
            digest.update(param.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def barrier(self) -> None:
        """COLLECTIVE."""
        self.dist.barrier()

    def gather(self, value) -> list:
        """COLLECTIVE. Every rank's `value`, in rank order (pickled; outside the measured steps)."""
        values = [None] * self.size
        self.dist.all_gather_object(values, value)
        return values

    def describe(self) -> dict:
        """The torch build and the hook."""
        return {"torch": self.torch.__version__, "hook": self.hook, "backend": "gloo"}

    def close(self) -> None:
        """COLLECTIVE. Leave the process group together (rank 0 holds the TCP store)."""
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()
