"""Find every process of a job by a tag in its environment (for the fault tests and the soak run).

Every process started with DISTTRAIN_TEST_TAG=<tag> in its environment - mpiexec, hydra's proxy, the
ranks - passes it on, so a job's processes can be found (and stray ones detected) by reading /proc,
without relying on command lines (hydra's proxy does not carry the job's arguments). Linux only.
"""

from __future__ import annotations

import os

TAG = "DISTTRAIN_TEST_TAG"


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:  # gone, or not ours to read
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def tagged_processes(tag: str) -> dict:
    """{pid: environment} of the live processes (this one excepted) whose environment carries TAG=tag."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            env = _environ(int(name))
            if env.get(TAG) == tag and not _is_zombie(int(name)):
                found[int(name)] = env
    return found
