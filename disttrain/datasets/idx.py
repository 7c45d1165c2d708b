"""MNIST-format IDX files (real MNIST, Fashion-MNIST, ...) from a directory.

Expects `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
`t10k-labels-idx1-ubyte`, each optionally gzipped. Uncompressed files are memory-mapped.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from ..data import ArrayDataset
from . import DataError, check_finite, count_classes, require_classification

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """The array in IDX file `path` (gzipped if it ends in .gz; memory-mapped otherwise)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(4)
            if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number {header.hex()})")
            ndim = header[3]
            dims = tuple(int.from_bytes(handle.read(4), "big") for _ in range(ndim))
            dtype = np.dtype(_DTYPES[header[2]])
            offset = 4 + 4 * ndim
            expected = int(np.prod(dims)) * dtype.itemsize
            if path.endswith(".gz"):
                payload = handle.read()
                if len(payload) != expected:
                    raise DataError(f"{path}: truncated ({len(payload)} bytes of data, header says {expected})")
                return np.frombuffer(payload, dtype=dtype).reshape(dims)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read IDX file: {error}") from None
    if os.path.getsize(path) != offset + expected:
        raise DataError(f"{path}: truncated ({os.path.getsize(path) - offset} bytes of data, header says {expected})")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=dims)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"IDX data: {os.path.join(directory, stem)}[.gz] does not exist (data.path = {directory!r}; "
                    f"for Fashion-MNIST on Debian: apt-get install dataset-fashion-mnist, "
                    f"path /usr/share/datasets/fashion-mnist)")


def load(section: dict, comm=None):
    require_classification(section, "IDX data")
    directory = section["path"]
    if directory and os.path.isfile(directory):
        raise DataError(f"IDX data: data.path = {directory!r} is a file; give the directory that holds "
                        f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                        f"t10k-labels-idx1-ubyte (each may be gzipped)")
    if not directory or not os.path.isdir(directory):
        raise DataError(f"IDX data: data.path = {directory!r} is not a directory")
    parts, labels_names = {}, {}
    for split in ("train", "t10k"):
        images_path = _find(directory, f"{split}-images-idx3-ubyte")
        images = read_idx(images_path)
        if images.ndim != 3:
            what = "one value per sample, as a labels file holds" if images.ndim == 1 else f"shape {images.shape}"
            raise DataError(f"{images_path}: holds {what}, not images of shape (n, rows, columns): is another "
                            f"IDX file in its place?")
        labels_path = _find(directory, f"{split}-labels-idx1-ubyte")
        labels = np.asarray(read_idx(labels_path), dtype=np.int64)
        if labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"IDX data in {directory}: {split} images {images.shape} and labels {labels.shape} "
                            f"do not match (expected (n, rows, columns) and (n,))")
        check_finite(images, f"{split} images ({directory})", comm)  # float IDX files only
        scale = 1.0 / 255.0 if images.dtype == np.uint8 else None
        parts[split] = ArrayDataset(images, labels, f"{split} ({directory})", scale)
        labels_names[split] = f"labels ({labels_path})"
    classes = count_classes(section, "classification", parts["train"].labels, labels_names["train"],
                            parts["t10k"].labels, labels_names["t10k"])
    shape = tuple(parts["train"].features.shape[1:])
    return parts["train"], parts["t10k"], {
        "input_shape": (1, *shape), "classes": classes, "task": "classification",
        "description": f"IDX {directory}: {len(parts['train'])} train / {len(parts['t10k'])} test, {shape[0]}x{shape[1]}"}
