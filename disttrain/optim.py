"""Optimizers (SGD, Adam, AdamW with the update rules stated on each), learning-rate schedules, and
gradient clipping.

`Optimizer(params)` holds a list of Tensors and one state dict per Tensor. The update of each Tensor is
one fused pass over its flattened data (fused.py: numba when installed, chunked numpy otherwise), so
no full-size temporaries are allocated per step. Because updates are
elementwise, an optimizer handed one Tensor that is a slice of a flat parameter buffer updates that
slice exactly as it would update the parameters it covers: that is how the sharded optimizer runs.
"""

from __future__ import annotations

import math

import numpy as np

from . import fused
from .fused import CHUNK_ELEMENTS
from .tensor import Tensor


class Optimizer:
    """Base class: `Optimizer(params)` with `step()` (abstract) and `reset_grad()`.

    `params` is a non-empty list of Tensors with requires_grad=True. `state[i]` is the state of
    `params[i]` (arrays of the parameter's shape and dtype, plus scalars). Parameters whose `grad`
    is None are skipped by `step()`. Subclasses define `update(data, grad, state)` or override `step()`;
    one that does neither raises NotImplementedError from `step()`, gradients or not.
    """

    def __init__(self, params):
        if isinstance(params, Tensor):
            raise TypeError("params must be a list of Tensors, not a single Tensor")
        params = list(params)
        if not params:
            raise ValueError("Optimizer got an empty parameter list")
        for i, param in enumerate(params):
            if not isinstance(param, Tensor):
                raise TypeError(f"params[{i}] is a {type(param).__name__}, not a Tensor")
            if not param.requires_grad:
                raise ValueError(f"params[{i}] (shape {param.shape}) does not require grad")
            if not param.data.flags.c_contiguous:
                param.data = np.ascontiguousarray(param.data)
        self.params = params
        self.state = [dict() for _ in params]

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        if type(self).update is Optimizer.update:
            raise NotImplementedError(f"{type(self).__name__} must define update(data, grad, state) or step()")
        for param, state in zip(self.params, self.state):
            if param.grad is not None:
                grad = param.grad.data if isinstance(param.grad, Tensor) else param.grad
                self.update(param.data, np.ascontiguousarray(grad, dtype=param.data.dtype), state)

    def update(self, data: np.ndarray, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define update(data, grad, state)")

    def reset_grad(self) -> None:
        """Clear every parameter's gradient (set it to None)."""
        for param in self.params:
            param.grad = None

    zero_grad = reset_grad

    # --- state
    def hyperparameters(self) -> dict:
        """The numbers that define the update (lr, betas, ...), as a plain dict."""
        return {}

    def state_dict(self) -> dict:
        """{"hyperparameters": {...}, "state": [{name: array copy or number}, ...] in params order}."""
        return {"hyperparameters": self.hyperparameters(),
                "state": [{key: (np.array(value, copy=True) if isinstance(value, np.ndarray) else value)
                           for key, value in state.items()} for state in self.state]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what `state_dict()` returned (arrays are checked against each parameter's shape)."""
        states = state_dict["state"]
        if len(states) != len(self.params):
            raise ValueError(f"optimizer state has {len(states)} entries, this optimizer has "
                             f"{len(self.params)} parameters")
        for i, (param, state) in enumerate(zip(self.params, states)):
            for key, value in state.items():
                if isinstance(value, np.ndarray) and value.shape != param.shape:
                    raise ValueError(f"optimizer state '{key}' of parameter {i} has shape {value.shape}, "
                                     f"parameter has shape {param.shape}")
        self.state = [{key: (np.array(value, dtype=param.dtype) if isinstance(value, np.ndarray) else value)
                       for key, value in state.items()} for param, state in zip(self.params, states)]
        for key, value in state_dict.get("hyperparameters", {}).items():
            setattr(self, key, value)

    def state_bytes(self) -> int:
        """Bytes held in optimizer-state arrays (what ZeRO-1 divides by the world size)."""
        return sum(v.nbytes for state in self.state for v in state.values() if isinstance(v, np.ndarray))


def _check_range(name: str, value: float, low: float, high: float | None = None, high_open: bool = True) -> float:
    value = float(value)
    bad = not math.isfinite(value) or value < low or (
        high is not None and (value >= high if high_open else value > high))
    if bad:
        allowed = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {allowed}, got {value}")
    return value


class SGD(Optimizer):
    """SGD with momentum as an exponential average: u = m*u + (1-m)*g; p = p*(1 - lr*wd) - lr*u (u starts at 0).

    With momentum 0 no buffer is kept and the update is p = p*(1 - lr*wd) - lr*g.
    """

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr = _check_range("lr", lr, 0.0)
        self.momentum = _check_range("momentum", momentum, 0.0, 1.0)
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}

    def update(self, data, grad, state):
        if self.momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = np.zeros_like(data)
        buffer = state.get("momentum_buffer") if self.momentum else None
        c = fused.constants(data.dtype, momentum=self.momentum, one_minus_momentum=1.0 - self.momentum,
                            decay_factor=1.0 - self.lr * self.weight_decay, lr=self.lr)
        fused.sgd_update(data.reshape(-1), grad.reshape(-1), None if buffer is None else buffer.reshape(-1), c)


class Adam(Optimizer):
    """Adam with L2 weight decay (added to the gradient), t counting from 1:

    g = g + wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    decoupled = False

    def __init__(self, params, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-08, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr = _check_range("lr", lr, 0.0)
        self.beta1 = _check_range("beta1", beta1, 0.0, 1.0)
        self.beta2 = _check_range("beta2", beta2, 0.0, 1.0)
        self.eps = float(eps)
        if not self.eps > 0 or not math.isfinite(self.eps):
            raise ValueError(f"eps must be > 0, got {eps}")
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0)

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "weight_decay": self.weight_decay}

    def update(self, data, grad, state):
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(data)
            state["exp_avg_sq"] = np.zeros_like(data)
        state["step"] += 1
        t, decay = state["step"], self.weight_decay
        c = fused.constants(data.dtype, l2=0.0 if self.decoupled else decay,
                            decay_factor=1.0 - self.lr * decay if self.decoupled else 1.0,
                            b1=self.beta1, one_minus_b1=1.0 - self.beta1, b2=self.beta2,
                            one_minus_b2=1.0 - self.beta2, lr=self.lr, correction1=1.0 - self.beta1 ** t,
                            correction2=1.0 - self.beta2 ** t, eps=self.eps)
        fused.adam_update(data.reshape(-1), grad.reshape(-1), state["exp_avg"].reshape(-1),
                          state["exp_avg_sq"].reshape(-1), c)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p = p*(1 - lr*wd), then Adam without L2."""

    decoupled = True


# --------------------------------------------------------------------------------------- clipping
def squared_norm(arrays) -> float:
    """Sum of squares of all elements of `arrays` (numpy arrays or Tensors), accumulated in float64
    (chunk by chunk, no full-size copy)."""
    total = 0.0
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        for lo in range(0, flat.size, CHUNK_ELEMENTS):
            chunk = flat[lo:lo + CHUNK_ELEMENTS].astype(np.float64)
            total += float(chunk @ chunk)
    return total


def first_nonfinite(array) -> int | None:
    """Index of the first NaN or inf in `array` (flattened), or None when every element is finite.
    One sum decides the common case; only a suspicious sum (NaN/inf, or an overflow) scans."""
    flat = np.asarray(array).reshape(-1)
    if math.isfinite(float(flat.sum())):
        return None
    bad = np.flatnonzero(~np.isfinite(flat))
    return int(bad[0]) if bad.size else None


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale gradients in place so their global L2 norm is at most `max_norm`; return the norm before.

    Parameters without a gradient are ignored; a gradient may be an array or a Tensor. The norm is
    computed in float64.
    """
    max_norm = _check_range("max_norm", max_norm, 0.0)
    grads = [p.grad for p in params if p.grad is not None]
    norm = math.sqrt(squared_norm(grads))
    scale_grads(grads, norm, max_norm)
    return norm


def scale_grads(grads, norm: float, max_norm: float) -> None:
    """Multiply `grads` (numpy arrays or Tensors) in place by max_norm / norm when the norm exceeds max_norm."""
    if norm > max_norm and math.isfinite(norm):
        factor = np.float32(max_norm / (norm + 1e-6))
        for grad in grads:
            array = grad.data if isinstance(grad, Tensor) else grad
            array *= factor


# --------------------------------------------------------------------------------------- schedules
class LRScheduler:
    """Sets `optimizer.lr` from the step count; call `step()` once per optimizer step.

    `lr_at(step)` is the rate for step `step` (0-based); the base rate is the optimizer's lr at creation.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def step(self) -> float:
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base_lr = int(state["last_step"]), float(state["base_lr"])
        self.optimizer.lr = self.lr_at(self.last_step)


class ConstantLR(LRScheduler):
    """The base rate throughout."""

    def lr_at(self, step):
        return self.base_lr


class StepLR(LRScheduler):
    """lr = base * gamma ** (step // step_size)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        if not isinstance(step_size, int) or step_size <= 0:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size, self.gamma = step_size, _check_range("gamma", gamma, 0.0)
        super().__init__(optimizer)

    def lr_at(self, step):
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineLR(LRScheduler):
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.min_lr = _check_range("min_lr", min_lr, 0.0)
        super().__init__(optimizer)

    def lr_at(self, step):
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
