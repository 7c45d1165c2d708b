"""Checkpoints: atomic, checksummed, sharded on save, resharded on load to any world size.

A checkpoint is a directory `step-XXXXXXXX/` holding plain numpy files and a JSON manifest (no pickle:
opening a checkpoint never runs code):

    model.npz                 every parameter and buffer by name (written by rank 0)
    optimizer-part-RRRRR.npz  optimizer state arrays written by rank R, each a segment of one
                              parameter's flattened elements [start, stop)
    compression-part-RRRRR.npz  rank R's gradient-compression state (PowerSGD's error feedback and
                              warm-start Q per compressed parameter), when the run compresses
    manifest.json             format, step, world size, versions, config, sampler/scheduler/RNG state,
                              sha256 and size of every file, and the optimizer: class, hyperparameters,
                              each stateful parameter's scalars (Adam's step) and the segment table;
                              the compression method and each rank's table of its state arrays

The segment table keys state by parameter name and element range, never by "rank i's state", so a
checkpoint written by N ranks loads on M. Compression state is per rank: it reloads exactly on the
same world size; on another, rank 0 takes the sum of the saved error feedback (distributed/powersgd.py). Saving writes into `.partial-step-XXXXXXXX/`, fsyncs every
file, writes the manifest last, renames the directory, and only then moves the `latest` pointer: a
checkpoint is either complete and pointed to, or ignored.

files.py holds the names, checksums and lookups; writer.py saving; reader.py loading and export.
What goes into the optimizer state is the optimizer's own business (distributed/shard_state.py).
"""

from .files import (FORMAT, FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, candidates, list_checkpoints,
                    read_manifest, step_dirname, verify_files)
from .reader import (SegmentReader, check_compatible, consolidated_optimizer_state, load, read_model,
                     read_optimizer_state, saved_compression_state, saved_optimizer_state)
from .writer import probe, save

__all__ = ["FORMAT", "FORMAT_VERSION", "LATEST", "MANIFEST", "CheckpointError", "candidates", "list_checkpoints",
           "read_manifest", "step_dirname", "verify_files", "SegmentReader", "check_compatible",
           "consolidated_optimizer_state", "load", "read_model", "read_optimizer_state", "saved_compression_state",
           "saved_optimizer_state",
           "probe", "save"]
