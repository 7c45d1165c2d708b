"""A byte-level text data set: windows of consecutive bytes of a UTF-8 corpus, memory-mapped.

The corpus is `data.path` (one file, or every non-hidden file under a folder, sorted by relative
path) or, by default, the `.py` files directly in this Python's standard library folder
(`sysconfig.get_paths()["stdlib"]`, about 4.7 MB for Python 3.11), found at run time: no download and
no file shipped. Tokens are the bytes themselves (vocabulary 256). The first 1 - data.val_fraction of
the bytes train, the rest validate (a split by position, so no window straddles the two).

Memory: one file is memory-mapped as it is. Several files are concatenated once into a cache file
(DISTTRAIN_CACHE_DIR, default ~/.cache/disttrain, named by a digest of the paths, sizes and
modification times) that is then memory-mapped: one map instead of one per file, and a window can
run across a file boundary. Every rank that finds no cache writes it to a temporary file and renames it
into place (atomic; ranks racing write the same bytes), so no rank waits for another. After that a
rank reads only the pages of the windows it uses. Every file is checked to be UTF-8 when the cache is
written; a single mapped file is spot-checked (its first MiB).

Samples: training sample i is the window starting at byte i (every start is a sample); a random
window sampler (sampler.py) draws them. Validation uses a fixed set of windows: non-overlapping ones
from the start of the validation text, or data.eval_windows of them spread evenly over it.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile

import numpy as np

from . import DataError

VOCAB = 256
SPOT_CHECK_BYTES = 1 << 20


class TextWindows:
    """`count` windows of a 1-D uint8 token array: sample i is (x, y) with x = tokens[s:s + T] and
    y = tokens[s + 1:s + T + 1] (the next byte of each position), s = i * stride, T = block_size.
    Indexing with an array of sample indices gives int64 arrays (n, T); only those windows are read."""

    task = "language_model"

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int = 1, count: int | None = None,
                 name: str = "text"):
        if len(tokens) < block_size + 1:
            raise DataError(f"{name}: {len(tokens)} bytes is fewer than block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.stride, self.name = tokens, int(block_size), int(stride), name
        most = (len(tokens) - block_size - 1) // self.stride + 1
        self.count = most if count is None else min(int(count), most)
        self.samples_per_epoch = -(-len(tokens) // block_size)  # windows that cover the text once

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, indices):
        starts = np.asarray(indices, dtype=np.int64).reshape(-1) * self.stride
        if starts.size and (starts.min() < 0 or starts.max() > (self.count - 1) * self.stride):
            raise IndexError(f"{self.name}: window index out of range 0..{self.count - 1}")
        rows = np.lib.stride_tricks.sliding_window_view(self.tokens, self.block_size + 1)[starts]
        rows = rows.astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    @property
    def sample_shape(self) -> tuple:
        return (self.block_size,)

    def sampler(self, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        """The RandomSampler that draws this set's windows, `samples_per_epoch` to an epoch."""
        from ..random_sampler import RandomSampler
        return RandomSampler(len(self), num_replicas, rank, seed, self.samples_per_epoch)


def load(section: dict, comm=None, block_size: int = 128):
    """(train, validation, info) for the [data] section: TextWindows over the memory-mapped corpus.
    With `comm` (COLLECTIVE), the ranks check that they all read the same corpus."""
    files, source = corpus_files(section["path"])
    tokens = open_corpus(files, source)
    if comm is not None and comm.size > 1:
        mine = (len(tokens), fingerprint(files, section["path"]))
        seen = comm.allgather_object(mine)
        if any(other != mine for other in seen):
            raise DataError(f"{source}: the ranks read different text (bytes, digest of names and sizes: "
                            f"{sorted(set(seen))}); every rank must see the same files")
    split = int(len(tokens) * (1.0 - section["val_fraction"]))
    train = TextWindows(tokens[:split], block_size, name=f"{source} (training part, {split:,} bytes)")
    val_tokens = tokens[split:]
    name = f"{source} (validation part, {len(val_tokens):,} bytes)"
    if len(val_tokens) < block_size + 1:
        raise DataError(f"{name}: fewer bytes than block_size + 1 = {block_size + 1}; raise data.val_fraction "
                        f"or lower model.block_size")
    stride, wanted = block_size, section["eval_windows"]
    if 1 < wanted < (len(val_tokens) - 1) // block_size:  # fewer than the non-overlapping windows: spread out
        stride = (len(val_tokens) - block_size - 1) // (wanted - 1)
    validation = TextWindows(val_tokens, block_size, stride, wanted or None, name=name)
    info = {"input_shape": (block_size,), "classes": VOCAB, "task": "language_model",
            "description": f"text {source}: {len(files)} file(s), {len(tokens):,} bytes; {split:,} train, "
                           f"{len(validation)} validation windows of {block_size}"}
    return train, validation, info


