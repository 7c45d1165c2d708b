"""pytest fixtures for tests that run across fake hosts (scripts/fakehosts), and output helpers.

In a test module:  `from fakehosts_fixture import fake_hosts, make_fake_hosts  # noqa: F401`
`fake_hosts` is a FakeHosts with 2 hosts; `make_fake_hosts(n_hosts, **kwargs)` makes more. Each is torn
down after its test, pass or fail. Tests using them skip, with the reason, where the machine does not
allow network namespaces (not root, no iproute2, namespaces refused).
"""

from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts", "fakehosts"))

import fakehosts  # noqa: E402


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why fake hosts cannot run here (asked once per session), or None. As root on a fresh Debian
    machine (CI) the missing iproute2 is installed first."""
    return fakehosts.preflight(install=True)


@pytest.fixture
def make_fake_hosts():
    """A factory `make(n_hosts=2, **FakeHosts kwargs) -> FakeHosts`; all are closed after the test."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made = []

    def make(n_hosts: int = 2, **kwargs) -> fakehosts.FakeHosts:
        made.append(fakehosts.FakeHosts(n_hosts, **kwargs))
        return made[-1]

    yield make
    for hosts in made:
        hosts.close()


@pytest.fixture
def fake_hosts(make_fake_hosts) -> fakehosts.FakeHosts:
    """Two fake hosts, torn down after the test."""
    return make_fake_hosts(2)


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> str:
    """Read the (bytes) stdout of `process` until a line equal to `marker` arrives; return all read so far.
    Fails the test when the process ends or `timeout` s pass first."""
    output = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in output.splitlines():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no {marker!r} line after {timeout} s; output so far:\n{output.decode(errors='replace')}")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"ended (exit {process.wait()}) before {marker!r}:\n{output.decode(errors='replace')}")
            output += chunk
    return output.decode(errors="replace")


def json_line(output: str) -> dict:
    """The first line of `output` that is a JSON object."""
    for line in output.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{output}")
