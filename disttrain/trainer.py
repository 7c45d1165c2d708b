"""The training loop: epochs and steps, gradient accumulation, schedule, clipping, parallel evaluation,
checkpoints, signals, metrics and progress. A user writes only a model, a dataset and a loss:

    Trainer(model, train_data, loss_fn, test_data, optimizer={"name": "adam", "lr": 1e-3},
            training={"epochs": 5, "batch_size": 64, "run_dir": "runs/mine"}).fit()

Every rank runs the same sequence of collectives whatever happens locally: a failure in data loading,
forward or backward on one rank is carried through the step's gradient sync and its single small
stats allreduce, so all ranks learn of it together and raise the same error.
"""

from __future__ import annotations

import math
import os
import signal
import time
import traceback
import zlib
from itertools import islice

import numpy as np

from . import checkpoint as ckpt
from . import config as config_module
from . import nn
from .data import DistributedSampler, split_evenly
from .distributed import DataParallel, MPIComm, ShardedOptimizer, init
from .distributed.hierarchical import HierarchicalComm
from .distributed.watchdog import Watchdog
from .faults import Faults
from .optim import SGD, Adam, AdamW, ConstantLR, CosineLR, StepLR
from .progress import MetricsFile, Progress
from .tensor import Tensor, no_grad
from .threads import apply_threads, choose_threads

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_stop_signal = None  # the last stop signal received by this process and not yet acted on


def catch_stop_signals() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying, so a signal that arrives before `fit()` (while the
    data loads, say) still ends in a checkpoint at the first step boundary. The CLI calls it first."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_stop_signal)


def _record_stop_signal(signum, frame) -> None:
    global _stop_signal
    _stop_signal = signum  # acted on at the next step boundary, agreed by all ranks


def _forget_stop_signal() -> None:
    global _stop_signal
    _stop_signal = None


class TrainingError(RuntimeError):
    """A step failed on some rank; raised on every rank with that rank's message."""


class NonFiniteError(TrainingError):
    """The loss or a gradient became NaN or infinite (training.on_nonfinite = "error")."""


class ReplicaMismatchError(TrainingError):
    """Parameters differ across ranks (they must stay bit-identical)."""


