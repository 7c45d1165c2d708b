"""Run agreement: before the first step, every rank must be running the same job.

A rank describes its job as *facts*, a flat {name: value} dict: every key of the resolved config, the
data sets' sizes and sample shape, the library version and, from the command line, its arguments.
`check_agreement` compares them across ranks with one allreduce of a 144-bit digest (the normal
path); only when the digests differ are the facts themselves gathered (pickled: an error path) to
name each differing fact and the ranks on each side, in one error raised identically on every rank.
"""

from __future__ import annotations

import hashlib
import json
import shlex

import numpy as np

from ..config import ConfigError, toml_value

# what each kind of fact is called in the error, by the prefix of its name
KINDS = {"config": "config differs across ranks", "data": "data differs across ranks",
         "library": "library versions differ across ranks", "launch": "launch arguments differ across ranks"}
SHOWN_DIFFERENCES = 6  # a longer list ends in "and N more"


class RunMismatchError(ConfigError):
    """Ranks were started with different settings, data or arguments; the message names each
    difference and the ranks on each side."""


def run_facts(config: dict | None = None, train_data=None, test_data=None, argv=None) -> dict:
    """This rank's facts about its job: "config:SECTION.KEY" for every key of `config` ({section:
    {key: value}}), "data:..." for the data sets' sizes and sample shape, "library:disttrain" and,
    when `argv` (the command line after the program name) is given, "launch:arguments"."""
    from .. import __version__

    facts = {"library:disttrain": __version__}
    for section, values in (config or {}).items():
        if isinstance(values, dict):
            facts.update({f"config:{section}.{key}": value for key, value in values.items()})
        else:
            facts[f"config:{section}"] = values
    if train_data is not None:
        facts["data:training samples"] = len(train_data)
        facts["data:sample shape"] = _sample_shape(train_data)
    if test_data is not None:
        facts["data:test samples"] = len(test_data)
    if argv is not None:
        facts["launch:arguments"] = [str(word) for word in argv]
    return facts


def _sample_shape(dataset) -> list:
    """The shape of one sample of `dataset` (its `sample_shape`, else read from its first sample)."""
    shape = getattr(dataset, "sample_shape", None)
    if shape is None and len(dataset):
        shape = np.shape(dataset[np.arange(1)][0])[1:]
    return list(shape or ())


def check_agreement(comm, facts: dict) -> None:
    """COLLECTIVE. Return if every rank of `comm` passed the same `facts` (compared exactly, as a digest
    of their canonical JSON: one allreduce); otherwise raise RunMismatchError on every rank, naming each
    fact that differs and which ranks hold which value."""
    if comm.size == 1:
        return
    if comm.all_equal(_digest(facts)).all():
        return
    per_rank = comm.allgather_object(facts)
    raise RunMismatchError(describe_differences(per_rank))


def _digest(facts: dict) -> list:
    """Three 48-bit numbers (exact in float64, as all_equal needs) from the sha256 of `facts`."""
    text = json.dumps(facts, sort_keys=True, default=repr, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).digest()
    return [int.from_bytes(digest[i:i + 6], "little") for i in (0, 6, 12)]


def describe_differences(per_rank: list) -> str:
    """The error text for facts `per_rank` (rank r's dict at index r), e.g. "config differs across
    ranks: optimizer.lr is 0.001 on ranks 0, 2 and 0.01 on rank 1"."""
    names = sorted({name for facts in per_rank for name in facts})
    missing = object()
    differing = [name for name in names
                 if len({_key(facts.get(name, missing)) for facts in per_rank}) > 1]
    by_kind = {}
    for name in differing[:SHOWN_DIFFERENCES]:
        kind, _, label = name.partition(":")
        sides = {}
        for rank, facts in enumerate(per_rank):
            sides.setdefault(_show(kind, facts.get(name, missing), missing), []).append(rank)
        text = " and ".join(f"{value} on {rank_list(ranks)}" for value, ranks in sides.items())
        by_kind.setdefault(kind, []).append(text if kind == "launch" else f"{label} is {text}")
    parts = [f"{KINDS.get(kind, kind + ' differs across ranks')}: {', '.join(items)}"
             for kind, items in by_kind.items()]
    if len(differing) > SHOWN_DIFFERENCES:
        rest = [name.partition(":")[2] for name in differing[SHOWN_DIFFERENCES:]]
        parts.append(f"and {len(rest)} more ({', '.join(rest)})")
    return "; ".join(parts) + ". Every rank must be started with the same config, data and arguments"


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _show(kind: str, value, missing) -> str:
    if value is missing:
        return "absent"
    if kind == "launch" and isinstance(value, list):
        return repr(shlex.join(value))
    try:
        return toml_value(value)
    except Exception:  # a value TOML cannot spell (from a Python caller's config): its repr
        return repr(value)


def rank_list(ranks: list) -> str:
    """"rank 3", "ranks 0, 2" or, for runs of three or more, "ranks 0-5, 7"."""
    runs, start = [], 0
    for i in range(1, len(ranks) + 1):
        if i == len(ranks) or ranks[i] != ranks[i - 1] + 1:
            first, last = ranks[start], ranks[i - 1]
            runs.append(f"{first}-{last}" if last - first >= 2 else ", ".join(map(str, ranks[start:i])))
            start = i
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)
