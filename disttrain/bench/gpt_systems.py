"""The two sides of the GPT benchmark, one rank each: disttrain and PyTorch, from the same weights.

Both expose `step(x, y) -> loss` (one optimizer step on this rank's part of a global batch, phase ends
marked on a StepRecorder), `validation_loss_sum(x, y)` (summed over the windows, no graph, no dropout),
`breakdown(batches, steps)` (seconds per step by kind of work) and `close()`.

disttrain runs as the trainer does: DataParallel (reduce-scatter) and a ZeRO-1 ShardedOptimizer(AdamW),
the backward seeded with this rank's share of the global batch. Its breakdown times the library's ops
from outside (the `ops` functions the layers call, and Tensor.__add__ for the residual adds, replaced in
this process by timing wrappers; their backward closures are timed too), the optimizer update, and the
collectives (gradient sync, parameter allgather). PyTorch runs one process, or DistributedDataParallel
over gloo; its breakdown is torch.profiler's self CPU time per operator, grouped by kind.
"""

from __future__ import annotations

import collections
import datetime
import os
import time

import numpy as np

CATEGORIES = ("matmuls", "attention", "layernorm", "embedding", "gelu", "loss", "residual adds", "optimizer",
              "communication", "other")


class DisttrainSide:
    """disttrain's GPT on this rank (COLLECTIVE to build under MPI)."""

    phases = ["forward", "backward", "sync", "optimizer"]

    def __init__(self, recipe, state: dict, threads: int):
        from threadpoolctl import threadpool_limits

        from .. import optim
        from ..distributed import DataParallel, ShardedOptimizer, init
        from ..transformer import GPT

        self._limits = threadpool_limits(threads)
        self.comm = init()
        self.model = GPT(**recipe.model_sizes(), rng=np.random.default_rng(0))
        self.model.load_state_dict(state)
        self.ddp = DataParallel(self.model, self.comm)
        self.optimizer = ShardedOptimizer(optim.AdamW, self.ddp.parameters(), self.comm, lr=recipe.lr,
                                          beta1=recipe.beta1, beta2=recipe.beta2, eps=recipe.eps,
                                          weight_decay=recipe.weight_decay)
        self.rank, self.ranks, self.batch = self.comm.rank, self.comm.size, recipe.batch

    def step(self, x, y, recorder) -> float:
        from .. import ops
        from ..tensor import Tensor

        loss = ops.cross_entropy(self.ddp(Tensor.wrap(x)), y)
        recorder.mark()
        loss.backward(np.float32(len(x) / self.batch))
        recorder.mark()
        self.ddp.sync_gradients(grad_scale=1.0)
        recorder.mark()
        self.optimizer.step()
        self.optimizer.reset_grad()
        recorder.mark()
        return float(loss.data)

    def validation_loss_sum(self, x, y) -> float:
        from .. import ops
        from ..tensor import no_grad

        self.model.eval()
        with no_grad():
            loss = float(ops.cross_entropy(self.model(x), y).data) * len(x)
        self.model.train()
        return loss

    def barrier(self) -> None:
        self.comm.barrier()

    def allreduce_max(self, value: float) -> float:
        return float(self.comm.allreduce(np.array([value]), "max")[0])

    def breakdown(self, batches, steps: int) -> dict:
        """Seconds per step in each of CATEGORIES, over `steps` steps of `batches`."""
        from .. import ops
        from ..tensor import Tensor
        from .recorder import StepRecorder

        spent = collections.defaultdict(float)
        timed = {"linear": "matmuls", "causal_self_attention": "attention", "layer_norm": "layernorm",
                 "embedding": "embedding", "gelu": "gelu", "cross_entropy": "loss"}
        originals = {name: getattr(ops, name) for name in timed}
        original_add = Tensor.__add__
        for name, category in timed.items():
            setattr(ops, name, _timing(originals[name], category, spent))
        Tensor.__add__ = _timing(original_add, "residual adds", spent)
        recorder = StepRecorder(self.phases)
        try:
            total = 0.0
            for _ in range(steps):
                x, y = next(batches)
                self.barrier()
                recorder.start()
                started = time.perf_counter()
                self.step(x, y, recorder)
                total += time.perf_counter() - started
                recorder.end()
                spent["optimizer"] += self.optimizer.last_update_seconds
                spent["communication"] += self.optimizer.last_gather_seconds
                sync = recorder.steps[-1]["t"]
                spent["communication"] += sync[3] - sync[2]
        finally:
            for name, function in originals.items():
                setattr(ops, name, function)
            Tensor.__add__ = original_add
        result = {category: spent[category] / steps for category in CATEGORIES if category != "other"}
        result["other"] = total / steps - sum(result.values())
        return result

    def close(self) -> None:
        pass


