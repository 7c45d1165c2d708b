"""The TOML configuration: every section, key, type, default and allowed value, and its validation.

`load_config(path, overrides)` reads a TOML file, applies `section.key=value` overrides, and returns
{section: {key: value}} with every key present (defaults filled in). Any unknown key, wrong type or
out-of-range value raises ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the key, the value and the rule."""


class Field:
    """One config key: its kind ("int", "float", "float_or_auto", "bool", "bool_or_auto", "str", "ints", "table"),
    default, and rule.
    `or_callable`: a "str" with choices also accepts 'module:callable' (any value holding a colon)."""

    def __init__(self, kind: str, default, help: str, low=None, high=None, choices=None,
                 low_open: bool = False, high_open: bool = False, or_callable: bool = False):
        self.kind, self.default, self.help = kind, default, help
        self.low, self.high, self.choices = low, high, choices
        self.low_open, self.high_open, self.or_callable = low_open, high_open, or_callable

    def allowed(self) -> str:
        if self.choices:
            names = [repr(c) for c in self.choices] + (["'module:callable'"] if self.or_callable else [])
            return "one of " + ", ".join(names[:-1]) + (", or " if self.or_callable else ", ") + names[-1]
        parts = {"int": "an integer", "float": "a number", "float_or_auto": "\"auto\" or a number",
                 "bool": "true or false",
                 "bool_or_auto": "true, false or \"auto\"", "str": "a string",
                 "ints": "a list of positive integers", "table": "a table"}[self.kind]
        if self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
            hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
            parts += " " + " and ".join(p for p in (lo, hi) if p)
        return parts

    def check(self, key: str, value):
        def fail():
            raise ConfigError(f"config key {key} = {value!r} is not allowed: expected {self.allowed()}")
        if self.kind in ("bool", "bool_or_auto"):
            if not isinstance(value, bool) and not (self.kind == "bool_or_auto" and value == "auto"):
                fail()
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                fail()
        elif self.kind in ("float", "float_or_auto"):
            if self.kind == "float_or_auto" and value == "auto":
                return value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail()
            value = float(value)
        elif self.kind == "str":
            if not isinstance(value, str):
                fail()
            if self.choices and value not in self.choices and not (self.or_callable and ":" in value):
                fail()
            return value
        elif self.kind == "ints":
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0
                                                  for v in value):
                fail()
            return list(value)
        elif self.kind == "table":
            if not isinstance(value, dict):
                fail()
            return dict(value)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            fail()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            fail()
        return value


