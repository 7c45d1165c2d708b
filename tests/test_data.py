"""DataLoader and DistributedSampler: every iteration is a whole epoch from its first sample, except the
one right after load_state_dict, which continues at the saved sample; (features, labels) pairs as
datasets; the sampler's own iteration with drop_last."""

import numpy as np
import pytest

from disttrain.data import ArrayDataset, DataLoader, DistributedSampler


def _dataset(n=10):
    return ArrayDataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n))


def _labels(loader):
    return [labels.tolist() for _, labels in loader]


def _indices(sampler, batch_size):
    return [(indices.tolist(), count) for indices, count in sampler.batches(batch_size)]


# ------------------------------------------------------------------------------- epochs start at sample 0
def test_a_peek_does_not_make_the_next_loop_start_mid_epoch():
    loader = DataLoader(_dataset(), batch_size=4)
    assert next(iter(loader))[1].tolist() == [0, 1, 2, 3]
    assert next(iter(loader))[1].tolist() == [0, 1, 2, 3]
    assert _labels(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_loop_left_early_is_followed_by_a_whole_epoch_with_a_given_sampler():
    sampler = DistributedSampler(10, shuffle=True, seed=3)
    loader = DataLoader(_dataset(), batch_size=4, sampler=sampler)
    whole = _labels(loader)
    for _ in loader:
        break
    assert _labels(loader) == whole  # same epoch, from its start
    sampler.set_epoch(0)
    assert _labels(loader) == whole
    assert sampler.consumed == 10


def test_plain_loader_reshuffles_on_every_iteration_and_always_covers_the_dataset():
    loader = DataLoader(_dataset(12), batch_size=5, shuffle=True, seed=1)
    epochs = []
    for _ in range(3):
        next(iter(loader))  # a peek counts as an iteration: the next loop is a new, whole epoch
        epochs.append(sum(_labels(loader), []))
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_sampler_batches_start_at_sample_zero_on_every_call():
    sampler = DistributedSampler(9, 2, 1, shuffle=False)
    first = sampler.batches(4)
    next(first)
    assert sampler.consumed == 4
    assert _indices(sampler, 4) == [([2, 3], 4), ([6, 7], 4), ([], 1)]  # rank 0 takes the last one
    assert sampler.consumed == 9


# ----------------------------------------------------------------------------------- resuming
def _saved_after(batches_taken, n=23, batch_size=4, world=2, epoch=1):
    sampler = DistributedSampler(n, world, 0, seed=5)
    sampler.set_epoch(epoch)
    batches = sampler.batches(batch_size)
    for _ in range(batches_taken):
        next(batches)
    return sampler.state_dict()


def test_load_state_dict_continues_at_the_saved_sample_once():
    state = _saved_after(2)
    reference = DistributedSampler(23, 1, 0, seed=5)
    reference.set_epoch(1)
    whole = _indices(reference, 4)
    resumed = DistributedSampler(23, 1, 0, seed=5)
    resumed.load_state_dict(state)
    assert resumed.consumed == 8 and resumed.consumed < resumed.epoch_end(4)  # what the trainer checks
    resumed.set_epoch(1)  # the same epoch again keeps the loaded position
    assert _indices(resumed, 4) == whole[2:]
    assert _indices(resumed, 4) == whole  # one-shot: the next call is a whole epoch again


def test_resume_on_another_world_size_continues_at_the_exact_sample():
    state = _saved_after(3, world=2)
    reference = DistributedSampler(23, 1, 0, seed=5)
    reference.set_epoch(1)
    rest = _indices(reference, 4)[3:]
    parts = []
    for rank in range(3):
        sampler = DistributedSampler(23, 3, rank, seed=5)
        sampler.load_state_dict(state)
        parts.append(_indices(sampler, 4))
    merged = [(sum((parts[r][b][0] for r in range(3)), []), parts[0][b][1]) for b in range(len(rest))]
    assert merged == rest


def test_set_epoch_to_another_epoch_cancels_a_loaded_position():
    resumed = DistributedSampler(23, 1, 0, seed=5)
    resumed.load_state_dict(_saved_after(2))
    resumed.set_epoch(2)
    assert resumed.consumed == 0
    fresh = DistributedSampler(23, 1, 0, seed=5)
    fresh.set_epoch(2)
    assert _indices(resumed, 4) == _indices(fresh, 4)


def test_a_loaded_end_of_epoch_is_seen_before_iterating():
    finished = DistributedSampler(10, 1, 0)
    list(finished.batches(4))
    resumed = DistributedSampler(10, 1, 0)
    resumed.load_state_dict(finished.state_dict())
    assert resumed.consumed >= resumed.epoch_end(4)  # the trainer skips to the next epoch here
    resumed.set_epoch(1)
    assert sum(count for _, count in resumed.batches(4)) == 10


def test_loader_with_its_own_sampler_continues_a_loaded_position():
    loader = DataLoader(_dataset(), batch_size=4)
    batches = iter(loader)
    next(batches)
    state = loader.sampler.state_dict()
    resumed = DataLoader(_dataset(), batch_size=4)
    resumed.sampler.load_state_dict(state)
    assert _labels(resumed) == [[4, 5, 6, 7], [8, 9]]
    assert _labels(resumed) != [[4, 5, 6, 7], [8, 9]]  # afterwards whole epochs again


# ------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("wrap", [tuple, list], ids=["tuple", "list"])
def test_a_pair_of_arrays_becomes_an_array_dataset(wrap):
    features, labels = np.arange(12.0).reshape(6, 2), np.arange(6)
    loader = DataLoader(wrap([features, labels]), batch_size=4)
    assert isinstance(loader.dataset, ArrayDataset) and len(loader) == 2
    x, y = next(iter(loader))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, features[:4])
    np.testing.assert_array_equal(y, labels[:4])


def test_a_pair_of_arrays_of_different_lengths_or_not_a_pair_is_rejected():
    with pytest.raises(ValueError, match="rows"):
        DataLoader((np.zeros((4, 2)), np.zeros(3)), batch_size=2)
    with pytest.raises(ValueError, match="features, labels"):
        DataLoader((np.zeros((4, 2)), np.zeros(4), np.zeros(4)), batch_size=2)


# ---------------------------------------------------------------------- the sampler's own iteration
@pytest.mark.parametrize("n, world", [(10, 3), (10, 4), (7, 7), (5, 8), (12, 4)])
def test_sampler_iteration_with_drop_last_gives_every_rank_the_same_number_of_samples(n, world):
    samplers = [DistributedSampler(n, world, rank, seed=2, drop_last=True) for rank in range(world)]
    parts = [list(sampler) for sampler in samplers]
    assert [len(part) for part in parts] == [n // world] * world
    assert [len(sampler) for sampler in samplers] == [n // world] * world
    every = sum(parts, [])
    assert len(set(every)) == len(every)
    assert every == samplers[0].permutation()[:n // world * world].tolist()


def test_sampler_iteration_without_drop_last_covers_every_sample_once():
    parts = [list(DistributedSampler(10, 3, rank, seed=2)) for rank in range(3)]
    assert [len(part) for part in parts] == [4, 3, 3]
    assert sorted(sum(parts, [])) == list(range(10))