def _timing(function, category: str, spent: dict):
    """`function` that adds its own time, and that of the backward of the node it returns, to spent[category]."""
    def timed(*args, **kwargs):
        started = time.perf_counter()
        out = function(*args, **kwargs)
        spent[category] += time.perf_counter() - started
        backward = getattr(out, "_backward", None)
        if backward is not None:
            def timed_backward(g):
                began = time.perf_counter()
                grads = backward(g)
                spent[category] += time.perf_counter() - began
                return grads
            out._backward = timed_backward
        return out
    return timed


class TorchSide:
    """The PyTorch twin on this rank: one process, or DistributedDataParallel (gloo) when ranks > 1."""

    phases = ["forward", "backward", "optimizer"]

    def __init__(self, recipe, state: dict, threads: int, attention: str, rank: int, ranks: int, port: int):
        import torch
        import torch.distributed as dist

        from .gpt_torch import TorchGPT, loss_fn

        self.torch, self.dist, self.loss_fn = torch, dist, loss_fn
        torch.set_num_threads(threads)
        self.rank, self.ranks, self.batch = rank, ranks, recipe.batch
        if ranks > 1:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks,
                                    timeout=datetime.timedelta(seconds=300))
        self.model = TorchGPT(**recipe.model_sizes(), attention=attention)
        self.model.load_numpy(state)
        self.module = self.model
        if ranks > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.module = DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2),
                                           eps=recipe.eps, weight_decay=recipe.weight_decay)

    def step(self, x, y, recorder) -> float:
        torch = self.torch
        loss = self.loss_fn(self.module(torch.from_numpy(x)), torch.from_numpy(y))
        recorder.mark()
        loss.backward()
        recorder.mark()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        recorder.mark()
        return float(loss.detach())

    def validation_loss_sum(self, x, y) -> float:
        torch = self.torch
        self.model.eval()
        with torch.no_grad():
            loss = float(self.loss_fn(self.model(torch.from_numpy(x)), torch.from_numpy(y))) * len(x)
        self.model.train()
        return loss

    def barrier(self) -> None:
        if self.ranks > 1:
            self.dist.barrier()

    def allreduce_max(self, value: float) -> float:
        if self.ranks == 1:
            return value
        buffer = self.torch.tensor([value], dtype=self.torch.float64)
        self.dist.all_reduce(buffer, op=self.dist.ReduceOp.MAX)
        return float(buffer[0])

    def breakdown(self, batches, steps: int) -> dict:
        """Seconds per step in each of CATEGORIES: torch.profiler's self CPU time per operator, grouped;
        the optimizer step by the clock; gloo's allreduce, run on its own threads during backward, is
        the clock time of one allreduce of every gradient, measured apart."""
        from torch.profiler import ProfilerActivity, profile

        from .recorder import StepRecorder

        recorder = StepRecorder(self.phases)
        optimizer_seconds = total = 0.0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                x, y = next(batches)
                self.barrier()
                recorder.start()
                started = time.perf_counter()
                self.step(x, y, recorder)
                total += time.perf_counter() - started
                recorder.end()
                times = recorder.steps[-1]["t"]
                optimizer_seconds += times[3] - times[2]
        spent = collections.defaultdict(float)
        for event in prof.key_averages():
            category = _torch_category(event.key)
            if category is not None:
                spent[category] += event.self_cpu_time_total / 1e6
        result = {category: spent[category] / steps for category in CATEGORIES}
        result["optimizer"] = optimizer_seconds / steps
        result["communication"] = self._allreduce_seconds()
        result["other"] = total / steps - sum(v for k, v in result.items() if k not in ("other", "communication"))
        return result

    def _allreduce_seconds(self) -> float:
        if self.ranks == 1:
            return 0.0
        torch = self.torch
        buffer = torch.ones(sum(p.numel() for p in self.model.parameters()), dtype=torch.float32)
        times = []
        for _ in range(8):
            self.dist.barrier()
            started = time.perf_counter()
            self.dist.all_reduce(buffer)
            times.append(time.perf_counter() - started)
        return float(np.median(times[2:]))

    def close(self) -> None:
        if self.ranks > 1 and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()


_TORCH_GROUPS = (  # first match wins: log_softmax is the loss's, addmm a matmul, not an add
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax", "bmm", "masked_fill", "triu", "tril")),
    ("layernorm", ("layer_norm",)),
    ("embedding", ("embedding",)),
    ("gelu", ("gelu",)),
    ("matmuls", ("addmm", "aten::mm", "aten::matmul", "aten::linear")),
    ("residual adds", ("aten::add",)),
)


def _torch_category(name: str):
    """The CATEGORIES entry of a torch operator (by name), or None for the rest."""
    if name.startswith("Optimizer.") or "_foreach" in name or "adamw" in name.lower():
        return None  # the optimizer is timed by the clock
    for category, patterns in _TORCH_GROUPS:
        if any(pattern in name for pattern in patterns):
            return category
    return None
