"""The training loop. A user writes only a model, a dataset and a loss:

    Trainer(model, train_data, loss_fn, test_data, optimizer={"name": "adam", "lr": 1e-3},
            training={"epochs": 5, "batch_size": 64, "run_dir": "runs/mine"}).fit()

`fit()` reads top to bottom: start (disk check, resume, banner), epochs of steps, finish (final
evaluation and checkpoint, or the checkpoint a stop signal asked for). Whether to checkpoint is decided
in one place, `_save_due`. Building the machinery is build.py's; a step's agreement step_stats.py's;
evaluation evaluation.py's; what a checkpoint holds beside the model persistence.py's.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from itertools import islice

import numpy as np

from .. import checkpoint as ckpt
from .. import config as config_module
from ..distributed import init
from ..distributed.watchdog import Watchdog
from ..faults import Faults
from ..progress import Progress, epoch_summary, eval_line, run_banner, step_record
from ..tensor import Tensor
from . import agreement, evaluation, persistence, run_lock, signals
from .build import build_parts
from .state import TrainState
from .step_stats import NonFiniteError, StepStats, raise_agreed


class Trainer:
    """Owns the loop for `model` on `train_data` (an ArrayDataset-like: len() and [indices] -> (x, y)).

    `loss_fn(output, labels)` returns the mean loss of a batch as a scalar Tensor. `optimizer`,
    `training` and `checkpoint` are dicts of the config sections of the same names (see `disttrain
    config` or disttrain.config.SCHEMA); `config` may carry the whole config to record in checkpoints;
    `resume_command` is what the stop message tells the user to run. Constructing a Trainer is
    COLLECTIVE (it wraps the model in DataParallel); so are fit(), evaluate() and check_replicas().
    """

    def __init__(self, model, train_data, loss_fn, test_data=None, comm=None, optimizer=None, training=None,
                 checkpoint=None, config: dict | None = None, task: str | None = None,
                 resume_command: str | None = None):
        settings = config_module.validate({"optimizer": optimizer or {}, "training": training or {},
                                           "checkpoint": checkpoint or {}}, "Trainer settings")
        config_module.check_consistency(settings)
        self.config = dict(config or {}, **{k: settings[k] for k in ("optimizer", "training", "checkpoint")})
        self.opt_cfg, self.train_cfg, self.ckpt_cfg = settings["optimizer"], settings["training"], settings["checkpoint"]
        self.model, self.loss_fn, self.train_data, self.test_data = model, loss_fn, train_data, test_data
        self.task = task or _guess_task(train_data)
        comm = comm or init()
        # before anything that could make the ranks' collectives differ (a batch size, a step count)
        agreement.check_agreement(comm, agreement.run_facts(self.config, train_data, test_data))
        self.parts = build_parts(model, train_data, comm, self.opt_cfg, self.train_cfg)
        self.comm, self.ddp, self.optimizer = self.parts.comm, self.parts.ddp, self.parts.optimizer
        self.sampler, self.scheduler, self.topology = self.parts.sampler, self.parts.scheduler, self.parts.topology
        self.total_steps, self.steps_per_epoch = self.parts.total_steps, self.parts.steps_per_epoch
        self.state = TrainState()
        self.run_dir = self.train_cfg["run_dir"]
        self.checkpoint_dir = self.ckpt_cfg["dir"] or os.path.join(self.run_dir, "checkpoints")
        self.faults = Faults(self.comm.rank)
        self.progress = Progress(self.total_steps, self.comm.rank == 0, self.train_cfg["progress"])
        self.resume_command = resume_command or "Trainer.fit(resume=True) with the same settings"
        self.last_checkpoint_step = self.last_checkpoint_path = None
        self.last_eval, self.metrics, self.watchdog, self.resume_notes = {}, None, None, []

    @property
    def step(self) -> int:
        """Optimizer steps done so far."""
        return self.state.step

    # ------------------------------------------------------------------------------------- the loop
    def fit(self, resume: str | bool | None = None) -> dict:
        """COLLECTIVE. Train to the end (or to a stop signal); returns a summary dict.

        `resume`: True (or checkpoint.resume) continues from the newest good checkpoint in the
        checkpoint directory if there is one; a path continues from that checkpoint (or directory),
        which must hold one. The run and checkpoint directories are locked for this run while it
        lasts (run_lock.py): a second training into them raises RunDirLockedError.
        """
        lock = run_lock.acquire(self.comm, [("run dir", self.run_dir), ("checkpoint directory", self.checkpoint_dir)],
                                lambda line: self.progress.line(line, always=True))
        try:
            return self._fit(resume)
        finally:
            lock.release()

    def _fit(self, resume) -> dict:
        # --- start: the disk must take a checkpoint; continue a saved run if asked; say what runs
        resume = self.ckpt_cfg["resume"] if resume is None else resume
        ckpt.probe(self.checkpoint_dir, self.comm, persistence.checkpoint_bytes(self.parts, self.config))
        resumed = self._resume(resume) if resume else None
        self.metrics = persistence.open_metrics(self.comm, os.path.join(self.run_dir, "metrics.jsonl"), resumed)
        self._announce(resumed)
        first_step, first_skipped = self.state.step, self.state.skipped_steps
        handlers = signals.catch_stop_signals(abort=self.comm.abort if self.comm.size > 1 else None)
        self.watchdog = Watchdog(self.comm, self.train_cfg["watchdog_seconds"], signals=signals)
        started, samples_done, stop = time.perf_counter(), 0, None
        try:
            # --- train: epoch after epoch of optimizer steps, until the last step or an agreed stop signal
            while stop is None and self.state.epoch < self.train_cfg["epochs"] and self.state.step < self.total_steps:
                self.sampler.set_epoch(self.state.epoch)
                # samples trained by this process: a resumed epoch's earlier part took no time here
                epoch_started, counted_before = time.perf_counter(), self.state.epoch_count
                for group in self._step_groups():
                    samples_done += sum(count for _, count in group)
                    stop = self._train_step(group)
                    if stop is not None:
                        break
                    if self._save_due("step"):
                        self._save()
                    if self.train_cfg["eval_every"] and self.state.step % self.train_cfg["eval_every"] == 0:
                        self._evaluate_and_log()
                        if self.last_eval.get("step") == self.state.step:
                            self.progress.line(eval_line(self.last_eval))
                    if self.state.step >= self.total_steps:
                        break
                if stop is None and self._epoch_complete():
                    self._end_epoch(time.perf_counter() - epoch_started, self.state.epoch_count - counted_before)
                    if self._save_due("epoch"):
                        self._save()
            # --- finish: a stopped run saves and says how to resume; a finished one evaluates and saves
            if stop is not None:
                self._save()
                signals.forget()
                self.progress.line(f"received {stop}: saved checkpoint {self.last_checkpoint_path} at step "
                                   f"{self.state.step}; resume with: {self.resume_command}", always=True)
            else:
                persistence.refuse_all_skipped(self.state.step - first_step, self.state.skipped_steps - first_skipped)
                if self.last_eval.get("step") != self.state.step:
                    self._evaluate_and_log()
                if self._save_due("end"):
                    self._save()
            persistence.agree_metrics_written(self.comm, self.metrics)
        finally:
            self.ddp.wait_for_parameters()
            signals.restore(handlers)
            self.watchdog.close()
            if self.metrics is not None:
                self.metrics.close()
        seconds = time.perf_counter() - started
        return {"steps": self.state.step, "epochs": self.state.epoch, "stopped": stop is not None, "stop_signal": stop,
                "seconds": seconds, "samples_per_s": samples_done / seconds if seconds > 0 else 0.0,
                "skipped_steps": self.state.skipped_steps, "optimizer_state_bytes": self.optimizer.state_bytes(),
                **self.last_eval}

    def _save_due(self, moment: str) -> bool:
        """Whether to checkpoint now: after a step inside an epoch ("step"), after an epoch ended
        ("epoch"), or at the end of training ("end"). A step that ends an epoch saves after the epoch's
        records: a checkpoint taken before them would make a resumed run write them a second time."""
        every_steps, every_epochs = self.ckpt_cfg["every_steps"], self.ckpt_cfg["every_epochs"]
        on_step = bool(every_steps) and self.state.step % every_steps == 0
        if moment == "step":
            return on_step and not self._epoch_complete()
        if moment == "epoch":
            return on_step or (bool(every_epochs) and self.state.epoch % every_epochs == 0)
        return bool(every_steps or every_epochs) and self.last_checkpoint_step != self.state.step

    def _epoch_complete(self) -> bool:
        return self.sampler.consumed >= self.sampler.epoch_end(self.train_cfg["batch_size"])

    def _step_groups(self):
        """Lists of `accumulate` (indices, global_count) micro-batches: one list per optimizer step."""
        if self._epoch_complete():
            return
        batches = self.sampler.batches(self.train_cfg["batch_size"])
        while True:
            group = list(islice(batches, self.train_cfg["accumulate"]))
            if not group:
                return
            yield group

    # ------------------------------------------------------------------------------------- one step
    def _train_step(self, group) -> str | None:
        """COLLECTIVE. One optimizer step over the micro-batches in `group`; returns the name of the
        stop signal every rank agreed to act on after it, or None."""
        step = self.state.step + 1
        self.watchdog.step_started(step)
        t0 = time.perf_counter()
        local, failure = self._forward_backward(group, step)
        if self.metrics is not None and self.metrics.error:  # rank 0 could not write its last record
            local.failed, failure = 1, self.metrics.error
        t1 = time.perf_counter()
        self.ddp.sync_gradients(grad_scale=1.0)  # every rank, even after a local failure
        local.nonfinite_grads = int(self.optimizer.first_nonfinite_index() is not None)
        pending = signals.pending()
        local.sigterm, local.sigusr1, local.sigint = (int(pending == sig) for sig in signals.STOP_SIGNALS)
        stats = local.agree(self.comm)
        t2 = time.perf_counter()
        if stats.failed:
            raise_agreed(self.comm, failure, f"step {step} failed")
        skipped = not math.isfinite(stats.mean_loss) or stats.nonfinite_grads > 0
        if skipped:
            self._nonfinite(step, stats.mean_loss, local.loss_sum)
        else:
            if self.train_cfg["clip_norm"]:
                self.optimizer.clip_grad_norm(self.train_cfg["clip_norm"])
            self.optimizer.step()
        self.optimizer.reset_grad()
        lr = self.optimizer.lr
        self.scheduler.step()
        t3 = time.perf_counter()
        self.state.add_step(stats.loss_sum, stats.count, skipped)
        timing = {"step_s": t3 - t0, "compute_s": t1 - t0, "comm_s": t2 - t1 + self.optimizer.last_gather_seconds,
                  "optimizer_s": self.optimizer.last_update_seconds}
        self.after_step(step_record(step, self.state.epoch + 1, stats.mean_loss, lr,
                                    sum(count for _, count in group), timing, self.state.skipped_steps))
        if self.train_cfg["check_replicas_every"] and step % self.train_cfg["check_replicas_every"] == 0:
            self.check_replicas()
        self.watchdog.step_finished()
        return stats.stop_signal

    def _forward_backward(self, group, step: int) -> tuple:
        """Forward and backward of this rank's part of each micro-batch; (StepStats, failure message).
        Gradients are weighted len/global count, so their sum is that of the global batch's mean loss.
        An exception is caught and reported in the stats, to be agreed on by every rank."""
        total = sum(count for _, count in group)
        stats, failure, faults = StepStats(), None, self.faults if self.faults.active else None
        try:
            for position, (indices, _) in enumerate(group):
                if faults:
                    faults.hit("data", step)
                if len(indices) == 0:
                    continue
                x, y = self.train_data[indices]
                if faults:
                    faults.hit("forward", step)
                # all but the last micro-batch only accumulate: the gradient sync happens once per step
                last = position == len(group) - 1
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    loss = self.loss_fn(self.ddp(Tensor.wrap(x)), y)  # x is this step's own array: no copy
                    if faults and faults.hit("nan", step):
                        loss = loss * float("nan")
                    if faults:
                        for point in ("sleep", "kill", "backward"):  # mid-step: before backward and the sync
                            faults.hit(point, step)
                    loss.backward(np.float32(len(indices) / total))
                stats.loss_sum += float(loss.data) * len(indices)
                stats.count += len(indices)
        except Exception as error:
            failure, stats.failed = f"{type(error).__name__}: {error}", 1
            self.comm.error(f"step {step} failed:\n{traceback.format_exc().rstrip()}")
        return stats, failure

    def _nonfinite(self, step: int, loss: float, local_loss: float) -> None:
        """COLLECTIVE (on the agreed non-finite path). Skip the step (training.on_nonfinite = "skip"),
        or raise NonFiniteError naming the first parameter (in layout order) whose combined gradient
        is not finite, and the ranks whose own loss was not finite."""
        if self.train_cfg["on_nonfinite"] == "skip":
            self.progress.line(f"step {step}: non-finite loss or gradient, step skipped on all ranks "
                               f"({self.state.skipped_steps + 1} so far)")
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

    def after_step(self, record: dict) -> None:
        """Called on every rank after each optimizer step with its metrics record (progress.step_record):
        rank 0 writes it to metrics.jsonl and shows progress. Subclasses may extend it."""
        step = record["step"]
        if self.metrics is not None and step % self.train_cfg["log_every"] == 0:
            self.metrics.write(record)
        if self.progress.wants_line(step, self.train_cfg["log_every"]):
            self.progress.step(step, self.state.epoch, record["loss"], record["samples_per_s"], record["lr"])

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset=None) -> dict:
        """COLLECTIVE. Mean loss (and accuracy for classification) over `dataset` (default the test
        set; {} if there is none), every sample exactly once across ranks (evaluation.evaluate)."""
        dataset = dataset if dataset is not None else self.test_data
        if dataset is None:
            return {}
        return evaluation.evaluate(self.ddp, dataset, self.loss_fn, self.comm, self.task,
                                   self.train_cfg["eval_batch_size"])

    def check_replicas(self) -> None:
        """COLLECTIVE. Raise ReplicaMismatchError naming the first parameter whose bits differ across ranks."""
        evaluation.check_replicas(self.ddp, self.comm, self.state.step)

    def _evaluate_and_log(self) -> None:
        if self.test_data is None:
            return
        self.watchdog.step_started(f"{self.state.step} (evaluation)")
        result = self.evaluate()
        self.watchdog.step_finished()
        self.last_eval = {"step": self.state.step, **result}
        if self.metrics is not None:
            # the epoch (from 1, as printed) that this step belongs to, also after the epoch has ended
            epoch = (self.state.step - 1) // self.steps_per_epoch + 1 if self.state.step else 1
            self.metrics.write({"kind": "eval", "step": self.state.step, "epoch": epoch, **result})

    def _end_epoch(self, seconds: float, samples: int) -> None:
        if self.train_cfg["eval_every"] == 0:
            self._evaluate_and_log()
        train_loss = self.state.end_epoch()
        record, text = epoch_summary(self.state.epoch, self.train_cfg["epochs"], train_loss, self.state.step,
                                     samples, seconds, self.last_eval)
        self.progress.line(text, always=True)
        if self.metrics is not None:
            self.metrics.write(record)

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        self.watchdog.step_started(f"{self.state.step} (checkpoint)")
        fault = self.faults.hit if self.faults.active else None
        self.last_checkpoint_path = persistence.save(
            self.checkpoint_dir, self.parts, self.state, self.config, self.ckpt_cfg["keep"],
            fault=(lambda point: fault(point, self.state.step)) if fault else None)
        self.last_checkpoint_step = self.state.step
        self.watchdog.step_finished()

    def _resume(self, resume) -> int | None:
        path = self.checkpoint_dir if resume is True else str(resume)
        info = persistence.resume(path, self.parts, self.state, must_exist=resume is not True,
                                  warn=lambda message: self.progress.line(message, always=True), config=self.config)
        if info is None:
            self.progress.line(f"no checkpoint in {path} yet: starting from the beginning", always=True)
            return None
        self.resume_notes = info["notes"]
        self.last_checkpoint_path, self.last_checkpoint_step = info["path"], self.state.step
        return self.state.step

    def _announce(self, resumed_step) -> None:
        test_size = len(self.test_data) if self.test_data is not None else 0
        lines = run_banner(self.parts, self.opt_cfg, self.train_cfg, len(self.train_data), test_size)
        if resumed_step is not None:
            where = (f"epoch {self.state.epoch + 1}"
                     if resumed_step < self.total_steps and self.state.epoch < self.train_cfg["epochs"]
                     else "the run is already complete: nothing to train")
            lines.append(f"resumed from {self.last_checkpoint_path} at step {resumed_step} ({where})")
            lines += self.resume_notes
        elif self.comm.rank == 0 and ckpt.list_checkpoints(self.checkpoint_dir):
            newest = ckpt.list_checkpoints(self.checkpoint_dir)[-1][0]
            lines.append(f"note: {self.checkpoint_dir} holds checkpoints of an earlier run (up to step {newest}); this "
                         f"run starts from the beginning, rewrites metrics.jsonl and replaces those checkpoints as it "
                         f"saves (to continue that run instead: --resume)")
        for line in lines:
            self.progress.line(line, always=True)


def fit(model, train_data, loss_fn, test_data=None, **settings) -> dict:
    """Trainer(model, train_data, loss_fn, test_data, **settings).fit(); COLLECTIVE."""
    resume = settings.pop("resume", None)
    return Trainer(model, train_data, loss_fn, test_data, **settings).fit(resume)


def _guess_task(dataset) -> str:
    """The data set's own `task` if it names one (text windows: "language_model"), else "regression"
    for float labels and "classification" otherwise."""
    if getattr(dataset, "task", None):
        return dataset.task
    labels = getattr(dataset, "labels", None)
    return "regression" if labels is not None and np.asarray(labels[:1]).dtype.kind == "f" else "classification"
