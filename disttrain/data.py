"""Datasets, the DistributedSampler that cuts every global batch into per-rank parts, and DataLoader.

A global batch is the same set of samples on every rank, and the same set a single process with the
same global batch size would use; rank r takes the r-th contiguous part of it (sizes differ by at most
one). Every rank therefore runs the same number of steps per epoch, and an uneven last batch is handled
by weighting gradients with local_count / global_count, not by dropping or repeating samples.
"""

from __future__ import annotations

import numpy as np


class ArrayDataset:
    """Features (n, ...) and labels (n, ...) held as numpy arrays or memory maps.

    Python lists (or other sequences) are turned into numpy arrays (float64 into float32).
    Indexing with an array of sample indices returns (features as float32, times `scale` if given,
    labels) for those rows only: a memory-mapped file is read only where it is indexed. `rows`, if
    given, maps this dataset's indices to rows of the arrays (a train or test split without copying).
    """

    def __init__(self, features, labels, name: str = "dataset", scale: float | None = None, rows=None):
        features, labels = _as_array(features, "features"), _as_array(labels, "labels")
        if len(features) != len(labels):
            raise ValueError(f"{name}: features have {len(features)} rows but labels have {len(labels)}")
        self.features, self.labels, self.name, self.scale = features, labels, name, scale
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.features) if self.rows is None else len(self.rows)

    def __getitem__(self, indices):
        if self.rows is not None:
            indices = self.rows[indices]
        x = np.asarray(self.features[indices])
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if self.scale is not None:
            x = x * np.float32(self.scale)  # never in place: x may be a view of the dataset
        return x, np.asarray(self.labels[indices])

    def subset(self, indices, name: str | None = None) -> "ArrayDataset":
        """The samples at `indices` of this dataset, sharing its arrays."""
        rows = np.asarray(indices, dtype=np.int64) if self.rows is None else self.rows[indices]
        return ArrayDataset(self.features, self.labels, name or self.name, self.scale, rows)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.features.shape[1:])


def _as_array(values, what: str):
    """`values` as something indexable by an array of rows: arrays and memory maps as they are, other
    sequences (Python lists) as numpy arrays, float64 made float32."""
    if hasattr(values, "shape") and hasattr(values, "__getitem__"):
        return values
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        array = np.asarray(values, dtype=object)
    if array.dtype.kind not in "biuf" or array.ndim == 0:
        raise ValueError(f"ArrayDataset {what}: expected an array or a (nested) list of numbers of one shape, got "
                         f"{type(values).__name__} making a {array.dtype} array of shape {array.shape}")
    return array.astype(np.float32) if array.dtype == np.float64 else array


