"""Features and labels from .npy files (memory-mapped: each rank reads only the rows it uses) or an
.npz file (keys `x`/`y` unless named; loaded whole, since zip members cannot be memory-mapped)."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..data import ArrayDataset
from . import DataError, check_finite, check_labels, split_train_test


def open_array(path: str, key: str | None = None, what: str = "features") -> np.ndarray:
    """The array in `path` (.npy memory-mapped, or member `key` of an .npz), with clear errors."""
    if not path:
        raise DataError(f"npy data: no {what} file given (set data.{'path' if what == 'features' else 'labels'})")
    if not os.path.isfile(path):
        raise DataError(f"npy data: {what} file {path!r} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise DataError(f"npy data: {path!r} has no array {key!r} (it has {archive.files})")
                return archive[key]
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise DataError(f"npy data: {path!r} is not a numpy .npy/.npz file ({error})") from None


def _pair(features_path: str, labels_path: str, name: str):
    if features_path.endswith(".npz"):
        features = open_array(features_path, "x")
        labels = open_array(features_path, labels_path or "y", "labels")
    else:
        features = open_array(features_path)
        labels = open_array(labels_path, what="labels")
    if features.ndim < 2:
        raise DataError(f"{name}: features must have shape (samples, ...), got {features.shape}")
    if len(features) != len(labels):
        raise DataError(f"{name}: features have {len(features)} rows but labels have {len(labels)} "
                        f"({features_path!r}, {labels_path or 'y'!r})")
    if features.dtype.kind not in "fiu":
        raise DataError(f"{name}: features must be numbers, got dtype {features.dtype}")
    check_finite(features, f"{name} features ({features_path})")
    return features, np.asarray(labels)


def load(section: dict):
    features, labels = _pair(section["path"], section["labels"], "npy data")
    task = "regression" if labels.dtype.kind == "f" else "classification"
    if section["test_path"]:
        test_features, test_labels = _pair(section["test_path"], section["test_labels"], "npy test data")
        train = ArrayDataset(features, labels, f"train ({section['path']})")
        test = ArrayDataset(test_features, test_labels, f"test ({section['test_path']})")
    else:
        train, test = split_train_test(features, labels, section["test_fraction"], section["split_seed"],
                                       f"npy data ({section['path']})")
        test_labels = labels
    classes = max(check_labels(labels, f"labels ({section['labels'] or section['path']})", task),
                  check_labels(np.asarray(test_labels), "test labels", task))
    return train, test, {"input_shape": tuple(features.shape[1:]), "classes": classes, "task": task,
                         "description": f"arrays {section['path']}: {len(train)} train / {len(test)} test"}
