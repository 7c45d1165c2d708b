"""The byte counters of this network namespace's eth0, read from /proc/net/dev (per network namespace,
so a process on a fake host sees its own host's link)."""

from __future__ import annotations

INTERFACE = "eth0"


def eth0_bytes(interface: str = INTERFACE) -> tuple[int, int]:
    """(received, sent) bytes of `interface` since it was created; (0, 0) when there is no such
    interface (a process outside the fake hosts)."""
    with open("/proc/net/dev") as handle:
        for line in handle:
            name, _, counters = line.partition(":")
            if name.strip() == interface:
                fields = counters.split()
                return int(fields[0]), int(fields[8])
    return 0, 0
