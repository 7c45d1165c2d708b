"""PowerSGD's local pieces (disttrain/distributed/powersgd.py), in one process: which parameters it
compresses, Gram-Schmidt, and the fused finish (error feedback and reconstruction). Across ranks:
tests/test_compression.py."""

import numpy as np
import pytest

from disttrain.distributed import FlatLayout
from disttrain.distributed import powersgd
from disttrain.distributed.powersgd import PowerSGD, finish, initial_q, orthonormalise_rows


def test_only_whole_matrices_whose_factors_are_smaller_are_compressed():
    layout = FlatLayout([("a", (40, 30)), ("bias", (30,)), ("conv", (8, 3, 3, 3)), ("thin", (40, 2)),
                         ("straddles", (50, 40))], 2, 1600)
    compressor = PowerSGD(layout, 2)
    # thin: 2 (40 + 2) >= 80; straddles: flat 1526..3526 crosses the bucket edges at 1600 and 3200
    assert sorted(compressor.matrices) == ["a", "conv"]
    assert (compressor.matrices["conv"].rows, compressor.matrices["conv"].cols) == (8, 27)
    first = compressor.buckets[0]
    assert [m.name for m in first.matrices] == ["a", "conv"]
    assert first.exact == [(1200, 1230), (1446, 1600)]  # the bias, then thin and the start of straddles
    covered = sum(m.rows * m.cols for m in first.matrices) + sum(b - a for a, b in first.exact)
    assert covered == 1600  # every element of the bucket travels one way or the other
    assert np.array_equal(compressor.matrices["a"].q, initial_q("a", 2, 30))


def test_initial_q_depends_on_the_parameter_name_only():
    assert np.array_equal(initial_q("w", 3, 7), initial_q("w", 3, 7))
    assert not np.array_equal(initial_q("w", 3, 7), initial_q("v", 3, 7))
    assert initial_q("w", 3, 7).dtype == np.float32


def test_gram_schmidt_gives_orthonormal_rows_spanning_the_same_space():
    p = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32) * 1e-22  # squares underflow float32
    original = p.astype(np.float64)
    orthonormalise_rows(p)
    np.testing.assert_allclose(p @ p.T, np.eye(4), atol=1e-5)
    projected = original @ p.T.astype(np.float64) @ p.astype(np.float64)
    np.testing.assert_allclose(projected, original, rtol=0, atol=1e-5 * np.abs(original).max())


def test_gram_schmidt_zeroes_a_dependent_row_and_keeps_zero_and_nan_rows():
    rng = np.random.default_rng(1)
    p = rng.standard_normal((5, 200)).astype(np.float32)
    p[2] = 0.5 * p[0] - 2.0 * p[1]  # in the span of the rows before it
    p[3] = 0.0
    p[4, 7] = np.nan
    orthonormalise_rows(p)
    assert not p[2].any() and not p[3].any()
    assert np.isnan(p[4]).any()
    np.testing.assert_allclose(p[:2] @ p[:2].T, np.eye(2), atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 300, 70), (1, 9, 5), (3, 40, 1000)])
def test_finish_gives_the_same_bits_with_numba_and_numpy_and_follows_its_definition(shape, monkeypatch):
    pytest.importorskip("numba", reason="numba not installed: only the numpy path exists here")
    rank, rows, cols = shape
    rng = np.random.default_rng(2)
    p, q_local, q = (rng.standard_normal((rank, n)).astype(np.float32) for n in (rows, cols, cols))
    grad = rng.standard_normal((rows, cols)).astype(np.float32)
    monkeypatch.setattr(powersgd, "NUMBA_MIN_ELEMENTS", 0)
    monkeypatch.setattr(powersgd, "ROW_CHUNK_ELEMENTS", 1000)  # several row chunks on the numpy path
    results = []
    for kernel in (powersgd._compile(), False):
        monkeypatch.setattr(powersgd, "_kernels", kernel)
        combined, error = grad.copy(), np.empty_like(grad)
        finish(combined, error, p, q_local, q)
        results.append((combined, error))
    (combined_a, error_a), (combined_b, error_b) = results
    assert np.array_equal(combined_a, combined_b) and np.array_equal(error_a, error_b)
    p64 = p.astype(np.float64)
    np.testing.assert_allclose(combined_a, p64.T @ q, rtol=0, atol=1e-5 * rank)
    np.testing.assert_allclose(error_a, grad - p64.T @ q_local, rtol=0, atol=1e-5 * rank)
