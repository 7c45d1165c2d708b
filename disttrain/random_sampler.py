"""RandomSampler: uniformly random samples with replacement (random text windows), split across ranks
so that N ranks see exactly the global batches one process sees.

An epoch here is `samples_per_epoch` draws (for the text data set: as many windows as it takes to cover
the training text once, ceil(bytes / block_size)); its k-th draw is the sample
draw k of the splitmix64 sequence keyed by (seed, epoch), mod dataset_len. The draw at any position is computed directly, in
O(batch) per batch, with no per-epoch array, so a run resumes at the exact draw after a checkpoint,
on any world size and batch size. Global batch b of size B is draws [b B, (b + 1) B) (the last may be
shorter); rank r takes the r-th contiguous part of it (sizes differ by at most one), as
DistributedSampler does, and the trainer can use either: the same num_batches, batches, set_epoch,
consumed, epoch_end, state_dict and load_state_dict.
"""

from __future__ import annotations

import numpy as np

from .data import split_evenly

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(key, positions: np.ndarray) -> np.ndarray:
    """The splitmix64 sequence started at uint64 `key`, at uint64 `positions` (its draws are
    independent of one another and can be computed in any order); arithmetic wraps modulo 2^64."""
    z = key + (positions + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


class RandomSampler:
    """Which samples (indices into a data set of `dataset_len`) this rank uses, global batch by global batch.

    Every rank computes the same draws from (seed, epoch). `batches(B)` yields, for each global batch
    of B consecutive draws of the epoch (the last may be shorter), this rank's contiguous part of it
    and the batch's global size. Each `batches()` call starts the epoch at its first draw, except the
    first call after `load_state_dict()`, which continues at the saved draw; `set_epoch()` to another
    epoch cancels that. `consumed` counts the draws of the epoch handed out so far.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 samples_per_epoch: int | None = None):
        for name, value, low in (("dataset_len", dataset_len, 1), ("num_replicas", num_replicas, 1),
                                 ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        samples_per_epoch = dataset_len if samples_per_epoch is None else samples_per_epoch
        if isinstance(samples_per_epoch, bool) or not isinstance(samples_per_epoch, (int, np.integer)) \
                or samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be a positive integer, got {samples_per_epoch!r}")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.seed, self.samples_per_epoch = int(seed), int(samples_per_epoch)
        self.epoch = 0
        self.consumed = 0
        self._resuming = False

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (new draws) from its beginning; the same epoch again changes nothing."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._resuming = int(epoch), 0, False

    def draws(self, start: int, stop: int) -> np.ndarray:
        """Sample indices of draws [start, stop) of the current epoch (int64, identical on every rank)."""
        key = np.random.SeedSequence((self.seed, self.epoch)).generate_state(1, np.uint64)[0]
        values = splitmix64(key, np.arange(start, stop, dtype=np.uint64))
        return (values % np.uint64(self.dataset_len)).astype(np.int64)

    def num_batches(self, batch_size: int) -> int:
        """Global batches per epoch for global batch size `batch_size`."""
        return -(-self.samples_per_epoch // batch_size)

    def epoch_end(self, batch_size: int) -> int:
        """Draws an epoch uses (all of them: the last batch may be shorter)."""
        return self.samples_per_epoch

    def batches(self, batch_size: int):
        """Yield (this rank's sample indices, global_count) per global batch of the current epoch, from
        its start (or, right after load_state_dict, from the loaded draw)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._batches(int(batch_size))

    def _batches(self, batch_size: int):
        if not self._resuming:
            self.consumed = 0
        self._resuming = False
        while self.consumed < self.samples_per_epoch:
            lo = self.consumed
            hi = min(lo + batch_size, self.samples_per_epoch)
            start, stop = split_evenly(hi - lo, self.num_replicas, self.rank)
            self.consumed = hi
            yield self.draws(lo + start, lo + stop), hi - lo

    def __len__(self) -> int:
        """Draws of one epoch that are this rank's when the epoch is taken as one batch."""
        start, stop = split_evenly(self.samples_per_epoch, self.num_replicas, self.rank)
        return stop - start

    def __iter__(self):
        start, stop = split_evenly(self.samples_per_epoch, self.num_replicas, self.rank)
        return iter(self.draws(start, stop).tolist())

    def state_dict(self) -> dict:
        return {"kind": "random", "epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "dataset_len": self.dataset_len, "samples_per_epoch": self.samples_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved draw (the next `batches()` starts there). The data set and epoch length
        must match: the draws would otherwise mean other samples."""
        for key in ("dataset_len", "samples_per_epoch"):
            if int(state.get(key, -1)) != getattr(self, key):
                raise ValueError(f"sampler state is for {key} = {state.get(key)}, this sampler has "
                                 f"{getattr(self, key)} (a different data set or block size)")
        self.epoch, self.consumed, self.seed = int(state["epoch"]), int(state["consumed"]), int(state["seed"])
        self._resuming = True
