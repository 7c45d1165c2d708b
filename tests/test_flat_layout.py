"""FlatLayout: how the flat parameter buffer splits into buckets and each bucket into per-rank chunks.

The rule: every bucket splits into `world_size` equal chunks of (bucket length / world size)
elements, and rank r owns chunk r of every bucket. The last bucket is usually shorter than the others
(the buffer's length is rarely a multiple of the bucket length), so its chunks are shorter too: a
layout that took every bucket's chunk size from the first bucket would hand out ranges that overlap
the next bucket or run past the buffer, and some elements would be owned twice and others never.
"""

import numpy as np
import pytest

from disttrain.distributed import FlatLayout

BUCKET_ELEMENTS = 192  # a multiple of 2 and 3 times any power-of-two alignment up to 32 elements


def _named(sizes):
    return [(f"p{i}", (size,)) for i, size in enumerate(sizes)]


def _assert_chunking(layout, world_size):
    """Each bucket is covered exactly once by the ranks' ranges, rank r holding chunk r of length
    (bucket length / world size); the buckets tile the buffer and hold every parameter element."""
    buckets = layout.buckets
    assert buckets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(buckets, buckets[1:])), buckets
    assert buckets[-1][1] == layout.padded_total >= layout.total
    owned = [layout.owned_ranges(rank) for rank in range(world_size)]
    assert all(len(ranges) == len(buckets) for ranges in owned)
    for b, (lo, hi) in enumerate(buckets):
        assert (hi - lo) % world_size == 0, f"bucket {b} [{lo}, {hi}) does not split into {world_size} chunks"
        chunk = (hi - lo) // world_size
        times_owned = np.zeros(hi - lo, np.int64)
        for rank in range(world_size):
            start, stop = owned[rank][b]
            assert stop - start == chunk, f"rank {rank}, bucket {b} [{lo}, {hi}): range {(start, stop)}"
            assert (start, stop) == (lo + rank * chunk, lo + (rank + 1) * chunk)
            assert lo <= start <= stop <= hi, f"rank {rank}'s range {(start, stop)} leaves bucket [{lo}, {hi})"
            times_owned[start - lo:stop - lo] += 1
        assert np.all(times_owned == 1), f"bucket {b} [{lo}, {hi}): elements owned {times_owned.tolist()} times"
    for rank in range(world_size):
        assert sum(stop - start for start, stop in owned[rank]) == layout.shard_size()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("sizes", [[150, 50], [7, 300, 1, 193]], ids=["two-buckets", "three-buckets"])
def test_a_shorter_last_bucket_is_split_into_chunks_of_its_own_length(world_size, sizes):
    layout = FlatLayout(_named(sizes), world_size, BUCKET_ELEMENTS)
    lengths = [hi - lo for lo, hi in layout.buckets]
    # the case under test: equal buckets, then a shorter last one
    assert len(lengths) >= 2 and lengths[-1] < lengths[0] and len(set(lengths[:-1])) == 1, lengths
    _assert_chunking(layout, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_every_layout_splits_every_bucket_exactly_once_among_the_ranks(world_size):
    rng = np.random.default_rng(world_size)
    for _ in range(40):
        sizes = rng.integers(1, 400, rng.integers(1, 6)).tolist()
        bucket_elements = int(rng.integers(1, 700))
        layout = FlatLayout(_named(sizes), world_size, bucket_elements)
        assert layout.total == sum(sizes)
        _assert_chunking(layout, world_size)