SCHEMA = {
    "model": {
        "name": Field("str", "mlp", "built-in model, or 'module:callable' importable from the working "
                      "directory (called with input_shape=, classes= and the [model.options] table)",
                      choices=("mlp", "cnn", "gpt"), or_callable=True),
        "hidden": Field("ints", [128], "mlp: widths of the hidden layers; cnn: widths of the fully connected "
                        "layers between the convolutions and the output ([] for none)"),
        "activation": Field("str", "relu", "mlp: hidden activation", choices=("relu", "tanh", "gelu", "sigmoid")),
        "dropout": Field("float", 0.0, "mlp: dropout probability after each hidden layer; gpt: after the "
                         "embeddings, each attention projection and each MLP", low=0.0, high=1.0, high_open=True),
        "channels": Field("ints", [16, 32], "cnn: channels of the two 3x3 convolution blocks"),
        "options": Field("table", {}, "keyword arguments for a 'module:callable' model"),
        # gpt: a decoder-only transformer over byte tokens (disttrain/transformer.py)
        "vocab": Field("int", 256, "gpt: token vocabulary (256 for byte-level text)", low=1),
        "n_layer": Field("int", 4, "gpt: transformer blocks", low=1),
        "n_head": Field("int", 4, "gpt: attention heads (must divide n_embd)", low=1),
        "n_embd": Field("int", 128, "gpt: width of the residual stream", low=1),
        "block_size": Field("int", 128, "gpt: context length in tokens (also the text data set's window)", low=1),
        "tie_embeddings": Field("bool", True, "gpt: the output projection is the token embedding (one parameter)"),
    },
    "data": {
        "name": Field("str", "digits", "data set", choices=("digits", "idx", "npy", "synthetic", "text")),
        "path": Field("str", "", "idx: directory of *-idx3-ubyte[.gz] files; npy: features .npy or .npz file; "
                      "text: a UTF-8 file or folder of files (empty: the .py files of Python's standard library)"),
        "labels": Field("str", "", "npy: labels .npy file (or key in the .npz; default 'y')"),
        "test_path": Field("str", "", "npy: test features file (default: split off test_fraction)"),
        "test_labels": Field("str", "", "npy: test labels file"),
        "test_fraction": Field("float", 0.2, "share held out for testing when there is no test file",
                               low=0.0, high=1.0, low_open=True, high_open=True),
        "split_seed": Field("int", 0, "seed of the train/test split", low=0),
        "samples": Field("int", 4096, "synthetic: number of samples", low=1),
        "features": Field("int", 32, "synthetic: features per sample", low=1),
        "classes": Field("int", 0, "classes (classification) or outputs per sample (regression); 0: infer "
                         "from the training labels (synthetic: 10); set, every label must lie in 0..classes-1",
                         low=0),
        "task": Field("str", "auto", "classification or regression; auto: npy integer labels are classes and float "
                      "labels regression targets, every other data set is classification",
                      choices=("auto", "classification", "regression")),
        "noise": Field("float", 0.1, "synthetic: label/target noise", low=0.0),
        "seed": Field("int", 0, "synthetic: generator seed", low=0),
        "val_fraction": Field("float", 0.1, "text: the final share of the text held out for validation",
                              low=0.0, high=1.0, low_open=True, high_open=True),
        "eval_windows": Field("int", 0, "text: validation windows, spread evenly over the validation text "
                              "(0: every non-overlapping window)", low=0),
    },
    "optimizer": {
        "name": Field("str", "adam", "update rule", choices=("sgd", "adam", "adamw")),
        "lr": Field("float", 0.001, "learning rate", low=0.0, low_open=True),
        "momentum": Field("float", 0.0, "sgd: momentum", low=0.0, high=1.0, high_open=True),
        "beta1": Field("float", 0.9, "adam: first-moment decay", low=0.0, high=1.0, high_open=True),
        "beta2": Field("float", 0.999, "adam: second-moment decay", low=0.0, high=1.0, high_open=True),
        "eps": Field("float", 1e-8, "adam: denominator epsilon", low=0.0, low_open=True),
        "weight_decay": Field("float", 0.0, "L2 (sgd, adam) or decoupled (adamw) weight decay", low=0.0),
        "sharded": Field("bool", True, "ZeRO-1: each rank keeps only its share of optimizer state"),
        "strategy": Field("str", "auto", "gradient combination (auto: reduce_scatter when sharded, "
                          "else allreduce)", choices=("auto", "reduce_scatter", "allreduce")),
        "bucket_mb": Field("float", 4.0, "largest gradient bucket per collective call, MB", low=0.0,
                           low_open=True),
        "overlap": Field("bool", True, "combine each gradient bucket in a background thread as soon as backward "
                         "has produced it (the same bits as false; needs MPI_THREAD_MULTIPLE)"),
        "hierarchical": Field("bool_or_auto", "auto", "combine gradient buckets within each node over shared memory, "
                              "across nodes among one leader per node, then within the node again, so that each "
                              "node's link carries one share instead of one per rank; auto: when ranks span "
                              "several nodes with more than one rank on a node"),
        "compression": Field("str", "none", "what gradient buckets send: exact float32 (none), 16-bit values "
                             "summed in float32 (bf16, fp16), or PowerSGD's low-rank factors of each whole 2-D "
                             "gradient with error feedback (powersgd); parameters stay float32",
                             choices=("none", "bf16", "fp16", "powersgd")),
        "powersgd_rank": Field("int", 4, "powersgd: rank of each gradient's approximation", low=1),
    },
    "training": {
        "epochs": Field("int", 10, "passes over the training data", low=1),
        "max_steps": Field("int", 0, "stop after this many optimizer steps (0: no limit)", low=0),
        "batch_size": Field("int", 64, "GLOBAL batch size (split across ranks)", low=1),
        "eval_batch_size": Field("int", 1024, "batch size per rank for evaluation", low=1),
        "accumulate": Field("int", 1, "micro-batches per optimizer step (gradient accumulation)", low=1),
        "seed": Field("int", 0, "seed of model initialisation, shuffling and dropout", low=0),
        "shuffle": Field("bool", True, "reshuffle the training data every epoch"),
        "clip_norm": Field("float", 0.0, "clip the global gradient norm to this (0: off)", low=0.0),
        "schedule": Field("str", "constant", "learning-rate schedule", choices=("constant", "cosine", "step")),
        "warmup_steps": Field("int", 0, "cosine: linear warm-up steps", low=0),
        "min_lr": Field("float", 0.0, "cosine: final learning rate", low=0.0),
        "step_size": Field("int", 1000, "step: steps between decays", low=1),
        "gamma": Field("float", 0.1, "step: decay factor", low=0.0, low_open=True),
        "eval_every": Field("int", 0, "evaluate every this many steps (0: at the end of every epoch)", low=0),
        "log_every": Field("int", 10, "write a metrics line every this many steps", low=1),
        "run_dir": Field("str", "runs/default", "directory for metrics.jsonl and checkpoints"),
        "on_nonfinite": Field("str", "error", "a NaN/inf loss or gradient: stop with an error, or skip the "
                              "step on all ranks", choices=("error", "skip")),
        "watchdog_seconds": Field("float_or_auto", "auto", "abort the job if one step takes longer; auto: 600 s "
                                  "for the first 5 steps, then 20x the median step, at least 60 s; 0: off (no step "
                                  "limit, and no heartbeats: a dead or stopped rank is then not detected)", low=0.0),
        "check_replicas_every": Field("int", 0, "verify parameters are bit-identical on all ranks every "
                                      "this many steps (0: off)", low=0),
        "threads": Field("int", 0, "BLAS threads per rank (0: cores on the node / ranks on the node)", low=0),
        "progress": Field("str", "auto", "progress display on rank 0; auto: a live bar when stdout is a terminal "
                          "(never under Open MPI, whose ranks always get one), else lines", choices=("auto", "bar", "lines", "none")),
    },
    "checkpoint": {
        "every_steps": Field("int", 0, "save every this many steps (0: off)", low=0),
        "every_epochs": Field("int", 1, "save at the end of every this many epochs (0: off)", low=0),
        "keep": Field("int", 3, "complete checkpoints to keep", low=1),
        "resume": Field("bool", False, "continue from the latest good checkpoint if there is one"),
        "dir": Field("str", "", "checkpoint directory (default RUN_DIR/checkpoints)"),
    },
}


