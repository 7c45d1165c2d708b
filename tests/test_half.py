"""The 16-bit wire formats (disttrain/distributed/half.py): bf16 rounds float32 to nearest, ties to
even, keeping NaN a NaN and inf an inf; fp16 matches numpy's float16 conversion after an exact
power-of-two scale; the numba kernels and the numpy path give the same bits."""

import numpy as np
import pytest

from disttrain.distributed import half


def _bits(values) -> np.ndarray:
    return np.array(values, np.uint32).view(np.float32)


def _bf16(x) -> np.ndarray:
    return half.bf16_bits(np.asarray(x, np.float32))


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_bf16_rounds_to_nearest_and_ties_to_even():
    x = _bits([0x3F800000,   # 1.0: exact
               0x3F808000,   # 1 + 2**-8: halfway between 1 and 1 + 2**-7 -> the even one, 1.0
               0x3F818000,   # halfway between 1 + 2**-7 (odd) and 1 + 2**-6 -> the even one, up
               0x3F808001,   # just above halfway -> up
               0x3F807FFF,   # just below halfway -> down
               0xBF808001])  # negative: the same rule on the magnitude
    assert _bf16(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF81]


def test_bf16_keeps_nan_inf_zero_and_rounds_huge_values_to_inf():
    x = _bits([0x7FC00000, 0x7F800001, 0xFF800001, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000,
               0x7F7FFFFF, 0x7F7F7FFF, 0x00000001])
    bits = _bf16(x)
    values = _bf16_value(bits)
    assert np.isnan(values[:3]).all()  # a NaN whose payload sits in the low bits must not round to inf
    assert bits[1] & 0x40 and bits[2] & 0x8000  # made quiet, sign kept
    assert values[3] == np.inf and values[4] == -np.inf
    assert bits[5] == 0 and bits[6] == 0x8000  # +0 and -0
    assert values[7] == np.inf  # float32's largest rounds past bf16's largest
    assert bits[8] == 0x7F7F  # just below that stays finite
    assert bits[9] == 0  # the smallest subnormal rounds to zero


def test_bf16_of_random_floats_is_the_nearest_bf16_with_ties_to_even():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 3.3e38)]
    bits = _bf16(x)
    down = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: the neighbour towards zero
    up_value = _bf16_value(down + np.uint16(1)).astype(np.float64)
    down_value = _bf16_value(down).astype(np.float64)
    exact = x.astype(np.float64)
    nearer_up = np.abs(up_value - exact) < np.abs(exact - down_value)
    tie = np.abs(up_value - exact) == np.abs(exact - down_value)
    expected = np.where(nearer_up | (tie & (down % 2 == 1)), down + np.uint16(1), down)
    assert np.array_equal(bits, expected)
    assert tie.sum() > 0 and nearer_up.sum() > 0  # the sample exercises both directions and ties


def test_fp16_encoding_matches_numpy_float16_after_an_exact_power_of_two_scale():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(50_000) * 1e-3, [0, -0.0, 65504, 65520, 1e5, 6e-8, 2.9e-8,
                        np.inf, -np.inf]]).astype(np.float32)
    for exponent in (0, 7, -3):
        out = np.empty(x.size, np.uint16)
        half.encode(x, out, "fp16", exponent)
        with np.errstate(over="ignore"):
            expected = (x * np.float32(2.0 ** exponent)).astype(np.float16).view(np.uint16)
        assert np.array_equal(out, expected)
        decoded = np.empty(x.size, np.float32)
        half.decode(out, decoded, "fp16", exponent)
        assert np.array_equal(decoded, expected.view(np.float16).astype(np.float32) * np.float32(2.0 ** -exponent))


@pytest.mark.parametrize("largest", [1e-7, 3e-3, 1.0, 6e4, 1e30])
def test_fp16_exponent_scales_the_largest_magnitude_into_the_top_binade_without_overflow(largest):
    rng = np.random.default_rng(2)
    x = (rng.uniform(-1, 1, 1000) * largest).astype(np.float32)
    x[17] = -largest
    exponent = half.fp16_exponent(x)
    top = float(np.abs(x).max()) * 2.0 ** exponent
    assert 2.0 ** 14 <= top < 2.0 ** 15
    out, back = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    half.encode(x, out, "fp16", exponent)
    half.decode(out, back, "fp16", exponent)
    assert np.isfinite(back).all()
    # fp16 keeps 11 significant bits of every value within 2**24 of the largest
    normal = np.abs(x) * 2.0 ** exponent >= 2.0 ** -14
    assert np.all(np.abs(back - x)[normal] <= 2.0 ** -11 * np.abs(x)[normal])


def test_fp16_exponent_leaves_zero_and_non_finite_blocks_unscaled():
    assert half.fp16_exponent(np.zeros(5, np.float32)) == 0
    assert half.fp16_exponent(np.array([1.0, np.nan], np.float32)) == 0
    assert half.fp16_exponent(np.array([1.0, -np.inf], np.float32)) == 0
    assert half.fp16_exponent(np.zeros(0, np.float32)) == 0


def _special_and_random(n, seed):
    rng = np.random.default_rng(seed)
    special = np.array([0, -0.0, 1, 65504, 65520, 7e4, 1e-8, 6e-8, 6.1e-5, np.inf, -np.inf, np.nan, 3e38, 1e-45],
                       np.float32)
    patterns = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([special, patterns, (rng.standard_normal(n) * 1e-3).astype(np.float32)])


@pytest.mark.parametrize("fmt,exponent", [("bf16", 0), ("fp16", 0), ("fp16", 9), ("fp16", -4)])
def test_numba_kernels_and_numpy_path_give_the_same_bits(fmt, exponent, monkeypatch):
    pytest.importorskip("numba", reason="numba not installed: only the numpy path exists here")
    x = _special_and_random(40_000, seed=3)
    results = []
    for kernels in (half._compile(), False):
        monkeypatch.setattr(half, "_kernels", kernels)
        monkeypatch.setattr(half, "NUMBA_MIN_ELEMENTS", 0)
        bits, decoded, summed = np.empty(x.size, np.uint16), np.empty(x.size, np.float32), np.ones(x.size, np.float32)
        half.encode(x, bits, fmt, exponent)
        half.decode(bits, decoded, fmt, exponent)
        with np.errstate(invalid="ignore"):
            half.decode(bits, summed, fmt, exponent, accumulate=True)
        results.append((bits, decoded, summed))
    (bits_a, decoded_a, summed_a), (bits_b, decoded_b, summed_b) = results
    nan = np.isnan(decoded_b)
    assert nan.sum() > 0 and np.array_equal(np.isnan(decoded_a), nan)  # a NaN's payload may differ
    assert np.array_equal(bits_a[~nan], bits_b[~nan])
    assert np.array_equal(decoded_a[~nan], decoded_b[~nan])
    assert np.array_equal(summed_a[~nan], summed_b[~nan])
