"""The sliding-window loops of conv2d and max_pool2d (disttrain/ops/windows.py): the numba kernels and
the numpy fallback give the same bits, on every shape the ops accept, and both equal direct loops."""

import itertools

import numpy as np
import pytest

from disttrain.ops import windows

numba = pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed: only the numpy path exists")


def run(path, function, *args, **kwargs):
    """Call a windows function with the numba kernels forced on (at any size) or off."""
    saved = windows.NUMBA_MIN_ELEMENTS
    windows.NUMBA_MIN_ELEMENTS = 0 if path == "numba" else 1 << 62
    try:
        return function(*args, **kwargs)
    finally:
        windows.NUMBA_MIN_ELEMENTS = saved


def same_bits(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


CONV_GEOMETRY = [  # (N, H, W, C), kernel, stride, padding
    ((2, 6, 7, 3), (3, 3), (1, 1), (1, 1)),
    ((3, 8, 8, 16), (3, 3), (1, 1), (1, 1)),
    ((2, 9, 7, 2), (3, 2), (2, 1), (0, 2)),
    ((1, 5, 5, 4), (5, 5), (1, 1), (2, 2)),
    ((2, 7, 6, 5), (1, 1), (2, 3), (0, 0)),
    ((2, 4, 4, 1), (3, 3), (1, 1), (1, 1)),  # one channel: numpy either way
]


@pytest.mark.parametrize("shape, kernel, stride, padding", CONV_GEOMETRY)
def test_im2col_numba_and_numpy_give_the_same_bits_and_the_direct_patches(shape, kernel, stride, padding):
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    cols = run("numba", windows.im2col, x, kernel, stride, padding)
    assert same_bits(cols, run("numpy", windows.im2col, x, kernel, stride, padding))
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    for r, s, i, j in itertools.product(range(cols.shape[1]), range(cols.shape[2]), range(kh), range(kw)):
        np.testing.assert_array_equal(cols[:, r, s, i, j, :], padded[:, r * sh + i, s * sw + j, :])


@pytest.mark.parametrize("shape, kernel, stride, padding", CONV_GEOMETRY)
def test_col2im_numba_and_numpy_give_the_same_bits_and_sum_every_patch_back(shape, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, h, w, c = shape
    oh, ow = windows.output_size(h, kh, sh, ph), windows.output_size(w, kw, sw, pw)
    g_cols = np.random.default_rng(2).standard_normal((n, oh, ow, kh, kw, c), dtype=np.float32)
    image = run("numba", windows.col2im, g_cols, shape, stride, padding)
    assert same_bits(image, run("numpy", windows.col2im, g_cols, shape, stride, padding))
    expected = np.zeros((n, h + 2 * ph, w + 2 * pw, c))
    for r, s, i, j in itertools.product(range(oh), range(ow), range(kh), range(kw)):
        expected[:, r * sh + i, s * sw + j, :] += g_cols[:, r, s, i, j, :]
    np.testing.assert_allclose(image, expected[:, ph:ph + h, pw:pw + w, :], rtol=1e-5, atol=1e-5)


POOL_GEOMETRY = [  # (N, H, W, C), kernel, stride
    ((2, 8, 8, 16), (2, 2), (2, 2)),  # windows tile the image
    ((2, 7, 9, 3), (2, 2), (2, 2)),  # a row and a column left over
    ((1, 7, 6, 4), (3, 3), (1, 1)),  # overlapping
    ((2, 9, 9, 2), (3, 2), (2, 1)),  # overlapping, rectangular
    ((2, 10, 10, 3), (2, 2), (3, 3)),  # gaps between windows
]


def pool_input(shape, seed):
    """Values from {-1, -0.5, 0, 0.5, 1}: many ties, all-negative and all-zero windows; and a NaN."""
    x = np.random.default_rng(seed).integers(-2, 3, shape).astype(np.float32) * np.float32(0.5)
    x.reshape(-1)[5] = np.nan
    return x


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape, kernel, stride", POOL_GEOMETRY)
def test_max_pool_numba_and_numpy_give_the_same_bits_and_the_first_maximum(shape, kernel, stride, relu):
    x = pool_input(shape, 3)
    best, winner = run("numba", windows.max_pool, x, kernel, stride, relu=relu)
    best_np, winner_np = run("numpy", windows.max_pool, x, kernel, stride, relu=relu)
    assert same_bits(best, best_np) and same_bits(winner, winner_np)
    (kh, kw), (sh, sw) = kernel, stride
    for b, r, s, ch in itertools.product(*(range(n) for n in best.shape)):
        window = x[b, r * sh:r * sh + kh, s * sw:s * sw + kw, ch].reshape(-1)
        finite = window[~np.isnan(window)]
        if np.isnan(window).any():
            assert np.isnan(best[b, r, s, ch])
            continue
        first = int(np.argmax(finite == finite.max()))
        expected = max(finite.max(), 0) if relu else finite.max()
        assert best[b, r, s, ch] == expected
        assert winner[b, r, s, ch] == (windows.NO_WINNER if relu and finite.max() <= 0 else first)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape, kernel, stride", POOL_GEOMETRY)
def test_max_pool_backward_numba_and_numpy_give_the_same_bits(shape, kernel, stride, relu):
    x = pool_input(shape, 4)
    _, winner = run("numpy", windows.max_pool, x, kernel, stride, relu=relu)
    g = np.random.default_rng(5).standard_normal(winner.shape, dtype=np.float32)
    image = run("numba", windows.max_pool_backward, g, winner, shape, kernel, stride)
    assert same_bits(image, run("numpy", windows.max_pool_backward, g, winner, shape, kernel, stride))
    (kh, kw), (sh, sw) = kernel, stride
    expected = np.zeros(shape)
    for b, r, s, ch in itertools.product(*(range(n) for n in winner.shape)):
        k = int(winner[b, r, s, ch])
        if k != windows.NO_WINNER:
            expected[b, r * sh + k // kw, s * sw + k % kw, ch] += g[b, r, s, ch]
    np.testing.assert_allclose(image, expected, rtol=1e-6, atol=1e-6)


def test_small_arrays_take_numpy_and_large_ones_numba():
    assert windows._kernels_for(windows.NUMBA_MIN_ELEMENTS - 1) is False
    kernels = windows._kernels_for(windows.NUMBA_MIN_ELEMENTS)
    assert kernels and set(kernels) == {"im2col", "col2im", "max_pool", "max_pool_backward"}
