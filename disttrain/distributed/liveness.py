"""Heartbeats: every rank learns within seconds that a peer process died, was stopped (SIGSTOP), or
became unreachable, without waiting on a collective (a collective with a gone peer never returns, and
some launchers never end such a job: `srun` without --kill-on-bad-exit, any launcher for a stopped rank).

A star, so that one rank sees everyone: every rank sends rank 0 a short message every `period` seconds
and rank 0 sends one to every rank. A message is the sender's state in words (`step 8, waiting in
'allreduce' for 3.1 s`), so rank 0 can name what each rank was doing, and which ranks are not in the
collective that the others wait in. The watchdog thread sends and receives them, with non-blocking
point-to-point messages (MPI_Isend/Irecv completed by MPI_Test) on a communicator of their own: a
heartbeat never waits for anything, and costs two small messages per rank and period. A stopped or
dead process sends nothing: its heartbeat thread stops with it.
"""

from __future__ import annotations

import time

import numpy as np

MESSAGE_BYTES = 160
_TAG = 17


class Heartbeats:
    """Heartbeats between this rank and its peers (rank 0: every other rank; others: rank 0).

    COLLECTIVE to construct (it duplicates `comm`, which must be an MPI communicator whose threads_ok
    is true: `beat()` runs on another thread than the main one). Then only the watchdog thread calls
    beat(), silent() and last_state(); close() after that thread has stopped.
    """

    def __init__(self, comm):
        self.comm = comm.dup()
        self.comm.raise_on_errors()
        self.rank = comm.rank
        self.peers = list(range(1, comm.size)) if comm.rank == 0 else [0]
        now = time.monotonic()
        self.heard = {peer: now for peer in self.peers}  # when each peer was last heard from
        self.states = {peer: "" for peer in self.peers}
        self.failure = {}  # peer -> the MPI error that talking to it raised
        self._inbox = {peer: np.zeros(MESSAGE_BYTES, np.uint8) for peer in self.peers}
        self._receiving = {peer: self.comm.receive_nowait(self._inbox[peer], peer, _TAG) for peer in self.peers}
        self._outbox = {peer: np.zeros(MESSAGE_BYTES, np.uint8) for peer in self.peers}
        self._sending = {peer: None for peer in self.peers}

    def beat(self, state: str) -> None:
        """Take in what the peers sent, then send each peer `state` (a short text; cut to fit), unless
        its previous heartbeat has not left yet (a stopped peer takes none: nothing piles up)."""
        for peer in self.peers:
            if peer in self.failure:
                continue
            try:
                self._receive(peer)
                self._send(peer, state)
            except Exception as error:  # MPI.Exception: the peer's connection is gone
                self.failure[peer] = f"{type(error).__name__}: {error}"

    def silent(self, limit: float) -> list:
        """[(peer, seconds since it was last heard)] of the peers silent for more than `limit` seconds
        or unreachable (an MPI error), the longest silent first."""
        now = time.monotonic()
        found = [(peer, now - heard) for peer, heard in self.heard.items()
                 if now - heard > limit or peer in self.failure]
        return sorted(found, key=lambda item: -item[1])

    def last_state(self, peer: int) -> str:
        """What `peer` last said it was doing, and how long ago ('' if never heard)."""
        state = self.states.get(peer, "")
        ago = time.monotonic() - self.heard[peer]
        if peer in self.failure:
            return f"unreachable: {self.failure[peer]}; last heard {ago:.1f} s ago: {state or 'nothing'}"
        return f"{state} ({ago:.1f} s ago)" if state else f"never heard ({ago:.1f} s)"

    def close(self) -> None:
        """Cancel the receives still posted and drop unfinished sends (the peers may have stopped)."""
        for peer, request in self._receiving.items():
            try:
                if not request.Test():
                    request.Cancel()
                    request.Wait()
            except Exception:  # a peer that failed: nothing left to tidy
                pass
        deadline = time.monotonic() + 1.0
        for request in self._sending.values():
            try:
                while request is not None and not request.Test() and time.monotonic() < deadline:
                    time.sleep(0.01)
            except Exception:
                pass

    def _receive(self, peer: int) -> None:
        while self._receiving[peer].Test():  # several may be waiting: keep the newest
            self.heard[peer] = time.monotonic()
            raw = self._inbox[peer].tobytes().split(b"\0", 1)[0]
            self.states[peer] = raw.decode(errors="replace")
            self._receiving[peer] = self.comm.receive_nowait(self._inbox[peer], peer, _TAG)

    def _send(self, peer: int, state: str) -> None:
        if self._sending[peer] is not None and not self._sending[peer].Test():
            return
        data = state.encode()[:MESSAGE_BYTES - 1]
        outbox = self._outbox[peer]
        outbox[:] = 0
        outbox[:len(data)] = np.frombuffer(data, np.uint8)
        self._sending[peer] = self.comm.send_nowait(outbox, peer, _TAG)
