"""The text data set (byte windows of a memory-mapped UTF-8 corpus, split by position) and the
RandomSampler that draws its windows identically for any number of ranks."""

import os
import sysconfig

import numpy as np
import pytest

from disttrain.config import load_config
from disttrain.datasets import DataError, load_data
from disttrain.datasets import text as text_data
from disttrain.random_sampler import RandomSampler


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTTRAIN_CACHE_DIR", str(tmp_path / "cache"))


def _section(**keys):
    config = load_config(None, ['data.name="text"'] + [f"data.{k}={v!r}".replace("'", '"') for k, v in keys.items()])
    return config["data"]


def _write(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------------------------- corpus
def test_a_file_is_split_by_position_into_training_and_validation_windows(tmp_path):
    content = bytes(range(32, 127)) * 20  # 1900 bytes
    path = _write(tmp_path / "one.txt", content)
    train, val, info = load_data(_section(path=str(path), val_fraction=0.25), block_size=8)
    split = int(1900 * 0.75)
    assert len(train) == split - 8 and info["classes"] == 256 and info["input_shape"] == (8,)
    x, y = train[np.array([0, 5, split - 9])]
    assert x.dtype == np.int64 and x.shape == (3, 8)
    assert bytes(x[1].astype(np.uint8)) == content[5:13] and bytes(y[1].astype(np.uint8)) == content[6:14]
    assert bytes(y[2].astype(np.uint8))[-1:] == content[split - 1:split]  # the last training byte, no further
    vx, vy = val[np.arange(len(val))]
    assert len(val) == (1900 - split - 1) // 8  # non-overlapping windows of the validation part
    assert bytes(vx[0].astype(np.uint8)) == content[split:split + 8]
    assert bytes(vx[1].astype(np.uint8)) == content[split + 8:split + 16]
    assert isinstance(train.tokens, np.memmap)


def test_a_folder_is_its_files_in_sorted_order_concatenated_once_into_a_cache(tmp_path):
    folder = tmp_path / "corpus"
    _write(folder / "b.txt", b"second file\n")
    _write(folder / "a" / "z.txt", "first é file\n".encode())
    _write(folder / ".hidden", b"never read")
    train, val, info = load_data(_section(path=str(folder), val_fraction=0.2), block_size=4)
    whole = "first é file\n".encode() + b"second file\n"
    assert bytes(np.asarray(train.tokens)) + bytes(np.asarray(val.tokens)) == whole
    cached = os.listdir(tmp_path / "cache")
    assert len(cached) == 1 and cached[0].startswith("text-") and not cached[0].endswith(".tmp")
    load_data(_section(path=str(folder), val_fraction=0.2), block_size=4)
    assert os.listdir(tmp_path / "cache") == cached  # found, not written again


def test_editing_a_file_of_a_folder_makes_a_new_cache(tmp_path):
    folder = tmp_path / "corpus"
    _write(folder / "a.txt", b"0123456789" * 3)
    _write(folder / "b.txt", b"abcdefghij" * 3)
    load_data(_section(path=str(folder)), block_size=4)
    _write(folder / "b.txt", b"ABCDEFGHIJ" * 4)
    train, val, _ = load_data(_section(path=str(folder)), block_size=4)
    assert len(os.listdir(tmp_path / "cache")) == 2
    assert bytes(np.asarray(val.tokens)).endswith(b"GHIJ")


def test_default_corpus_is_the_standard_library_python_files_found_at_run_time():
    train, val, info = load_data(_section(), block_size=128)
    folder = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py") and os.path.isfile(os.path.join(folder, f)))
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    assert len(train.tokens) + len(val.tokens) == total and len(val.tokens) == total - int(total * 0.9)
    with open(os.path.join(folder, files[0]), "rb") as handle:
        assert bytes(np.asarray(train.tokens[:100])) == handle.read(100)
    assert "standard library" in info["description"]


def test_eval_windows_spreads_that_many_windows_over_the_validation_text(tmp_path):
    path = _write(tmp_path / "t.txt", bytes(range(65, 91)) * 100)  # 2600 bytes
    _, val, _ = load_data(_section(path=str(path), val_fraction=0.5, eval_windows=5), block_size=10)
    assert len(val) == 5
    x, _ = val[np.arange(5)]
    starts = [val.stride * i for i in range(5)]
    assert starts[-1] + 11 <= 1300 and val.stride > 10
    np.testing.assert_array_equal(x[4], np.asarray(val.tokens[starts[4]:starts[4] + 10]))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing.txt"), r"data.path = .*missing.txt.*: no such file or folder"),
    (lambda tmp: str(_write(tmp / "bin.dat", b"ok \xff\xfe bad")), r"bin.dat is not UTF-8 text \(byte 3"),
    (lambda tmp: str(_write(tmp / "d" / "x.txt", b"fine") and _write(tmp / "d" / "y.txt", b"\xc3(") and tmp / "d"),
     r"y.txt is not UTF-8 text"),
    (lambda tmp: str(_write(tmp / "empty.txt", b"")), r"the text is empty"),
    (lambda tmp: str(_write(tmp / "short.txt", b"x" * 60)), r"validation part, 6 bytes\): fewer bytes than block_size"),
])
def test_unusable_text_is_a_data_error_naming_the_file_and_the_rule(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_data(_section(path=make(tmp_path)), block_size=8)


def test_a_multibyte_character_cut_at_the_spot_check_boundary_is_still_utf8(tmp_path, monkeypatch):
    monkeypatch.setattr(text_data, "SPOT_CHECK_BYTES", 5)
    path = _write(tmp_path / "t.txt", ("abcdé" * 40).encode())  # é is 2 bytes: the 5th byte cuts one
    train, _, _ = load_data(_section(path=str(path)), block_size=8)
    assert len(train) > 0


def test_window_indices_outside_the_set_are_an_index_error(tmp_path):
    path = _write(tmp_path / "t.txt", b"a" * 200)
    train, _, _ = load_data(_section(path=str(path)), block_size=8)
    with pytest.raises(IndexError, match=rf"out of range 0..{len(train) - 1}"):
        train[np.array([len(train)])]


# ------------------------------------------------------------------------------------------ sampler
def _epoch(sampler, batch):
    return [(indices.tolist(), count) for indices, count in sampler.batches(batch)]


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_n_ranks_draw_exactly_the_global_batches_of_one_process(ranks):
    one = _epoch(RandomSampler(1000, 1, 0, seed=3, samples_per_epoch=50), 8)
    parts = [_epoch(RandomSampler(1000, ranks, r, seed=3, samples_per_epoch=50), 8) for r in range(ranks)]
    assert len(one) == 7 and [count for _, count in one] == [8] * 6 + [2]
    for b, (indices, count) in enumerate(one):
        assert sum((part[b][0] for part in parts), []) == indices
        assert all(part[b][1] == count for part in parts)
        sizes = [len(part[b][0]) for part in parts]
        assert max(sizes) - min(sizes) <= 1


def test_an_epochs_batches_are_its_draws_in_order_whatever_the_batch_size():
    whole = list(RandomSampler(1000, 1, 0, seed=5, samples_per_epoch=50))  # the epoch as one batch
    assert len(set(whole)) > 1
    for batch in (1, 8, 13):
        batches = _epoch(RandomSampler(1000, 1, 0, seed=5, samples_per_epoch=50), batch)
        assert sum((indices for indices, _ in batches), []) == whole

def test_draws_are_uniform_seeded_and_differ_between_epochs_and_seeds():
    sampler = RandomSampler(10, seed=0, samples_per_epoch=100_000)
    counts = np.bincount(sampler.draws(0, 100_000), minlength=10)
    assert counts.min() > 9_600 and counts.max() < 10_400  # 4 sigma around 10,000
    first = sampler.draws(0, 20)
    np.testing.assert_array_equal(first, RandomSampler(10, seed=0, samples_per_epoch=100_000).draws(0, 20))
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.draws(0, 20), first)
    assert not np.array_equal(RandomSampler(10, seed=1, samples_per_epoch=20).draws(0, 20), first)


