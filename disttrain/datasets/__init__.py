"""Data sets named by the [data] config section: bundled digits, MNIST-format IDX files, .npy/.npz
arrays given by path, a synthetic generator, and byte-level text (text.py).

`load_data(section, comm)` returns (train, test, info), where train and test are ArrayDatasets (text:
TextWindows) and info is {"input_shape": shape of one sample, "classes": number of classes or outputs,
"task": "classification" | "regression" | "language_model", "description": one line}. Class labels are integers of shape (n,),
regression targets float32 of shape (n, outputs). Every check here raises DataError with the file and
the problem, identically on every rank: each rank loads the same metadata and labels, and a scan of
the features that each rank makes over its own rows only ends in an agreed result.
"""

from __future__ import annotations

import numpy as np

from ..data import ArrayDataset, split_evenly


class DataError(ValueError):
    """A data set that cannot be used: missing file, wrong format, bad values or shapes."""


def load_data(section: dict, comm=None, block_size: int = 128):
    """(train, test, info) for the validated [data] config section.

    With `comm` this is COLLECTIVE (every rank calls it): each rank scans only its share of a
    memory-mapped file for NaN/inf and the ranks agree on the result. Without, one process checks all.
    `block_size` is the window length of the text data set (the model's block_size); others ignore it.
    """
    from . import arrays, digits, idx, synthetic, text

    loaders = {"digits": digits.load, "idx": idx.load, "npy": arrays.load, "synthetic": synthetic.load,
               "text": lambda section, comm: text.load(section, comm, block_size)}
    train, test, info = loaders[section["name"]](section, comm)
    for dataset in (train, test):
        if len(dataset) == 0:
            raise DataError(f"{dataset.name} is empty: no samples to {'train' if dataset is train else 'test'} on")
    info["description"] += ", " + outputs_summary(info, section, train)
    info.setdefault("notes", [])
    return train, test, info


def outputs_summary(info: dict, section: dict, train) -> str:
    """What the model must output, in words: "10 classes from labels 0..9" (inferred), "12 classes
    (data.classes; labels 0..9 seen)" or "1 regression output"."""
    if info["task"] == "language_model":
        return f"next-token prediction over {info['classes']} byte values"
    if info["task"] == "regression":
        return f"{info['classes']} regression output{'s' if info['classes'] != 1 else ''}"
    labels = np.asarray(train.labels if train.rows is None else train.labels[train.rows])
    seen = f"{int(labels.min())}..{int(labels.max())}"
    if section["classes"]:
        return f"{info['classes']} classes (data.classes; labels {seen} seen)"
    return f"{info['classes']} classes from labels {seen}"


def require_classification(section: dict, what: str) -> None:
    """Raise DataError if data.task asks for regression of a data set whose labels are classes."""
    if section["task"] == "regression":
        raise DataError(f"data.task = \"regression\" does not fit {what}: its labels are classes (allowed: \"auto\" "
                        f"or \"classification\")")


def split_train_test(features, labels, test_fraction: float, seed: int, name: str, scale=None):
    """Two ArrayDatasets sharing `features`/`labels`: a seeded random test_fraction held out."""
    count = len(features)
    order = np.random.default_rng(seed).permutation(count)
    test_count = max(1, int(round(count * test_fraction))) if count > 1 else 0
    full = ArrayDataset(features, labels, name, scale)
    return full.subset(np.sort(order[test_count:]), f"{name} (train)"), \
        full.subset(np.sort(order[:test_count]), f"{name} (test)")


def count_classes(section: dict, task: str, train_labels: np.ndarray, train_name: str,
                  test_labels: np.ndarray | None = None, test_name: str = "test labels") -> int:
    """The number of classes (classification) or outputs (regression) the labels need.

    Classification: data.classes if set (> 0), every label checked against it; else inferred from the
    training labels (largest + 1), and a test label beyond them is an error, since a model sized for
    the training labels would have no output for it. Regression: the targets' columns (n, outputs),
    equal for test and train, and equal to data.classes if set. `test_labels` None: no separate test set.
    """
    classes = section["classes"]
    if task == "regression":
        outputs = check_targets(train_labels, train_name)
        if test_labels is not None and check_targets(test_labels, test_name) != outputs:
            raise DataError(f"{test_name}: targets have {test_labels.shape[1]} output(s) per sample, the training "
                            f"targets ({train_name}) have {outputs}")
        if classes and classes != outputs:
            raise DataError(f"{train_name}: regression targets have {outputs} output(s) per sample, but "
                            f"data.classes = {classes} (set it to {outputs}, or to 0 to infer it)")
        return outputs
    if classes:
        why = f", data.classes = {classes}"
        check_labels(train_labels, train_name, classes, why)
        if test_labels is not None:
            check_labels(test_labels, test_name, classes, why)
        return classes
    inferred = check_labels(train_labels, train_name)
    check_no_gaps(train_labels, train_name, inferred)
    if test_labels is not None:
        check_labels(test_labels, test_name, inferred,
                     f", the range of the training {train_name}: data.classes = 0 infers the classes "
                     f"from them, and the model would have no output for this label; set data.classes to the "
                     f"number of classes")
    return inferred


