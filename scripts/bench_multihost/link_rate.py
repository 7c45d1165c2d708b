"""Measure the rate one TCP stream reaches from host 0 to host 1; run under mpiexec, 1 rank on each.

    mpiexec -hosts H0,H1 -n 2 python scripts/bench_multihost/link_rate.py --seconds 2

Rank 1 listens on its host's address, rank 0 connects and sends 1 MiB chunks for --seconds; rank 1
counts the bytes from the first to the last it received, and reads its host's eth0 counters
(/proc/net/dev of its network namespace) around the transfer, so the rate on the wire (headers
included) is known too. Rank 0 prints one JSON line: {"payload_gbit_s", "wire_gbit_s", "seconds",
"payload_bytes", "wire_bytes", "receiver_address"}. This is what a shaped link really carries, whatever tc was told.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from disttrain.distributed import init  # noqa: E402
from netdev import eth0_bytes  # noqa: E402

CHUNK = 1 << 20
PORT = 29431


def receive(listener: socket.socket) -> tuple[int, float, int]:
    """Accept one connection and read it to the end; (payload bytes, seconds from the first to the last
    byte, bytes eth0 received meanwhile: the payload plus TCP/IP headers)."""
    before = eth0_bytes()
    connection, _ = listener.accept()
    buffer = bytearray(CHUNK)
    total, first, last = 0, None, None
    with connection:
        while True:
            count = connection.recv_into(buffer)
            if not count:
                break
            last = time.perf_counter()
            first = first or last
            total += count
    return total, (last - first) if total else 0.0, eth0_bytes()[0] - before[0]


def send(address: str, seconds: float) -> int:
    """Connect to address:PORT and send for `seconds`; the payload bytes handed to the socket."""
    payload = memoryview(bytearray(os.urandom(CHUNK)))
    total = 0
    with socket.create_connection((address, PORT), timeout=60) as connection:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            connection.sendall(payload)
            total += CHUNK
    return total


def main(argv=None) -> int:
    """Parse arguments, measure, print the JSON line on rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="how long rank 0 sends")
    args = parser.parse_args(argv)
    comm = init()
    if comm.size != 2:
        raise SystemExit(f"link_rate.py needs exactly 2 ranks (one per host), got {comm.size}")
    listener = None
    if comm.rank == 1:
        listener = socket.create_server(("", PORT), reuse_port=False)
    address = comm.broadcast_object(socket.gethostbyname(socket.gethostname()) if comm.rank == 1 else None, root=1)
    comm.barrier()
    if comm.rank == 1:
        received, seconds, wire = receive(listener)
        listener.close()
        result = {"payload_bytes": received, "seconds": seconds, "wire_bytes": wire}
    else:
        result = {"sent_payload_bytes": send(address, args.seconds)}
    got = comm.allgather_object(result)[1]
    if comm.rank == 0:
        seconds = got["seconds"] or float("nan")
        print(json.dumps({**got, "payload_gbit_s": got["payload_bytes"] * 8e-9 / seconds,
                          "wire_gbit_s": got["wire_bytes"] * 8e-9 / seconds, "receiver_address": address}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
