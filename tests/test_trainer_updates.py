"""The trainer's updates in one process equal a hand-written loop over the same batches.

The hand-written loop is the definition: per optimizer step, the mean loss over the step's samples
(all micro-batches of a gradient-accumulation group together, so an uneven last group is weighted by
sample, not by micro-batch), one backward, `disttrain.optim.clip_grad_norm` when clipping is on, one
optimizer step. Data is not shuffled, so both see the samples in order. The multi-rank equivalence of
the trainer with itself on one process is test_equivalence.py; this file pins the single-process
trainer to the loop, so an option the trainer silently ignored (clip_norm, accumulate) shows.
"""

import numpy as np
import pytest

from disttrain import Tensor, nn
from disttrain.data import ArrayDataset
from disttrain.distributed import SingleProcessComm
from disttrain.optim import SGD, Adam, clip_grad_norm
from disttrain.trainer import fit

SAMPLES, FEATURES, CLASSES = 60, 6, 4


def _model():
    nn.manual_seed(8)
    return nn.Sequential(nn.Linear(FEATURES, 12), nn.Tanh(), nn.Linear(12, CLASSES))


def _data():
    rng = np.random.default_rng(3)
    return rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, SAMPLES)


def _trained_by_fit(tmp_path, optimizer, **training):
    model = _model()
    summary = fit(model, ArrayDataset(*_data()), nn.SoftmaxLoss(), comm=SingleProcessComm(), optimizer=optimizer,
                  training={"epochs": 1, "shuffle": False, "progress": "none", "run_dir": str(tmp_path),
                            **training},
                  checkpoint={"every_epochs": 0})
    return model, summary


def _trained_by_hand(optimizer, samples_per_step, clip_norm=0.0):
    """(model, gradient norms before clipping) after one pass in steps of `samples_per_step` samples."""
    model = _model()
    x, y = _data()
    norms = []
    for lo in range(0, SAMPLES, samples_per_step):
        rows = slice(lo, min(lo + samples_per_step, SAMPLES))
        nn.SoftmaxLoss()(model(Tensor(x[rows])), y[rows]).backward()
        if clip_norm:
            norms.append(clip_grad_norm(model.parameters(), clip_norm))
        optimizer(model).step()
        for p in model.parameters():
            p.grad = None
    return model, norms


def _assert_same_parameters(model, reference):
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6, err_msg=name)


def _persistent(optimizer_class, **hyper):
    """optimizer(model) -> one optimizer per model, kept across steps (its state persists)."""
    made = {}
    return lambda model: made.setdefault(id(model), optimizer_class(model.parameters(), **hyper))


def test_clip_norm_clips_each_steps_gradient_as_clip_grad_norm_does(tmp_path):
    model, summary = _trained_by_fit(tmp_path, {"name": "sgd", "lr": 0.5, "momentum": 0.5},
                                     batch_size=16, clip_norm=0.05)
    reference, norms = _trained_by_hand(_persistent(SGD, lr=0.5, momentum=0.5), 16, clip_norm=0.05)
    assert summary["steps"] == len(norms) == 4
    assert min(norms) > 0.1  # clipping is active at every step
    _assert_same_parameters(model, reference)


@pytest.mark.parametrize("batch_size,accumulate", [(8, 2), (5, 3)])
def test_accumulated_micro_batches_make_one_step_over_their_mean_loss(tmp_path, batch_size, accumulate):
    # 60 samples: (8, 2) ends with a group of 8 + 4 samples, (5, 3) with equal groups of 15
    model, summary = _trained_by_fit(tmp_path, {"name": "adam", "lr": 0.01}, batch_size=batch_size,
                                     accumulate=accumulate)
    reference, _ = _trained_by_hand(_persistent(Adam, lr=0.01), batch_size * accumulate)
    assert summary["steps"] == -(-SAMPLES // (batch_size * accumulate))
    _assert_same_parameters(model, reference)
