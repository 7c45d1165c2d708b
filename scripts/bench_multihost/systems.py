"""The systems the multi-host benchmark compares, and what each must at least put on the wire.

A system is a framework ("disttrain" or "torch") plus the options a user would pass: DataParallel
keyword arguments for disttrain (passed through unchanged, so options this build does not have are
reported as unavailable rather than guessed at), a DDP communication hook for torch. `wire` says in
what form gradients cross hosts: "fp32", "16bit" or "lowrank" (rank-`rank` PowerSGD factors of the
2-D weights, vectors exact), which sets the byte floor `min_bytes_sent_per_host`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class System:
    """One benchmarked system: `name` (command line, JSON), `label` (tables), framework, options, wire form."""

    name: str
    label: str
    framework: str
    options: dict = field(default_factory=dict)
    wire: str = "fp32"
    rank: int = 0


SYSTEMS = {system.name: system for system in (
    System("disttrain", "disttrain exact (overlap, lazy gather: the Trainer's defaults)", "disttrain",
           {"lazy_gather": True}),
    System("disttrain-no-overlap", "disttrain exact, overlap off", "disttrain", {"overlap": False}),
    System("disttrain-bf16", "disttrain bf16", "disttrain", {"compression": "bf16", "lazy_gather": True}, "16bit"),
    System("disttrain-fp16", "disttrain fp16", "disttrain", {"compression": "fp16", "lazy_gather": True}, "16bit"),
    # replicated (shard=False, allreduce): the 16-bit sums travel back too, instead of float32 parameters
    System("disttrain-bf16-replicated", "disttrain bf16, replicated optimizer", "disttrain",
           {"compression": "bf16", "strategy": "allreduce", "shard": False}, "16bit"),
    # one bucket, so that every weight lies whole in a bucket and is compressed
    System("disttrain-powersgd", "disttrain PowerSGD r4", "disttrain",
           {"compression": "powersgd", "powersgd_rank": 4, "bucket_mb": 25.0, "lazy_gather": True}, "lowrank", rank=4),
    System("disttrain-powersgd-replicated", "disttrain PowerSGD r4, replicated optimizer", "disttrain",
           {"compression": "powersgd", "powersgd_rank": 4, "bucket_mb": 25.0, "strategy": "allreduce", "shard": False},
           "lowrank", rank=4),
    System("torch-ddp", "torch DDP (gloo)", "torch", {"hook": None}),
    System("torch-ddp-fp16", "torch DDP + fp16_compress_hook", "torch", {"hook": "fp16"}, "16bit"),
    System("torch-ddp-powersgd", "torch DDP + PowerSGD hook r4", "torch", {"hook": "powersgd", "rank": 4},
           "lowrank", rank=4),
)}
EXACT = "disttrain"  # the reference every loss is compared with
BASELINES = ("torch-ddp", "torch-ddp-fp16")  # every disttrain system's speed is given as a ratio to these


def parse_systems(text: str) -> list[System]:
    """Systems named in a comma-separated list, in that order ("all": every system). Raises ValueError
    naming an unknown one and listing the known ones."""
    names = list(SYSTEMS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise ValueError(f"unknown system(s) {unknown or text!r}; choose from: all, {', '.join(SYSTEMS)}")
    return [SYSTEMS[n] for n in names]


def gradient_wire_bytes(system: System, layers: tuple) -> int:
    """Bytes of one full gradient in the system's wire form, for an MLP with these layer widths."""
    total = 0
    for n_in, n_out in zip(layers[:-1], layers[1:]):
        weight = n_in * n_out
        if system.wire == "lowrank":
            weight = min(weight, (n_in + n_out) * min(system.rank, n_in, n_out))
        bytes_per_value = 2 if system.wire == "16bit" else 4
        total += bytes_per_value * weight + 4 * n_out  # biases: float32 (16-bit ones would be half: a floor)
    return total


def min_bytes_sent_per_host(system: System, layers: tuple, hosts: int) -> float:
    """A floor on the bytes each host must send per step: every other host needs this host's share of
    the combined gradient, (hosts - 1)/hosts of it, in the system's wire form. Far above the few KB of
    control traffic that cross when MPI silently uses shared memory between fake hosts."""
    wire = gradient_wire_bytes(system, layers)
    if system.wire == "16bit":
        wire -= 2 * sum(layers[1:])  # biases may travel in 16 bits too
    return (hosts - 1) / hosts * wire


class Unavailable(Exception):
    """This build cannot run the system (e.g. DataParallel rejects one of its options); the message says why."""
