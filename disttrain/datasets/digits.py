"""The bundled UCI handwritten digits: 1,797 images of 8x8 pixels (0..16), 10 classes (see README.md)."""

from __future__ import annotations

import os

import numpy as np

from . import count_classes, require_classification, split_train_test

PATH = os.path.join(os.path.dirname(__file__), "digits.csv.gz")


def read_digits():
    """(images float32 (1797, 1, 8, 8) scaled to [0, 1], labels int64 (1797,))."""
    table = np.loadtxt(PATH, delimiter=",", dtype=np.float32)
    images = (table[:, :64] / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return np.ascontiguousarray(images), table[:, 64].astype(np.int64)


def load(section: dict, comm=None):
    require_classification(section, "the digits data set")
    images, labels = read_digits()
    classes = count_classes(section, "classification", labels, "digits labels")  # 10 unless data.classes
    train, test = split_train_test(images, labels, section["test_fraction"], section["split_seed"], "digits")
    return train, test, {"input_shape": (1, 8, 8), "classes": classes, "task": "classification",
                         "description": f"UCI digits 8x8: {len(train)} train / {len(test)} test"}
