"""Optional numba kernels for the ops that a chain of numpy passes makes slow (layer norm, causal
softmax, embedding scatter-add, GELU): compiled on first use when numba is installed, else the op
takes its plain numpy path. Set DISTTRAIN_NUMBA=0 to force numpy.

A kernel module registers a factory with `@kernels`; calling the returned getter gives the factory's
compiled kernels, or None without numba. Kernels run on the calling thread only. With 2 cores, the
BLAS threads of the matrix products stay busy-waiting for a while after each product, and a second
thread pool (numba's OpenMP) fighting them for the cores made whole training steps 2x slower
(measured, GPT batch 32 x 128). The kernels are ~12% of such a step on one thread, so a perfect
second thread could save ~6%.
Reductions across rows go through fixed blocks of ROW_BLOCK rows, summed in order.

numba compiles exp and tanh to scalar libm calls (5-30x slower than numpy's SIMD loops), so the
kernels call `math_kernels(numba).exp` instead: exp from a range reduction and a polynomial, plain
arithmetic that vectorises (2x faster than numpy's exp, within 4e-7 relative error).
"""

from __future__ import annotations

import contextlib
import os

_numba = None  # the numba module once imported, False when unavailable or disabled
_numpy_only = False  # set inside numpy_only(): every op takes its numpy path
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; never assumes no inf/NaN
ROW_BLOCK = 64  # rows per block of a cross-row reduction (partial sums keep float32 sums accurate)


def numba_module():
    """The numba module, or None when it is not installed or DISTTRAIN_NUMBA=0."""
    global _numba
    if _numba is None:
        _numba = False
        if os.environ.get("DISTTRAIN_NUMBA", "1") != "0":
            try:
                import numba
                _numba = numba
            except ImportError:
                pass
    return _numba or None


def compiled(compile_kernels):
    """`compile_kernels()` (a function that imports numba and returns its kernels) when numba is
    installed and not disabled by DISTTRAIN_NUMBA=0, else False. For modules that cache their kernels
    in a module global: None there means "not tried yet", False "numpy path"."""
    return compile_kernels() if numba_module() is not None else False


def kernels(factory):
    """Decorator: `factory(numba)` builds a kernel namespace; returns a getter that builds it once
    (compiling lazily per dtype) and returns it, or None without numba."""
    built = []

    def get():
        if _numpy_only:
            return None
        if not built:
            numba = numba_module()
            built.append(factory(numba) if numba else None)
        return built[0]
    get.__name__ = factory.__name__
    get.__doc__ = factory.__doc__
    return get


@contextlib.contextmanager
def numpy_only():
    """Inside this block every op takes its numpy path, numba or not (to compare the two)."""
    global _numpy_only
    previous, _numpy_only = _numpy_only, True
    try:
        yield
    finally:
        _numpy_only = previous


def jit(numba):
    """numba.njit with the options every kernel uses: cached, no GIL, numpy's error model (no
    zero-division checks that would stop vectorisation), reassociating float math."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)


_math = None


def math_kernels(numba):
    """Inlined scalar functions for kernels: `exp(x)` for float32 (vectorising) or float64 (libm) x."""
    global _math
    if _math is None:
        _math = _build_math(numba)
    return _math


def exp(x):
    """exp of one float, for use inside numba kernels only (see math_kernels)."""
    raise NotImplementedError("disttrain.ops.jit.exp runs only inside a numba kernel")


def _build_math(numba):
    from types import SimpleNamespace

    import numpy as np
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic, overload

    @intrinsic
    def float_from_bits(typingctx, bits):
        """The float32 whose IEEE bits are the int32 `bits` (a bitcast, no conversion)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen

    log2e, ln2 = 1.4426950408889634, 0.6931471805599453
    ln2_hi = 0.693145751953125  # ln 2 in few bits, so n * ln2_hi is exact for |n| < 2^12
    ln2_lo = ln2 - ln2_hi

    def exp32(x):
        # e^x = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2)/2, e^r by its Taylor series to r^6
        # (relative error below 4e-7); 0 below -87 (float32 would turn subnormal), inf above 88.7.
        # Written without branches on x so that the loop around it vectorises.
        clamped = min(max(x, np.float32(-87.0)), np.float32(88.7))
        n = np.floor(clamped * np.float32(log2e) + np.float32(0.5))
        r = (clamped - n * np.float32(ln2_hi)) - n * np.float32(ln2_lo)
        p = np.float32(1 / 720)
        p = p * r + np.float32(1 / 120)
        p = p * r + np.float32(1 / 24)
        p = p * r + np.float32(1 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        value = p * float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
        value = np.float32(0.0) if x < np.float32(-87.0) else value
        return np.float32(np.inf) if x > np.float32(88.7) else value

    def exp64(x):
        return np.exp(x)  # float64 serves numerical gradient checks: libm's exp, exact to the last bit

    @overload(exp, inline="always", fastmath=FASTMATH)
    def _exp(x):
        return exp32 if x == types.float32 else exp64

    return SimpleNamespace(exp=exp)
