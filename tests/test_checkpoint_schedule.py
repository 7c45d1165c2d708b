"""When the Trainer checkpoints: every `checkpoint.every_steps` steps, each due checkpoint written
once; on a step that ends an epoch, after that epoch is closed (its evaluation and epoch record
written), so that a run resumed from that checkpoint never writes them a second time."""

import numpy as np

from disttrain import nn
from disttrain.data import ArrayDataset
from disttrain.distributed import SingleProcessComm
from disttrain.trainer import Trainer
from disttrain.training import persistence


def test_a_checkpoint_due_on_an_epochs_last_step_is_written_once_after_the_epoch_closes(tmp_path, monkeypatch):
    saves, save = [], persistence.save

    def recorded(directory, parts, state, *args, **kwargs):
        saves.append((state.step, state.epoch))
        return save(directory, parts, state, *args, **kwargs)
    monkeypatch.setattr(persistence, "save", recorded)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.standard_normal((60, 4)).astype(np.float32), rng.integers(0, 3, 60))
    nn.manual_seed(0)
    trainer = Trainer(nn.Sequential(nn.Linear(4, 3)), data, nn.SoftmaxLoss(), comm=SingleProcessComm(),
                      optimizer={"lr": 0.01},
                      training={"epochs": 2, "batch_size": 10, "shuffle": False, "progress": "none",
                                "run_dir": str(tmp_path)},
                      checkpoint={"every_steps": 3, "every_epochs": 0})
    trainer.fit()
    per_epoch = trainer.steps_per_epoch
    assert per_epoch % 3 == 0 and trainer.step == 2 * per_epoch  # every epoch ends on a due step
    # (step, epochs completed when it was saved): an epoch's last step counts its epoch as done
    assert saves == [(step, step // per_epoch) for step in range(3, trainer.step + 1, 3)]
