"""A synthetic data set for benchmarks and regression examples, generated from a seed.

Classification: Gaussian features, labels from a random linear teacher (plus noise on the logits),
so a model can learn it. Regression: targets = features @ W + noise.
"""

from __future__ import annotations

import numpy as np

from . import split_train_test


def make(samples: int, features: int, classes: int, task: str, noise: float, seed: int):
    """(features float32 (samples, features), labels int64 or targets float32 (samples, classes))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, features), dtype=np.float32)
    teacher = rng.standard_normal((features, classes), dtype=np.float32) / np.float32(np.sqrt(features))
    scores = x @ teacher
    if task == "regression":
        return x, scores + np.float32(noise) * rng.standard_normal(scores.shape, dtype=np.float32)
    scores += np.float32(noise) * rng.standard_normal(scores.shape, dtype=np.float32)
    return x, scores.argmax(axis=1).astype(np.int64)


DEFAULT_CLASSES = 10  # data.classes = 0 means "infer from the labels"; generated data has none to infer from


def load(section: dict, comm=None):
    classes = section["classes"] or DEFAULT_CLASSES
    task = "classification" if section["task"] == "auto" else section["task"]
    x, y = make(section["samples"], section["features"], classes, task, section["noise"], section["seed"])
    train, test = split_train_test(x, y, section["test_fraction"], section["split_seed"], "synthetic")
    return train, test, {"input_shape": (section["features"],), "classes": classes, "task": task,
                         "description": f"synthetic {task}: {len(train)} train / {len(test)} test, "
                                        f"{section['features']} features"}