class Trainer:
    """Owns the loop for `model` on `train_data` (an ArrayDataset-like: len() and [indices] -> (x, y)).

    `loss_fn(output, labels)` returns the mean loss of a batch as a scalar Tensor. `optimizer`,
    `training` and `checkpoint` are dicts of the config sections of the same names (see `disttrain
    train --help` or disttrain.config.SCHEMA); `config` may carry the whole config to record in
    checkpoints. Constructing a Trainer is COLLECTIVE (it wraps the model in DataParallel).
    """

    def __init__(self, model, train_data, loss_fn, test_data=None, comm=None, optimizer=None, training=None,
                 checkpoint=None, config: dict | None = None, task: str | None = None,
                 resume_command: str | None = None):
        settings = config_module.validate({"optimizer": optimizer or {}, "training": training or {},
                                           "checkpoint": checkpoint or {}}, "Trainer settings")
        config_module.check_consistency(settings)
        self.config = dict(config or {}, **{k: settings[k] for k in ("optimizer", "training", "checkpoint")})
        self.opt_cfg, self.train_cfg, self.ckpt_cfg = settings["optimizer"], settings["training"], settings["checkpoint"]
        self.comm = comm or init()
        if self.opt_cfg["hierarchical"] and isinstance(self.comm, MPIComm) and self.comm.size > 1:
            self.comm = HierarchicalComm(self.comm)  # COLLECTIVE: splits the world into nodes and node leaders
        self.model, self.loss_fn = model, loss_fn
        self.train_data, self.test_data = train_data, test_data
        self.task = task or _guess_task(train_data)
        cfg = self.train_cfg
        if cfg["batch_size"] < self.comm.size:
            raise config_module.ConfigError(f"training.batch_size = {cfg['batch_size']} is smaller than the world "
                                            f"size {self.comm.size}: every rank needs at least one sample per "
                                            f"global batch")
        if len(train_data) == 0:
            raise ValueError("the training data set is empty")

        self.topology = self.comm.node_topology()
        self.threads, self.threads_reason = choose_threads(self.topology["local_size"], cfg["threads"])
        apply_threads(self.threads)
        self.ddp = DataParallel(model, self.comm, self.opt_cfg["strategy"], self.opt_cfg["bucket_mb"])
        self.optimizer = ShardedOptimizer(OPTIMIZERS[self.opt_cfg["name"]], self.ddp.parameters(), self.comm,
                                          shard=self.opt_cfg["sharded"], **_hyperparameters(self.opt_cfg))
        nn.set_default_rng(np.random.default_rng((cfg["seed"], self.comm.rank)))  # dropout differs per rank
        self.sampler = DistributedSampler(len(train_data), self.comm.size, self.comm.rank,
                                          shuffle=cfg["shuffle"], seed=cfg["seed"])
        batches = self.sampler.num_batches(cfg["batch_size"])
        self.steps_per_epoch = -(-batches // cfg["accumulate"])
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"]:
            self.total_steps = min(self.total_steps, cfg["max_steps"])
        self.scheduler = _scheduler(self.optimizer, cfg, self.total_steps)
        self.run_dir = cfg["run_dir"]
        self.checkpoint_dir = self.ckpt_cfg["dir"] or os.path.join(self.run_dir, "checkpoints")
        self.faults = Faults(self.comm.rank)
        self.step, self.epoch = 0, 0
        self.epoch_loss_sum, self.epoch_count, self.skipped_steps = 0.0, 0, 0
        self.last_checkpoint_step = self.last_checkpoint_path = None
        self.last_eval = {}
        self.progress = Progress(self.total_steps, self.comm.rank == 0, cfg["progress"])
        # what to run to continue after a stop signal (the CLI passes the exact command line)
        self.resume_command = resume_command or "Trainer.fit(resume=True) with the same settings"
        self.stop_signal_name = None
        self.metrics = None

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, resume: str | bool | None = None) -> dict:
        """COLLECTIVE. Train to the end (or to a stop signal); returns a summary dict.

        `resume`: True (or checkpoint.resume) continues from the newest good checkpoint in the
        checkpoint directory if there is one; a path continues from that checkpoint (or directory).
        """
        cfg, comm = self.train_cfg, self.comm
        resume = self.ckpt_cfg["resume"] if resume is None else resume
        saving = bool(self.ckpt_cfg["every_steps"] or self.ckpt_cfg["every_epochs"])
        ckpt.probe(self.checkpoint_dir, comm, self._checkpoint_bytes())
        resumed = self._resume(resume) if resume else None
        if comm.rank == 0:
            self.metrics = MetricsFile(os.path.join(self.run_dir, "metrics.jsonl"), resumed)
        self._announce(resumed)
        watchdog = Watchdog(comm, cfg["watchdog_seconds"])
        previous = {sig: signal.signal(sig, _record_stop_signal) for sig in STOP_SIGNALS}
        started, samples_done, stopped = time.perf_counter(), 0, False
        try:
            while self.epoch < cfg["epochs"] and self.step < self.total_steps and not stopped:
                self.sampler.set_epoch(self.epoch)
                # samples trained by this process: a resumed epoch's earlier part took no time here
                epoch_started, counted_before = time.perf_counter(), self.epoch_count
                for group in self._groups():
                    samples_done += sum(count for _, count in group)
                    watchdog.step_started(self.step + 1)
                    stop = self._train_step(group)
                    watchdog.step_finished()
                    if stop:
                        stopped = True
                        break
                    # on an epoch's last step, save after the epoch ends (below): a checkpoint taken before
                    # would make a resumed run write that epoch's eval and epoch records a second time
                    if self.ckpt_cfg["every_steps"] and self.step % self.ckpt_cfg["every_steps"] == 0 and \
                            self.sampler.consumed < self.sampler.epoch_end(cfg["batch_size"]):
                        self._save(watchdog)
                    if cfg["eval_every"] and self.step % cfg["eval_every"] == 0:
                        self._evaluate_and_log(watchdog)
                    if self.step >= self.total_steps:
                        break
                if stopped:
                    break
                if self.sampler.consumed >= self.sampler.epoch_end(cfg["batch_size"]):
                    self._end_epoch(time.perf_counter() - epoch_started, watchdog, self.epoch_count - counted_before)
                    if (self.ckpt_cfg["every_epochs"] and self.epoch % self.ckpt_cfg["every_epochs"] == 0) or \
                            (self.ckpt_cfg["every_steps"] and self.step % self.ckpt_cfg["every_steps"] == 0):
                        self._save(watchdog)
            if stopped:
                self._save(watchdog)
                _forget_stop_signal()
                self.progress.line(f"received {self.stop_signal_name}: saved checkpoint {self.last_checkpoint_path} "
                                   f"at step {self.step}; resume with: {self.resume_command}", always=True)
            else:
                if not self.last_eval or self.last_eval.get("step") != self.step:
                    self._evaluate_and_log(watchdog)
                if saving and self.last_checkpoint_step != self.step:
                    self._save(watchdog)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            watchdog.close()
            if self.metrics is not None:
                self.metrics.close()
        seconds = time.perf_counter() - started
        return {"steps": self.step, "epochs": self.epoch, "stopped": stopped, "seconds": seconds,
                "samples_per_s": samples_done / seconds if seconds > 0 else 0.0,
                "skipped_steps": self.skipped_steps, "optimizer_state_bytes": self.optimizer.state_bytes(),
                **self.last_eval}

    def _groups(self):
        """Lists of `accumulate` (indices, global_count) micro-batches: one list per optimizer step."""
        cfg = self.train_cfg
        if self.sampler.consumed >= self.sampler.epoch_end(cfg["batch_size"]):
            return
        batches = self.sampler.batches(cfg["batch_size"])
        while True:
            group = list(islice(batches, cfg["accumulate"]))
            if not group:
                return
            yield group

    def _train_step(self, group) -> bool:
        """COLLECTIVE. One optimizer step over `group`; returns True if a stop signal was agreed."""
        comm, step = self.comm, self.step + 1
        total = sum(count for _, count in group)
        loss_sum, local_count, failure = 0.0, 0, None
        t0 = time.perf_counter()
        try:
            for indices, _ in group:
                if self.faults.active:
                    self.faults.hit("data", step)
                if len(indices) == 0:
                    continue
                x, y = self.train_data[indices]
                if self.faults.active:
                    self.faults.hit("forward", step)
                loss = self.loss_fn(self.ddp(Tensor.wrap(x)), y)  # x is this step's own array: no copy
                if self.faults.active and self.faults.hit("nan", step):
                    loss = loss * float("nan")
                if self.faults.active:
                    self.faults.hit("sleep", step)
                    self.faults.hit("kill", step)  # mid-step: after forward, before backward and the sync
                    self.faults.hit("backward", step)
                # weight len/total: the summed gradient is that of the mean loss over the global batch
                loss.backward(np.float32(len(indices) / total))
                loss_sum += float(loss.data) * len(indices)
                local_count += len(indices)
        except Exception as error:  # carried to every rank through the stats allreduce below
            failure = f"{type(error).__name__}: {error}"
            comm.error(f"step {step} failed:\n{traceback.format_exc().rstrip()}")
        t1 = time.perf_counter()
        self.ddp.sync_gradients(grad_scale=1.0)  # every rank, even after a local failure
        grads_finite = math.isfinite(sum(float(np.sum(g)) for g in self.optimizer._grads()))
        # one allreduce carries the loss, a local failure, non-finite gradients and stop signals (by kind)
        stats = np.array([loss_sum, local_count, failure is not None, not grads_finite,
                          _stop_signal == signal.SIGTERM, _stop_signal == signal.SIGUSR1], dtype=np.float64)
        comm.allreduce(stats, "sum")
        t2 = time.perf_counter()
        if stats[2]:
            self._raise_agreed(failure, f"step {step} failed", TrainingError)
        loss = stats[0] / max(stats[1], 1)
        if not math.isfinite(loss) or stats[3]:
            self._nonfinite(step, loss, loss_sum)
        else:
            if self.train_cfg["clip_norm"]:
                self.optimizer.clip_grad_norm(self.train_cfg["clip_norm"])
            self.optimizer.step()
        self.optimizer.reset_grad()
        lr = self.optimizer.lr
        self.scheduler.step()
        t3 = time.perf_counter()
        self.step = step
        self.epoch_loss_sum += stats[0] if math.isfinite(stats[0]) else 0.0
        self.epoch_count += int(stats[1]) if math.isfinite(stats[0]) else 0  # a skipped NaN step adds neither
        self._log_step(loss, lr, total, t3 - t0, t1 - t0, (t2 - t1) + self.optimizer.last_gather_seconds,
                       self.optimizer.last_update_seconds)
        if self.train_cfg["check_replicas_every"] and step % self.train_cfg["check_replicas_every"] == 0:
            self.check_replicas()
        if stats[4] or stats[5]:
            self.stop_signal_name = "SIGTERM" if stats[4] else "SIGUSR1"
            return True
        return False

    def _nonfinite(self, step: int, loss: float, local_loss: float) -> None:
        """COLLECTIVE (on the agreed non-finite path). Skip the step, or raise NonFiniteError naming the
        first parameter (in layout order) whose combined gradient is not finite, and the ranks whose own
        loss was not finite."""
        if self.train_cfg["on_nonfinite"] == "skip":
            self.skipped_steps += 1
            self.progress.line(f"step {step}: non-finite loss or gradient, step skipped on all ranks "
                               f"({self.skipped_steps} so far)")
            return
        reports = self.comm.allgather_object((self.optimizer.first_nonfinite_index(), math.isfinite(local_loss)))
        indices = [index for index, _ in reports if index is not None]
        where = ""
        if indices:
            name = self.ddp.layout.segments(min(indices), min(indices) + 1)[0][0]
            where = f"; first parameter with a non-finite gradient: '{name}'"
        sources = [rank for rank, (_, finite) in enumerate(reports) if not finite]
        if sources:
            where += f" (non-finite loss on rank{'s' if len(sources) > 1 else ''} {', '.join(map(str, sources))})"
        raise NonFiniteError(f"non-finite loss or gradient at step {step} (global loss {loss}){where}. "
                             f"Lower the learning rate, clip gradients (training.clip_norm), or set "
                             f"training.on_nonfinite = \"skip\"")

    def _raise_agreed(self, local_message, what: str, kind) -> None:
        """COLLECTIVE (error path). Raise `kind` on every rank with the lowest failing rank's message."""
        messages = self.comm.allgather_object(local_message)
        rank, message = next((r, m) for r, m in enumerate(messages) if m)
        raise kind(f"{what} on rank {rank}: {message}")

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset=None) -> dict:
        """COLLECTIVE. Mean loss (and accuracy for classification) over `dataset` (default the test set).

        Rank r scores the r-th contiguous part of the data: every sample exactly once, no padding;
        (sum, count) pairs are summed across ranks.
        """
        dataset = dataset if dataset is not None else self.test_data
        if dataset is None:
            return {}
        comm, size = self.comm, len(dataset)
        for _, buffer in self.ddp.named_buffers():  # e.g. BatchNorm statistics: rank 0's are the model's
            if buffer.dtype == np.float32 and buffer.flags.c_contiguous:
                comm.broadcast(buffer, root=0)
        start, stop = split_evenly(size, comm.size, comm.rank)
        loss_sum = correct = count = 0.0
        failure = None
        self.ddp.train(False)
        try:
            with no_grad():
                for lo in range(start, stop, self.train_cfg["eval_batch_size"]):
                    x, y = dataset[np.arange(lo, min(lo + self.train_cfg["eval_batch_size"], stop))]
                    output = self.ddp(Tensor.wrap(x))
                    loss_sum += float(self.loss_fn(output, y).data) * len(x)
                    if self.task == "classification":
                        correct += float(np.sum(output.data.argmax(axis=1) == y))
                    count += len(x)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
            comm.error(f"evaluation failed:\n{traceback.format_exc().rstrip()}")
        finally:
            self.ddp.train(True)
        stats = comm.allreduce(np.array([loss_sum, correct, count, failure is not None]), "sum")
        if stats[3]:
            self._raise_agreed(failure, "evaluation failed", TrainingError)
        result = {"test_loss": float(stats[0] / max(stats[2], 1))}
        if self.task == "classification":
            result["test_accuracy"] = float(stats[1] / max(stats[2], 1))
        return result

    def _evaluate_and_log(self, watchdog) -> None:
        if self.test_data is None:
            return
        watchdog.step_started(f"{self.step} (evaluation)")
        result = self.evaluate()
        watchdog.step_finished()
        self.last_eval = {"step": self.step, **result}
        if self.metrics is not None:
            # the epoch (from 1, as printed) that this step belongs to, also after the epoch has ended
            epoch = (self.step - 1) // self.steps_per_epoch + 1 if self.step else 1
            self.metrics.write({"kind": "eval", "step": self.step, "epoch": epoch, **result})

    def check_replicas(self) -> None:
        """COLLECTIVE. Raise ReplicaMismatchError naming the first parameter whose bits differ across ranks."""
        sums = np.array([zlib.crc32(p.data.tobytes()) for p in self.ddp.flat.params], dtype=np.float64)
        bounds = self.comm.allreduce(np.concatenate([sums, -sums]), "max")
        differs = np.nonzero(bounds[:len(sums)] != -bounds[len(sums):])[0]
        if len(differs):
            name = self.ddp.flat.names[differs[0]]
            raise ReplicaMismatchError(f"parameter '{name}' differs across ranks at step {self.step} "
                                       f"(ranks must hold bit-identical parameters)")

    # ---------------------------------------------------------------------------- bookkeeping
    def _log_step(self, loss, lr, samples, seconds, compute, comm_seconds, update) -> None:
        cfg = self.train_cfg
        samples_per_s = samples / seconds if seconds > 0 else 0.0
        if self.metrics is not None and self.step % cfg["log_every"] == 0:
            self.metrics.write({"kind": "train", "step": self.step, "epoch": self.epoch + 1, "loss": loss, "lr": lr,
                                "samples_per_s": samples_per_s, "compute_s": compute, "comm_s": comm_seconds,
                                "optimizer_s": update, "step_s": seconds, "skipped_steps": self.skipped_steps})
        if self.progress.wants_line(self.step, cfg["log_every"]):
            self.progress.step(self.step, self.epoch, loss, samples_per_s, lr)

    def _end_epoch(self, seconds: float, watchdog, samples: int) -> None:
        train_loss = self.epoch_loss_sum / max(self.epoch_count, 1)
        if self.train_cfg["eval_every"] == 0:
            self._evaluate_and_log(watchdog)
        self.epoch += 1
        record = {"kind": "epoch", "step": self.step, "epoch": self.epoch, "train_loss": train_loss,
                  "samples_per_s": samples / seconds if seconds > 0 else 0.0, "seconds": seconds}
        text = f"epoch {self.epoch}/{self.train_cfg['epochs']}  train_loss {train_loss:.4f}"
        if self.last_eval.get("step") == self.step:
            text += f"  test_loss {self.last_eval['test_loss']:.4f}"
            if "test_accuracy" in self.last_eval:
                text += f"  test_acc {self.last_eval['test_accuracy']:.4f}"
        text += f"  {record['samples_per_s']:,.0f} samples/s  {seconds:.1f} s"
        self.progress.line(text, always=True)
        if self.metrics is not None:
            self.metrics.write(record)
        self.epoch_loss_sum, self.epoch_count = 0.0, 0

    def _announce(self, resumed_step) -> None:
        topo, cfg, opt = self.topology, self.train_cfg, self.opt_cfg
        params = self.ddp.layout.total
        mode = f"ZeRO-1 {opt['strategy']}" if opt["sharded"] else "replicated (allreduce)"
        mode += ", hierarchical (node, leaders, node)" if isinstance(self.comm, HierarchicalComm) else ""
        lines = [f"disttrain: world {self.comm.size} ({topo['nodes']} node(s) x {topo['local_size']} ranks on "
                 f"this node), {self.threads} BLAS thread(s) per rank ({self.threads_reason})",
                 f"model: {params:,} parameters; optimizer {opt['name']} lr {opt['lr']:g}, {mode}",
                 f"data: {len(self.train_data)} train / {len(self.test_data) if self.test_data is not None else 0} "
                 f"test samples, global batch {cfg['batch_size']}, {self.steps_per_epoch} steps/epoch, "
                 f"{self.total_steps} steps in all; run dir {self.run_dir}"]
        if resumed_step is not None:
            where = (f"epoch {self.epoch + 1}" if resumed_step < self.total_steps and self.epoch < cfg["epochs"]
                     else "the run is already complete: nothing to train")
            lines.append(f"resumed from {self.last_checkpoint_path} at step {resumed_step} ({where})")
        elif self.comm.rank == 0 and ckpt.list_checkpoints(self.checkpoint_dir):
            newest = ckpt.list_checkpoints(self.checkpoint_dir)[-1][0]
            lines.append(f"note: {self.checkpoint_dir} holds checkpoints of an earlier run (up to step {newest}); this "
                         f"run starts from the beginning, rewrites metrics.jsonl and replaces those checkpoints as it "
                         f"saves (to continue that run instead: --resume)")
        for line in lines:
            self.progress.line(line, always=True)

    # ------------------------------------------------------------------------------ checkpoints
    def _checkpoint_bytes(self) -> int:
        elements = self.ddp.layout.padded_total
        return elements * 4 * 4 + (1 << 20)  # parameters + up to three state arrays, plus metadata

    def _save(self, watchdog) -> None:
        watchdog.step_started(f"{self.step} (checkpoint)")
        extra = {"epoch": self.epoch, "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "epoch_loss_sum": self.epoch_loss_sum, "epoch_count": self.epoch_count,
                 "skipped_steps": self.skipped_steps, "config": self.config,
                 "rng_state": nn.default_rng().bit_generator.state}
        fault = self.faults.hit if self.faults.active else None
        self.last_checkpoint_path = ckpt.save(self.checkpoint_dir, self.step, self.ddp, self.optimizer, self.comm,
                                              extra, keep=self.ckpt_cfg["keep"],
                                              fault=(lambda point: fault(point, self.step)) if fault else None)
        self.last_checkpoint_step = self.step
        watchdog.step_finished()

    def _resume(self, resume) -> int | None:
        path = self.checkpoint_dir if resume is True else str(resume)
        info = ckpt.load(path, self.ddp, self.optimizer, self.comm, warn=lambda m: self.progress.line(m, always=True))
        if info is None:
            if resume is not True:  # a path the user named must hold what they asked for
                raise ckpt.CheckpointError(f"resume path {path!r} holds no checkpoint (expected step-XXXXXXXX "
                                           f"directories or a `latest` pointer)")
            self.progress.line(f"no checkpoint in {path} yet: starting from the beginning", always=True)
            return None
        extra = info["extra"]
        self.step, self.epoch = info["step"], extra["epoch"]
        self.sampler.load_state_dict(extra["sampler"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.epoch_loss_sum, self.epoch_count = extra["epoch_loss_sum"], extra["epoch_count"]
        self.skipped_steps = extra.get("skipped_steps", 0)
        if info["rng_state"] is not None:
            nn.default_rng().bit_generator.state = info["rng_state"]
        self.last_checkpoint_path, self.last_checkpoint_step = info["path"], self.step
        return self.step


def fit(model, train_data, loss_fn, test_data=None, **settings) -> dict:
    """Trainer(model, train_data, loss_fn, test_data, **settings).fit(); COLLECTIVE."""
    resume = settings.pop("resume", None)
    return Trainer(model, train_data, loss_fn, test_data, **settings).fit(resume)


def _guess_task(dataset) -> str:
    labels = getattr(dataset, "labels", None)
    return "regression" if labels is not None and np.asarray(labels[:1]).dtype.kind == "f" else "classification"


def _hyperparameters(section: dict) -> dict:
    if section["name"] == "sgd":
        return {"lr": section["lr"], "momentum": section["momentum"], "weight_decay": section["weight_decay"]}
    return {"lr": section["lr"], "beta1": section["beta1"], "beta2": section["beta2"], "eps": section["eps"],
            "weight_decay": section["weight_decay"]}


def _scheduler(optimizer, cfg: dict, total_steps: int):
    if cfg["schedule"] == "cosine":
        return CosineLR(optimizer, max(total_steps, 1), min(cfg["warmup_steps"], max(total_steps, 1)), cfg["min_lr"])
    if cfg["schedule"] == "step":
        return StepLR(optimizer, cfg["step_size"], cfg["gamma"])
    return ConstantLR(optimizer)
