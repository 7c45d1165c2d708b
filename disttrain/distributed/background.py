"""A background thread that runs collectives in the order they were handed to it, while the main
thread goes on computing (numpy and BLAS release the GIL; MPIComm polls politely off the main thread).

It is how gradient buckets are combined during backward: the main thread submits a bucket's job as
soon as backward has produced every gradient in it, and waits for all jobs before the optimizer reads
them. Jobs must use a communicator of their own (Communicator.dup()): MPI matches collectives on one
communicator by order, and the main thread's own collectives go on the world's.
"""

from __future__ import annotations

import queue
import threading


class Job:
    """One submitted callable; `wait()` blocks until it has run and re-raises what it raised."""

    def __init__(self, work, name: str):
        self.work, self.name = work, name
        self.done = threading.Event()
        self.error = None

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class BackgroundThread:
    """A daemon thread running submitted jobs one at a time, first in first out. Start it with the
    first submit(); jobs submitted by one thread run in that thread's order."""

    def __init__(self, name: str = "disttrain-comm"):
        self.name = name
        self._queue = queue.SimpleQueue()
        self._thread = None

    def submit(self, work, name: str = "job") -> Job:
        """Run `work()` on the background thread after every job submitted before it; returns its Job."""
        job = Job(work, name)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job.work()
            except BaseException as error:  # handed to the waiting thread, which raises it
                job.error = error
            finally:
                job.done.set()