def corpus_files(path: str) -> tuple:
    """(sorted list of files, a name for messages) for data.path, or for the stdlib default when empty."""
    if not path:
        folder = sysconfig.get_paths()["stdlib"]
        files = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                       if name.endswith(".py") and os.path.isfile(os.path.join(folder, name)))
        if not files:
            raise DataError(f"the Python standard library folder {folder} holds no .py files; set data.path")
        return files, f"the Python standard library ({folder}/*.py)"
    if os.path.isfile(path):
        return [path], path
    if not os.path.isdir(path):
        raise DataError(f"data.path = {path!r}: no such file or folder")
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, name) for name in names if not name.startswith(".")]
    files = sorted(files, key=lambda f: os.path.relpath(f, path))
    if not files:
        raise DataError(f"data.path = {path!r}: the folder holds no (non-hidden) files")
    return files, path


def open_corpus(files: list, source: str) -> np.ndarray:
    """A read-only uint8 memory map of the files' bytes back to back (the file itself for one file,
    else a cache file named by the files' paths, sizes and modification times)."""
    listing = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    if sum(size for _, size, _ in listing) == 0:
        raise DataError(f"{source}: the text is empty")
    if len(files) == 1:
        check_utf8_start(files[0])
        return np.memmap(files[0], dtype=np.uint8, mode="r")
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:24]
    cache = os.path.join(cache_dir(), f"text-{digest}.u8")
    if not os.path.exists(cache):
        write_concatenated(files, cache)
    return np.memmap(cache, dtype=np.uint8, mode="r")


def fingerprint(files: list, root: str) -> str:
    """A digest of the files' names (relative to `root`, or base names) and sizes: equal on two
    machines that hold the same corpus in different places."""
    names = [os.path.relpath(f, root) if root and os.path.isdir(root) else os.path.basename(f) for f in files]
    return hashlib.sha256(repr([(n, os.path.getsize(f)) for n, f in zip(names, files)]).encode()).hexdigest()[:16]


def cache_dir() -> str:
    """Where concatenated corpora are cached: $DISTTRAIN_CACHE_DIR, else ~/.cache/disttrain."""
    return os.environ.get("DISTTRAIN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "disttrain")


def write_concatenated(files: list, target: str) -> None:
    """Write the files' bytes back to back to `target`, atomically (temporary file, then rename);
    raise DataError naming a file that is not UTF-8."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".text-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            for name in files:
                with open(name, "rb") as source:
                    content = source.read()
                check_utf8(content, name)
                out.write(content)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_utf8(content: bytes, name: str, cut_ok: bool = False) -> None:
    """Raise DataError unless `content` is UTF-8 (with cut_ok, a character cut off at the end is fine)."""
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        if cut_ok and error.reason == "unexpected end of data":
            return
        raise DataError(f"{name} is not UTF-8 text (byte {error.start}: {error.reason}); the text data set "
                        f"reads UTF-8 files only") from None


def check_utf8_start(name: str) -> None:
    """Spot-check that the first MiB of `name` is UTF-8."""
    with open(name, "rb") as source:
        check_utf8(source.read(SPOT_CHECK_BYTES), name, cut_ok=True)
