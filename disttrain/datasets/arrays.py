"""Features and labels from .npy files (memory-mapped: each rank reads only the rows it uses) or an
.npz file (keys `x`/`y` unless named; loaded whole, since zip members cannot be memory-mapped).

Labels are read whole (one value per sample; every rank needs them all to count the classes). Integer
labels are class indices, shape (n,) or (n, 1); float labels are regression targets, shape (n,) or
(n, outputs), returned as float32 (n, outputs).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..data import ArrayDataset
from . import DataError, check_finite, count_classes, split_train_test

NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = b"PK"  # an .npz is a zip archive
IDX_TYPES = (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)  # the third byte of an IDX file: its element type
WHAT = {"data.path": "features", "data.labels": "labels", "data.test_path": "test features",
        "data.test_labels": "test labels"}


def load(section: dict, comm=None):
    """(train, test, info) for [data] name = "npy"; COLLECTIVE with `comm` (see load_data)."""
    features, labels, labels_name = _pair(section, "path", "labels", comm)
    task = "regression" if labels.dtype.kind == "f" else "classification"
    notes = [_float_classes_note(labels, labels_name)] if section["task"] == "auto" and task == "regression" else []
    if section["test_path"]:
        test_features, test_labels, test_labels_name = _pair(section, "test_path", "test_labels", comm)
        if test_features.shape[1:] != features.shape[1:]:
            raise DataError(f"npy test data ({section['test_path']}): samples of shape {test_features.shape[1:]}, "
                            f"the training samples ({section['path']}) are {features.shape[1:]}")
        if (test_labels.dtype.kind == "f") != (task == "regression"):
            raise DataError(f"{test_labels_name}: dtype {test_labels.dtype}, but the training labels "
                            f"({labels_name}) are {labels.dtype}: both must be integers (classes) or floats "
                            f"(regression targets)")
        classes = count_classes(section, task, labels, labels_name, test_labels, test_labels_name)
        train = ArrayDataset(features, labels, f"train ({section['path']})")
        test = ArrayDataset(test_features, test_labels, f"test ({section['test_path']})")
    else:
        classes = count_classes(section, task, labels, labels_name)
        train, test = split_train_test(features, labels, section["test_fraction"], section["split_seed"],
                                       f"npy data ({section['path']})")
    return train, test, {"input_shape": tuple(features.shape[1:]), "classes": classes, "task": task,
                         "description": f"arrays {section['path']}: {len(train)} train / {len(test)} test",
                         "notes": [note for note in notes if note]}


def _float_classes_note(targets: np.ndarray, name: str) -> str | None:
    """A note when float targets hold only a few whole numbers: probably class labels saved as floats."""
    values = np.unique(targets[: min(len(targets), 1 << 20)])
    if len(values) > 20 or not np.all(values == np.round(values)):
        return None
    shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
    return (f"note: {name} are floats holding only the values {shown}: trained as regression targets (MSE); to "
            f"train them as classes, set data.task = \"classification\" or save them as integers")


def open_array(path: str, setting: str, key: str | None = None) -> np.ndarray:
    """The array in `path` (.npy memory-mapped, or member `key` of an .npz), with clear errors naming
    the config key `setting` (e.g. "data.path") that gave the path."""
    kind = numpy_format(path, setting)
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise DataError(f"npy data: {path!r} has no array {key!r} (it has {archive.files})")
                return archive[key]
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except DataError:
        raise
    except ValueError as error:
        if "object" in str(error).lower() or "pickle" in str(error).lower():
            raise DataError(f"npy data: {path!r} holds Python objects (dtype object), which disttrain does not "
                            f"load (no pickle): save arrays of numbers") from None
        raise DataError(f"npy data: {path!r} is not a readable numpy .npy/.npz file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"npy data: {path!r} is not a readable numpy .npy/.npz file ({error})") from None


def numpy_format(path: str, setting: str) -> str:
    """"npy" or "npz", told by the file's first bytes (not its name); DataError if it is neither."""
    if not path:
        raise DataError(f"npy data: no {WHAT.get(setting, '')} file given (set {setting})")
    if not os.path.isfile(path):
        raise DataError(f"npy data: {path!r} ({setting}) does not exist")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(NPY_MAGIC))
    except OSError as error:
        raise DataError(f"npy data: cannot read {path!r} ({setting}): {error}") from None
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(NPZ_MAGIC):
        return "npz"
    if len(head) >= 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES:
        raise DataError(f"npy data: {path!r} ({setting}) is an IDX file (MNIST format), not numpy: for IDX data set "
                        f"data.name = \"idx\" and data.path to the directory holding train-images-idx3-ubyte, "
                        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte")
    raise DataError(f"npy data: {path!r} ({setting}) is not a numpy .npy/.npz file (it starts with {head!r}; "
                    f"write it with numpy.save or numpy.savez)")


def _pair(section: dict, path_key: str, labels_key: str, comm):
    """(features, labels shaped for the task, a name for the labels) of one features/labels pair."""
    features_path, labels_setting = section[path_key], section[labels_key]
    name, labels_word = ("npy data", "labels") if path_key == "path" else ("npy test data", "test labels")
    if numpy_format(features_path, f"data.{path_key}") == "npz":
        features = open_array(features_path, f"data.{path_key}", "x")
        key = labels_setting or "y"
        labels = open_array(features_path, f"data.{path_key}", key)
        labels_name = f"{labels_word} ({features_path}, array {key!r})"
    else:
        features = open_array(features_path, f"data.{path_key}")
        labels = open_array(labels_setting, f"data.{labels_key}")
        labels_name = f"{labels_word} ({labels_setting})"
    if features.ndim < 2:
        raise DataError(f"{name}: features must have shape (samples, ...), got {features.shape} ({features_path})")
    labels = shaped_labels(labels_for_task(labels, section["task"], labels_name), labels_name)
    if len(features) != len(labels):
        raise DataError(f"{name}: features have {len(features)} rows but labels have {len(labels)} "
                        f"({features_path!r}, {labels_setting or 'y'!r})")
    if features.dtype.kind not in "fiu":
        raise DataError(f"{name}: features must be numbers, got dtype {features.dtype} ({features_path})")
    check_finite(features, f"{name} features ({features_path})", comm)
    return features, labels, labels_name


def labels_for_task(labels, task: str, name: str) -> np.ndarray:
    """`labels` as data.task wants them: "classification" turns whole-number floats into int64 class
    labels, "regression" turns integers into float32 targets, "auto" leaves them as they are."""
    labels = np.asarray(labels)
    if task == "classification" and labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            index = np.unravel_index(int(np.argmin(whole)), labels.shape)
            raise DataError(f"{name}: data.task = \"classification\" needs whole-number labels, but row {index[0]} "
                            f"holds {labels[index]!r}")
        return labels.astype(np.int64)
    if task == "regression" and labels.dtype.kind in "iu":
        return labels.astype(np.float32)
    return labels


def shaped_labels(labels, name: str) -> np.ndarray:
    """Labels as the losses take them: integer class labels (n,), float regression targets float32
    (n, outputs); a (n, 1) column of integers is squeezed, a (n,) vector of floats becomes (n, 1)."""
    labels = np.asarray(labels)
    kind, shape = labels.dtype.kind, labels.shape
    if kind in "iu":
        if labels.ndim == 1:
            return labels
        if labels.ndim == 2 and shape[1] == 1:
            return labels[:, 0]
        raise DataError(f"{name}: integer labels have shape {shape}; allowed: (n,) or (n, 1), one class index "
                        f"per sample (floats would be regression targets, (n,) or (n, outputs))")
    if kind == "f":
        if labels.ndim in (1, 2):
            return (labels[:, None] if labels.ndim == 1 else labels).astype(np.float32, copy=False)
        raise DataError(f"{name}: float regression targets have shape {shape}; allowed: (n,) or (n, outputs)")
    raise DataError(f"{name}: labels have dtype {labels.dtype} and shape {shape}; allowed: integers (class "
                    f"labels, (n,) or (n, 1)) or floats (regression targets, (n,) or (n, outputs))")