def split_evenly(count: int, parts: int, part: int) -> tuple:
    """[start, stop) of part `part` when `count` items split into `parts` contiguous parts whose
    sizes differ by at most one (the first count % parts parts get one more)."""
    base, extra = divmod(count, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


class DistributedSampler:
    """Which samples this rank uses, global batch by global batch.

    Every rank computes the same permutation of range(dataset_len) from (seed, epoch). `batches(B)`
    yields, for each global batch of B consecutive samples of that permutation (the last may be
    shorter unless drop_last), this rank's contiguous part of it and the batch's global size. Each
    call of `batches()` starts the epoch at its first sample, except the first call after
    `load_state_dict()`, which continues where the saved sampler was (a resumed run, even on another
    world size, continues at the exact sample); `set_epoch()` to another epoch cancels that.
    `consumed` counts the samples of the epoch handed out so far.
    Iterating the sampler itself yields this rank's part of the whole epoch taken as one batch, so
    across ranks every sample appears exactly once (with drop_last, every rank gets
    dataset_len // num_replicas samples and the last dataset_len % num_replicas are left out).
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if not isinstance(dataset_len, (int, np.integer)) or dataset_len < 0:
            raise ValueError(f"dataset_len must be a non-negative integer, got {dataset_len!r}")
        if not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
        self.dataset_len, self.num_replicas, self.rank = int(dataset_len), int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0
        self.consumed = 0  # samples of this epoch's permutation already handed out (global count)
        self._resuming = False  # the next batches() continues at `consumed` (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (a new permutation) from its beginning; the same epoch again changes
        nothing (so a loaded position inside it is kept)."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._resuming = int(epoch), 0, False

    def permutation(self) -> np.ndarray:
        """The global order of samples for the current epoch (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.dataset_len)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.dataset_len)

    def num_batches(self, batch_size: int) -> int:
        """Global batches per epoch for global batch size `batch_size`."""
        if self.drop_last:
            return self.dataset_len // batch_size
        return -(-self.dataset_len // batch_size)

    def epoch_end(self, batch_size: int) -> int:
        """How many samples of the permutation an epoch uses (fewer than all with drop_last)."""
        return self.num_batches(batch_size) * batch_size if self.drop_last else self.dataset_len

    def batches(self, batch_size: int):
        """Yield (this rank's indices, global_count) per global batch of the current epoch, from its
        start (or, right after load_state_dict, from the loaded position)."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._batches(int(batch_size))

    def _batches(self, batch_size: int):
        end = self.epoch_end(batch_size)
        if not self._resuming:
            self.consumed = 0
        self._resuming = False
        order = self.permutation()
        while self.consumed < end:
            lo = self.consumed
            hi = min(lo + batch_size, end)
            start, stop = split_evenly(hi - lo, self.num_replicas, self.rank)
            self.consumed = hi
            yield order[lo + start:lo + stop], hi - lo

    def __iter__(self):
        start, stop = self._own_samples()
        return iter(self.permutation()[start:stop].tolist())

    def __len__(self) -> int:
        start, stop = self._own_samples()
        return stop - start

    def _own_samples(self) -> tuple:
        """[start, stop) of this rank's part of the permutation when the epoch is one batch."""
        total = self.dataset_len // self.num_replicas * self.num_replicas if self.drop_last else self.dataset_len
        return split_evenly(total, self.num_replicas, self.rank)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "shuffle": self.shuffle, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict) -> None:
        if int(state["dataset_len"]) != self.dataset_len:
            raise ValueError(f"sampler state is for a dataset of {state['dataset_len']} samples, "
                             f"this one has {self.dataset_len}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._resuming = True


class DataLoader:
    """Batches of (features, labels) numpy arrays.

    With a DistributedSampler, `batch_size` is the GLOBAL batch size and each iteration yields this
    rank's part of the next global batch; `global_count` is then the size of the whole batch (the
    weight of this rank's gradient is len(part) / global_count). Without a sampler it is a plain
    loader over the whole dataset (shuffled with `seed` if `shuffle`, a new order each iteration).
    Every iteration starts an epoch at its first sample (a loop left early, or a peek with
    `next(iter(loader))`, does not make the next loop start mid-epoch), except the first after the
    sampler's `load_state_dict()`. `dataset` is anything indexable by an array of sample indices, or
    a pair (features, labels) of arrays, which becomes an ArrayDataset.
    """

    def __init__(self, dataset, batch_size: int, sampler: DistributedSampler | None = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False):
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(dataset, (tuple, list)):
            if len(dataset) != 2:
                raise ValueError(f"DataLoader: a {type(dataset).__name__} dataset must be (features, labels), "
                                 f"got {len(dataset)} items")
            dataset = ArrayDataset(np.asarray(dataset[0]), np.asarray(dataset[1]))
        self.dataset, self.batch_size = dataset, int(batch_size)
        self._owns_sampler = sampler is None
        self._iterated = False  # a plain loader shuffles anew from its second iteration on
        self.sampler = sampler or DistributedSampler(len(dataset), 1, 0, shuffle=shuffle, seed=seed,
                                                     drop_last=drop_last)
        if self.sampler.dataset_len != len(dataset):
            raise ValueError(f"the sampler covers {self.sampler.dataset_len} samples but the dataset has {len(dataset)}")
        self.global_count = 0

    def __len__(self) -> int:
        return self.sampler.num_batches(self.batch_size)

    def __iter__(self):
        sampler = self.sampler
        if self._owns_sampler and self._iterated and not sampler._resuming:
            sampler.set_epoch(sampler.epoch + 1)
        self._iterated = True
        for indices, global_count in sampler.batches(self.batch_size):
            self.global_count = global_count
            yield self.dataset[indices]
