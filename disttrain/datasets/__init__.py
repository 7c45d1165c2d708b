"""Data sets named by the [data] config section: bundled digits, MNIST-format IDX files, .npy/.npz
arrays given by path, and a synthetic generator.

`load_data(section)` returns (train, test, info), where train and test are ArrayDatasets and info is
{"input_shape": shape of one sample, "classes": number of classes or outputs, "task":
"classification" | "regression", "description": one line}. Every check here raises DataError with
the file and the problem, identically on every rank (each rank loads the same metadata).
"""

from __future__ import annotations

import numpy as np

from ..data import ArrayDataset


class DataError(ValueError):
    """A data set that cannot be used: missing file, wrong format, bad values or shapes."""


def load_data(section: dict):
    """(train, test, info) for the validated [data] config section."""
    from . import arrays, digits, idx, synthetic

    loaders = {"digits": digits.load, "idx": idx.load, "npy": arrays.load, "synthetic": synthetic.load}
    train, test, info = loaders[section["name"]](section)
    for dataset in (train, test):
        if len(dataset) == 0:
            raise DataError(f"{dataset.name} is empty: no samples to {'train' if dataset is train else 'test'} on")
    return train, test, info


def split_train_test(features, labels, test_fraction: float, seed: int, name: str, scale=None):
    """Two ArrayDatasets sharing `features`/`labels`: a seeded random test_fraction held out."""
    count = len(features)
    order = np.random.default_rng(seed).permutation(count)
    test_count = max(1, int(round(count * test_fraction))) if count > 1 else 0
    full = ArrayDataset(features, labels, name, scale)
    return full.subset(np.sort(order[test_count:]), f"{name} (train)"), \
        full.subset(np.sort(order[:test_count]), f"{name} (test)")


def check_labels(labels: np.ndarray, name: str, task: str, classes: int | None = None) -> int:
    """Raise DataError unless labels fit the task; returns the number of classes seen (max + 1)."""
    if len(labels) == 0:
        raise DataError(f"{name}: no labels (the data set is empty)")
    if task == "regression":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)):
            raise DataError(f"{name}: regression targets must be finite floats")
        return labels.shape[1] if labels.ndim > 1 else 1
    if labels.dtype.kind not in "iu":
        raise DataError(f"{name}: labels must be integers for classification, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (classes is not None and high >= classes):
        bad = low if low < 0 else high
        allowed = f"0..{classes - 1}" if classes is not None else ">= 0"
        raise DataError(f"{name}: label {bad} is out of range (allowed {allowed})")
    return high + 1


def check_finite(features, name: str, chunk_rows: int = 4096) -> None:
    """Raise DataError naming the first row with a NaN or inf (scans memory maps chunk by chunk)."""
    if features.dtype.kind != "f":
        return
    for lo in range(0, len(features), chunk_rows):
        block = np.asarray(features[lo:lo + chunk_rows])
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not finite.all():
            row = lo + int(np.argmin(finite))
            raise DataError(f"{name}: row {row} contains NaN or inf")