def test_a_resumed_sampler_continues_at_the_saved_draw_on_another_world_size():
    sampler = RandomSampler(500, 2, 0, seed=7, samples_per_epoch=40)
    batches = sampler.batches(6)
    next(batches), next(batches)
    state = sampler.state_dict()
    assert state["consumed"] == 12
    reference = _epoch(RandomSampler(500, 1, 0, seed=7, samples_per_epoch=40), 6)[2:]
    resumed = [RandomSampler(500, 3, r, seed=0, samples_per_epoch=40) for r in range(3)]
    for part in resumed:
        part.load_state_dict(state)
    continued = [_epoch(part, 6) for part in resumed]
    assert [sum((c[b][0] for c in continued), []) for b in range(len(reference))] == [i for i, _ in reference]
    assert _epoch(resumed[0], 6)[0][0] == _epoch(RandomSampler(500, 3, 0, seed=7, samples_per_epoch=40), 6)[0][0]


def test_sampler_state_of_another_data_set_is_refused():
    state = RandomSampler(500, seed=1, samples_per_epoch=40).state_dict()
    with pytest.raises(ValueError, match="dataset_len = 500, this sampler has 499"):
        RandomSampler(499, seed=1, samples_per_epoch=40).load_state_dict(state)


def test_an_epoch_of_the_text_sampler_covers_the_training_text_once_in_expectation(tmp_path):
    path = _write(tmp_path / "t.txt", b"x" * 10_000)
    train, _, _ = load_data(_section(path=str(path)), block_size=16)
    sampler = train.sampler(2, 1, seed=0)
    assert sampler.samples_per_epoch == -(-9_000 // 16) and sampler.dataset_len == len(train)
    assert sampler.num_batches(32) == -(-sampler.samples_per_epoch // 32)
    indices, count = next(sampler.batches(32))
    assert count == 32 and len(indices) == 16 and indices.max() < len(train)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset_len=0), "dataset_len must be an integer >= 1"),
    (dict(dataset_len=5, num_replicas=2, rank=2), r"rank must be in \[0, 2\)"),
    (dict(dataset_len=5, samples_per_epoch=0), "samples_per_epoch must be a positive integer"),
])
def test_sampler_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomSampler(**kwargs)
