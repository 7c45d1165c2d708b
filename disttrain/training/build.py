"""Building a run: from a config to a model, data and loss (`build_run`), and from the [optimizer] and
[training] sections to the machinery that trains it (`build_parts`): BLAS threads, DataParallel
(overlap, hierarchical bucket collectives, compression), ShardedOptimizer, sampler and schedule.
Strategy "auto" is resolved here, once; config.check_consistency only checks."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn
from ..config import ConfigError
from ..data import DistributedSampler
from ..distributed import DataParallel, ShardedOptimizer
from ..optim import SGD, Adam, AdamW, ConstantLR, CosineLR, StepLR
from ..threads import apply_threads, choose_threads

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def build_run(config: dict, comm):
    """(model, train, test, loss_fn, info) for a validated config; checks the model accepts the data.
    COLLECTIVE: every rank of `comm` calls it (the data load scans each rank's rows, then agrees).
    The model is built from training.seed, so it is the same on every rank."""
    from .. import models
    from ..datasets import load_data

    train, test, info = load_data(config["data"], comm, block_size=config["model"]["block_size"])
    nn.manual_seed(config["training"]["seed"])
    loss_fn = task_loss(info["task"])
    try:
        model = models.build_model(config["model"], info["input_shape"], info["classes"])
        check_model_fits(model, train, info, loss_fn)
    except ConfigError:
        raise
    except ValueError as error:  # from the same config and data on every rank: an agreed error
        raise ConfigError(str(error)) from None
    return model, train, test, loss_fn, info


def task_loss(task: str):
    """The loss of a task: softmax cross-entropy for "classification" (logits (batch, classes)) and
    "language_model" (logits (batch, time, vocab) against the next token of each position), mean
    squared error for "regression"."""
    return nn.SoftmaxLoss() if task in ("classification", "language_model") else nn.MSELoss()


def check_model_fits(model, dataset, info: dict, loss_fn=None) -> None:
    """Raise ValueError unless `model` accepts two samples of `dataset`, outputs exactly info["classes"]
    values per sample, and `loss_fn` (default: the task's, as build_run chooses) takes that output and the labels."""
    from ..tensor import Tensor, no_grad

    x, labels = dataset[np.arange(min(2, len(dataset)))]
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            output = model(Tensor(x))
    except (ValueError, TypeError, IndexError) as error:
        raise ValueError(f"the model does not accept the data (samples of shape {tuple(x.shape[1:])}): {error}") from None
    finally:
        model.train(was_training)
    expected = (len(x), info["classes"])
    if info["task"] == "classification" and (output.ndim != 2 or output.shape[1] != info["classes"]):
        extra = ""
        if output.ndim == 2 and output.shape[1] > info["classes"]:  # its extra outputs would never be trained
            extra = (f"; if labels up to {output.shape[1] - 1} are meant to be possible, set data.classes = "
                     f"{output.shape[1]}")
        raise ValueError(f"the model outputs shape {output.shape} but the labels need {info['classes']} classes "
                         f"(labels go up to {info['classes'] - 1}); expected (batch, {info['classes']}){extra}")
    if info["task"] == "regression" and output.shape != expected:
        raise ValueError(f"the model outputs shape {output.shape}, the targets need {expected}")
    if info["task"] == "language_model" and output.shape != (*labels.shape, info["classes"]):
        raise ValueError(f"the model outputs shape {output.shape}; next-token prediction over windows of "
                         f"{labels.shape[1:]} needs {(*labels.shape, info['classes'])} (vocabulary {info['classes']})")
    if loss_fn is None:
        loss_fn = task_loss(info["task"])
    try:
        with no_grad():
            loss_fn(output, labels)
    except (ValueError, TypeError, IndexError) as error:
        raise ValueError(f"the loss does not accept the model's output {output.shape} with labels of shape "
                         f"{labels.shape} {labels.dtype}: {error}") from None


@dataclasses.dataclass
class RunParts:
    """What trains a model: `comm` (the world's communicator), `topology` (nodes, ranks
    per node), `threads` and `threads_reason`, the DataParallel `ddp`, the ShardedOptimizer
    `optimizer`, the `scheduler`, the `sampler` (a DistributedSampler, or the data set's own, such as
    the text windows' RandomSampler: the same interface), `steps_per_epoch` and `total_steps`."""

    comm: object
    topology: dict
    threads: int
    threads_reason: str
    ddp: DataParallel
    optimizer: ShardedOptimizer
    scheduler: object
    sampler: object
    steps_per_epoch: int
    total_steps: int


def build_parts(model, train_data, comm, opt_cfg: dict, train_cfg: dict) -> RunParts:
    """COLLECTIVE. The RunParts for `model` on `train_data` from validated [optimizer] and [training]
    sections. Sets process-wide state: BLAS threads and nn's default RNG (seeded per rank, so dropout
    masks differ across ranks). Raises ConfigError when the global batch is smaller than the world."""
    if train_cfg["batch_size"] < comm.size:
        raise ConfigError(f"training.batch_size = {train_cfg['batch_size']} is smaller than the world size "
                          f"{comm.size}: every rank needs at least one sample per global batch")
    if len(train_data) == 0:
        raise ValueError("the training data set is empty")
    topology = comm.node_topology()
    threads, threads_reason = choose_threads(topology["local_size"], train_cfg["threads"])
    apply_threads(threads)
    ddp = DataParallel(model, comm, resolve_strategy(opt_cfg), opt_cfg["bucket_mb"], overlap=opt_cfg["overlap"],
                       hierarchical=opt_cfg["hierarchical"], compression=opt_cfg["compression"],
                       powersgd_rank=opt_cfg["powersgd_rank"])
    # with overlap, the parameter allgather also runs on into the next forward (the loop waits before
    # anything else reads parameters): measured 85 ms a step against 89 ms waiting at the end of step()
    optimizer = ShardedOptimizer(OPTIMIZERS[opt_cfg["name"]], ddp.parameters(), comm, shard=opt_cfg["sharded"],
                                 data_parallel=ddp, lazy_gather=ddp.overlap, **hyperparameters(opt_cfg))
    nn.set_default_rng(np.random.default_rng((train_cfg["seed"], comm.rank)))
    if hasattr(train_data, "sampler"):  # a data set with its own way of drawing samples (text windows)
        sampler = train_data.sampler(comm.size, comm.rank, seed=train_cfg["seed"])
    else:
        sampler = DistributedSampler(len(train_data), comm.size, comm.rank, shuffle=train_cfg["shuffle"],
                                     seed=train_cfg["seed"])
    steps_per_epoch = -(-sampler.num_batches(train_cfg["batch_size"]) // train_cfg["accumulate"])
    total_steps = train_cfg["epochs"] * steps_per_epoch
    if train_cfg["max_steps"]:
        total_steps = min(total_steps, train_cfg["max_steps"])
    return RunParts(comm, topology, threads, threads_reason, ddp, optimizer, scheduler(optimizer, train_cfg, total_steps),
                    sampler, steps_per_epoch, total_steps)


def resolve_strategy(opt_cfg: dict) -> str:
    """optimizer.strategy with "auto" made concrete: reduce_scatter for a sharded optimizer, else allreduce."""
    if opt_cfg["strategy"] != "auto":
        return opt_cfg["strategy"]
    return "reduce_scatter" if opt_cfg["sharded"] else "allreduce"


def hyperparameters(section: dict) -> dict:
    """The keyword arguments of the [optimizer] section's optimizer class."""
    if section["name"] == "sgd":
        return {"lr": section["lr"], "momentum": section["momentum"], "weight_decay": section["weight_decay"]}
    return {"lr": section["lr"], "beta1": section["beta1"], "beta2": section["beta2"], "eps": section["eps"],
            "weight_decay": section["weight_decay"]}


def scheduler(optimizer, train_cfg: dict, total_steps: int):
    """The learning-rate schedule training.schedule names, over `total_steps`."""
    if train_cfg["schedule"] == "cosine":
        steps = max(total_steps, 1)
        return CosineLR(optimizer, steps, min(train_cfg["warmup_steps"], steps), train_cfg["min_lr"])
    if train_cfg["schedule"] == "step":
        return StepLR(optimizer, train_cfg["step_size"], train_cfg["gamma"])
    return ConstantLR(optimizer)