def defaults() -> dict:
    """Every section with every key at its default."""
    return {section: {key: _copy(field.default) for key, field in fields.items()}
            for section, fields in SCHEMA.items()}


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def validate(raw: dict, source: str = "config") -> dict:
    """Defaults overlaid with `raw` ({section: {key: value}}), every key checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a table of sections, got {type(raw).__name__}")
    config = defaults()
    for section, values in raw.items():
        if section not in SCHEMA and not isinstance(values, dict):
            raise ConfigError(f"{source}: {_top_level_key(section, values)}")
        if section not in SCHEMA:
            close = _closest(section, SCHEMA)
            hint = f" (did you mean [{close}]?)" if close else ""
            raise ConfigError(f"{source}: unknown section [{section}]{hint}; allowed sections: {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
        for key, value in values.items():
            field = SCHEMA[section].get(key)
            if field is None:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'{_key_hint(section, key)}; allowed keys in "
                                  f"[{section}]: {', '.join(SCHEMA[section])}")
            try:
                config[section][key] = field.check(f"{section}.{key}", value)
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from None
    return config


def _top_level_key(key: str, value) -> str:
    """The error for `key = value` outside any section (TOML puts a key in the [section] above it)."""
    homes = [section for section, fields in SCHEMA.items() if key in fields]
    where = " or ".join(f"[{section}] {key}" for section in homes)
    hint = (f" (did you mean {where}?); put it under that section's header" if homes
            else f"; allowed sections: {', '.join(SCHEMA)}")
    return f"key '{key}' = {value!r} is outside any section{hint}: every key belongs to the [section] above it"


def _key_hint(section: str, key: str) -> str:
    """' (did you mean ...?)' for an unknown key: the same key in another section, else a close name."""
    homes = [f"{other}.{key}" for other, fields in SCHEMA.items() if other != section and key in fields]
    if homes:
        return f" (did you mean {' or '.join(homes)}?)"
    close = _closest(key, SCHEMA[section])
    return f" (did you mean '{close}'?)" if close else ""


def _closest(key: str, fields: dict) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    return matches[0] if matches else None


def parse_override(text: str) -> tuple:
    """'section.key=value' -> (section, key, value); the value is read as TOML, else as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. training.epochs=5")
    name, raw = text.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: str | None, overrides=()) -> dict:
    """Read TOML file `path` (None: defaults only), apply overrides, validate everything."""
    raw = {}
    source = path or "defaults"
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path!r} is not valid TOML: {error}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        validate({section: {key: value}}, f"--set {text}")  # an error names the --set, not the file
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"--set {text!r}: [{section}] is not a table")
        raw[section][key] = value
    config = validate(raw, source)
    check_consistency(config)
    return config


def check_consistency(config: dict) -> None:
    """Raise ConfigError when keys that are valid alone do not work together (the config is not changed)."""
    check_gpt(config)
    optimizer = config["optimizer"]
    if not optimizer["sharded"] and optimizer["strategy"] == "reduce_scatter":
        raise ConfigError("optimizer.sharded = false needs optimizer.strategy = 'allreduce' "
                          "(with reduce_scatter each rank only receives its own share of the gradient)")


def check_gpt(config: dict) -> None:
    """The [model] keys of a gpt that depend on each other or on the data set."""
    model = config["model"]
    if model["name"] != "gpt":
        return
    if model["n_embd"] % model["n_head"]:
        raise ConfigError(f"model.n_embd = {model['n_embd']} is not allowed with model.n_head = {model['n_head']}: "
                          f"n_embd must be divisible by n_head (each head gets n_embd / n_head features)")
    if config.get("data", {}).get("name") == "text" and model["vocab"] < 256:
        raise ConfigError(f"model.vocab = {model['vocab']} is not allowed with data.name = 'text': its tokens are "
                          f"bytes, so vocab must be >= 256")


def describe() -> str:
    """Every section and key with its default and rule, for `--help`-style listings; the text is
    itself a valid TOML config holding every default."""
    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, field in fields.items():
            lines.append(f"  {key} = {toml_value(field.default)}   # {field.help}; {field.allowed()}")
    return "\n".join(lines)


def toml_value(value) -> str:
    """`value` (bool, int, float, str, list or dict of those) written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return repr(value)
