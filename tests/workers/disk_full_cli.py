"""Run under mpiexec: the `disttrain` CLI in-process, with one kind of write failing as on a full disk.

argv: MODE CLI-ARGS..., MODE one of
  savez:R       every np.savez on rank R raises OSError(ENOSPC) (its checkpoint files)
  metrics:N     on rank 0, the N-th write to metrics.jsonl and every later one raise OSError(ENOSPC)
"""

import errno
import io
import os
import sys

import numpy as np

import disttrain.progress
from disttrain import cli

mode, argument = sys.argv[1].split(":")
rank = int(os.environ.get("PMI_RANK", "0"))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingFile(io.TextIOWrapper):
    """A text file whose writes fail from the N-th on, as on a disk that has just filled up."""

    writes = 0

    def write(self, text):
        FillingFile.writes += 1
        if FillingFile.writes >= int(argument):
            disk_full()
        return super().write(text)


if mode == "savez" and rank == int(argument):
    np.savez = disk_full
if mode == "metrics" and rank == 0:
    disttrain.progress.open = lambda path, how="r": FillingFile(open(path, how + "b" if "b" not in how else how))
sys.exit(cli.main(sys.argv[2:]))
