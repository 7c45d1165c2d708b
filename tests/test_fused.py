"""The fused optimizer updates: the numba kernels and the chunked numpy path give the same bits, and
both follow the seed's update rules (checked against a float64 reference in test_optim.py)."""

import numpy as np
import pytest

from disttrain import fused

numba = pytest.importorskip("numba", reason="numba not installed: only the numpy path exists here")


def _arrays(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(4)]


def _both_paths(update, arrays, c, monkeypatch):
    """Run `update` on copies of `arrays` with numba, then with numpy; return both results."""
    monkeypatch.setattr(fused, "NUMBA_MIN_ELEMENTS", 0)  # these arrays are small: force the kernels
    results = []
    for kernels in (fused._compile(), False):
        monkeypatch.setattr(fused, "_kernels", kernels)
        copies = [a.copy() for a in arrays]
        update(*copies, c)
        results.append(copies)
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decoupled,decay", [(False, 0.0), (False, 0.01), (True, 0.01)])
def test_adam_numba_kernel_and_numpy_path_give_identical_bits(dtype, decoupled, decay, monkeypatch):
    n = fused.CHUNK_ELEMENTS * 2 + 123  # several chunks and a ragged end
    p, g, m, v = _arrays(n, dtype)
    v = np.abs(v)
    lr, b1, b2, t = 1e-3, 0.9, 0.999, 7
    c = fused.constants(dtype, l2=0.0 if decoupled else decay, decay_factor=1.0 - lr * decay if decoupled else 1.0,
                        b1=b1, one_minus_b1=1 - b1, b2=b2, one_minus_b2=1 - b2, lr=lr,
                        correction1=1 - b1 ** t, correction2=1 - b2 ** t, eps=1e-8)
    with_numba, with_numpy = _both_paths(fused.adam_update, [p, g, m, v], c, monkeypatch)
    for name, a, b in zip("pgmv", with_numba, with_numpy):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(with_numba[0], p)  # the update did something


@pytest.mark.parametrize("momentum,decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-3)])
def test_sgd_numba_kernel_and_numpy_path_give_identical_bits(momentum, decay, monkeypatch):
    p, g, u, _ = _arrays(fused.CHUNK_ELEMENTS + 77, np.float32, seed=1)
    c = fused.constants(np.float32, momentum=momentum, one_minus_momentum=1 - momentum,
                        decay_factor=1 - 0.1 * decay, lr=0.1)
    update = (lambda p_, g_, u_, c_: fused.sgd_update(p_, g_, u_ if momentum else None, c_))
    with_numba, with_numpy = _both_paths(update, [p, g, u], c, monkeypatch)
    for name, a, b in zip("pgu", with_numba, with_numpy):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(with_numba[0], p)


def test_only_large_updates_take_the_numba_kernels(monkeypatch):
    calls = []
    kernels = fused._compile()
    spy = dict(kernels, sgd_plain=lambda *args: calls.append(args[0].size) or kernels["sgd_plain"](*args))
    monkeypatch.setattr(fused, "_kernels", spy)
    c = fused.constants(np.float32, momentum=0.0, one_minus_momentum=1.0, decay_factor=1.0, lr=0.1)
    for n in (fused.NUMBA_MIN_ELEMENTS - 1, fused.NUMBA_MIN_ELEMENTS):
        p, g, _, _ = _arrays(n, np.float32)
        fused.sgd_update(p, g, None, c)
    assert calls == [fused.NUMBA_MIN_ELEMENTS]