def check_labels(labels: np.ndarray, name: str, classes: int | None = None, why: str = "") -> int:
    """Raise DataError unless `labels` are integers in 0..classes-1 (>= 0 if classes is None);
    returns the number of classes seen (largest label + 1). `why` follows the allowed range."""
    if len(labels) == 0:
        raise DataError(f"{name}: no labels (the data set is empty)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{name}: labels must be integers for classification, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (classes is not None and high >= classes):
        bad = low if low < 0 else high
        allowed = f"0..{classes - 1}" if classes is not None else ">= 0"
        raise DataError(f"{name}: label {bad} is out of range (allowed {allowed}{why})")
    return high + 1


def check_no_gaps(labels: np.ndarray, name: str, classes: int) -> None:
    """Raise DataError if some class in 0..classes-1 never occurs in `labels` (inferred classes only:
    one stray label 50 among 0/1 labels would otherwise make a 51-class model)."""
    present, counts = np.unique(labels, return_counts=True)
    if len(present) == classes:
        return
    missing = np.setdiff1d(np.arange(classes), present)
    rarest = int(present[np.argmin(counts)])
    raise DataError(f"{name}: classes {_ranges(missing)} never occur among the labels 0..{classes - 1} (label {rarest} "
                    f"occurs {int(counts.min())} time{'s' if counts.min() != 1 else ''}): a stray label would make a "
                    f"{classes}-class model. Fix the labels, or set data.classes = {classes} if those classes are "
                    f"meant to be absent")


def _ranges(values) -> str:
    """Sorted integers as "2..49, 51" (runs of three or more as a range)."""
    parts, start = [], 0
    values = [int(v) for v in values]
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            parts.append(f"{run[0]}..{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)))
            start = i
    text = ", ".join(parts)
    return text if len(text) <= 80 else text[:77] + "..."


def check_targets(targets: np.ndarray, name: str) -> int:
    """Raise DataError unless `targets` are finite floats of shape (n, outputs); returns outputs."""
    if len(targets) == 0:
        raise DataError(f"{name}: no targets (the data set is empty)")
    if targets.dtype.kind != "f" or targets.ndim != 2:
        raise DataError(f"{name}: regression targets must be floats of shape (n, outputs), got {targets.dtype} "
                        f"{targets.shape}")
    if not np.all(np.isfinite(targets)):
        raise DataError(f"{name}: regression targets must be finite (row {first_nonfinite_row(targets, 0, len(targets))} "
                        f"holds NaN or inf)")
    return targets.shape[1]


def check_finite(features, name: str, comm=None, chunk_rows: int = 4096) -> None:
    """Raise DataError naming the first row of `features` with a NaN or inf.

    Without `comm`, this process scans every row (a memory map chunk by chunk). With `comm`,
    COLLECTIVE: each rank scans only its split_evenly share of the rows, then one allreduce (min) agrees
    on the first bad row, so every rank raises the same error whichever rank's share held it.
    """
    if features.dtype.kind != "f":
        return
    count = len(features)
    start, stop = (0, count) if comm is None else split_evenly(count, comm.size, comm.rank)
    first = first_nonfinite_row(features, start, stop, chunk_rows)
    if comm is not None and comm.size > 1:
        agreed = np.array([first], dtype=np.int64)
        comm.allreduce(agreed, "min")
        first = int(agreed[0])
    if first < count:
        raise DataError(f"{name}: row {first} contains NaN or inf")


def first_nonfinite_row(features, start: int, stop: int, chunk_rows: int = 4096) -> int:
    """The first row in [start, stop) holding a NaN or inf, or len(features) if there is none."""
    for lo in range(start, stop, chunk_rows):
        block = np.asarray(features[lo:min(lo + chunk_rows, stop)])
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not finite.all():
            return lo + int(np.argmin(finite))
    return len(features)
