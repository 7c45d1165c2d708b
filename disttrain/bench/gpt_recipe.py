"""What both sides of the GPT benchmark train: the model sizes, the initial weights, the recipe and the
data order, identical for disttrain and PyTorch.

The model is the byte-level GPT of disttrain/transformer.py (4 layers, 4 heads, width 128, context
128, tied embeddings: 842,496 parameters); its initial weights come from disttrain's initialiser with
`seed` and are copied into the PyTorch twin. The recipe is AdamW (lr 1e-3, weight decay 0.1 on every
parameter, betas 0.9/0.999, eps 1e-8), global batch 32 windows. The data is the text data set's
default corpus, the .py files of this Python's standard library (first 90% train, last 10%
validation); global batch s holds the RandomSampler's draws (seed `seed`) of step s, and rank r of N
takes the r-th contiguous part of it, as the library's samplers do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Recipe:
    """Model sizes, optimizer and batch of the benchmark."""

    vocab: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0

    def model_sizes(self) -> dict:
        return {"vocab": self.vocab, "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                "block_size": self.block_size}

    def to_dict(self) -> dict:
        return asdict(self)


def initial_state(recipe: Recipe) -> dict:
    """{parameter name: float32 array}: disttrain's GPT initialised from recipe.seed."""
    from ..transformer import GPT
    return GPT(**recipe.model_sizes(), rng=np.random.default_rng(recipe.seed)).state_dict()


def text_data(recipe: Recipe):
    """(train, validation) TextWindows of the standard library corpus, windows of block_size."""
    from ..config import load_config
    from ..datasets import load_data

    section = load_config(None, ['data.name="text"'])["data"]
    train, validation, _ = load_data(section, None, recipe.block_size)
    return train, validation


def rank_batches(train, recipe: Recipe, ranks: int, rank: int):
    """This rank's (x, y) int64 arrays of every global batch in order, across epochs, without end."""
    sampler = train.sampler(ranks, rank, recipe.seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for indices, _ in sampler.batches(recipe.batch):
            yield train[indices]
        epoch += 1
