"""Sliding windows over channels-last images (N, H, W, C): im2col, col2im and max-pooling.

The convolution and pooling ops keep their images channels-last in memory (an (N, C, H, W) Tensor
whose data is a transposed view of an (N, H, W, C) array), so that each window position's C values
are one contiguous block: im2col copies whole blocks, its matrix needs no transpose before the GEMM,
and the GEMM's (N*OH*OW, O) result is already the next layer's channels-last image.

Every function here has two paths: a numba kernel (one pass, when numba is installed, see
disttrain.fused) and numpy over the kh*kw strided views of the window taps. Both do the same float32
operations in the same order — copies, maxima with the first maximum winning, sums over the taps in
a fixed tap order starting from zero — so they give the same bits (tests/test_windows.py checks it).
Threads: these loops move memory at close to the machine's bandwidth, so splitting them over two
threads measured no faster; they run on the calling thread (BLAS threads do the GEMMs).
"""

from __future__ import annotations

import numpy as np

from . import jit

# Below this many elements the numpy path's per-call cost is small and a process that trains only
# tiny models never imports numba; both paths give the same bits, so switching per call is safe.
NUMBA_MIN_ELEMENTS = 1 << 14
NO_WINNER = 255  # the winner of a window whose ReLU'd maximum is 0: its gradient goes nowhere
_kernels = None  # None: not compiled yet; False: numba unavailable; else a dict of kernels


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Window positions along one axis: (size + 2 padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: np.ndarray, kernel: tuple, stride: tuple, padding: tuple, empty=np.empty) -> np.ndarray:
    """Rows of patches: x (N, H, W, C) -> cols (N, OH, OW, kh, kw, C), a contiguous array from
    `empty(shape, dtype)` whose element [n, r, s, i, j, c] is x[n, r*sh + i - ph, s*sw + j - pw, c],
    zero outside the image."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, h, w, c = x.shape
    oh, ow = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    cols = empty((n, oh, ow, kh, kw, c), x.dtype)
    kernels = _kernels_for(cols.size) if c > 1 else False  # one channel: numpy's strided copies are faster
    if kernels:
        kernels["im2col"](x, cols, sh, sw, ph, pw)
        return cols
    padded = _padded(x, ph, pw)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
    return cols


def col2im(g_cols: np.ndarray, image_shape: tuple, stride: tuple, padding: tuple, empty=np.empty) -> np.ndarray:
    """The adjoint of im2col: g_cols (N, OH, OW, kh, kw, C) summed back onto the image, (N, H, W, C).

    Each image element is 0 plus its taps' terms in reverse row-major tap order (the order in which
    the numba kernel, reading g_cols in memory order, meets them). The numba path's result comes from
    `empty`; numpy's is a view into a zero-padded array of its own."""
    (sh, sw), (ph, pw) = stride, padding
    n, oh, ow, kh, kw, c = g_cols.shape
    h, w = image_shape[1], image_shape[2]
    kernels = _kernels_for(g_cols.size) if c > 1 else False  # one channel: numpy is faster
    if kernels:
        image = empty((n, h, w, c), g_cols.dtype)
        kernels["col2im"](g_cols, image, sh, sw, ph, pw)
        return image
    padded = np.zeros((n, h + 2 * ph, w + 2 * pw, c), g_cols.dtype)
    for i in reversed(range(kh)):  # the numba kernel's order of terms: rows, then columns, descending
        for j in reversed(range(kw)):
            padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += g_cols[:, :, :, i, j, :]
    return padded[:, ph:ph + h, pw:pw + w, :]


def max_pool(x: np.ndarray, kernel: tuple, stride: tuple, empty=np.empty, relu: bool = False) -> tuple:
    """(maxima (N, OH, OW, C), winner (N, OH, OW, C) uint8): the max of each kh x kw window of
    x (N, H, W, C) and the row-major index i*kw + j of its first maximum (needs kh*kw < NO_WINNER);
    both from `empty`. A NaN in a window makes its maximum NaN, as np.maximum does, but never its
    winner. relu=True: the maxima are then rectified, max(m, 0) (np.maximum's rule again), and a
    window whose maximum is not > 0 has winner NO_WINNER."""
    (kh, kw), (sh, sw) = kernel, stride
    n, h, w, c = x.shape
    oh, ow = output_size(h, kh, sh, 0), output_size(w, kw, sw, 0)
    best = empty((n, oh, ow, c), x.dtype)
    winner = empty((n, oh, ow, c), np.uint8)
    kernels = _kernels_for(x.size)
    if kernels:
        kernels["max_pool"](x, best, winner, kh, kw, sh, sw, relu)
        return best, winner
    taps = _taps(x, kh, kw, sh, sw, oh, ow)
    np.copyto(best, taps[0])
    winner.fill(0)
    larger = np.empty(best.shape, np.bool_)
    for k in range(1, kh * kw):
        np.greater(taps[k], best, out=larger)
        np.maximum(best, taps[k], out=best)
        # the winner is the last tap that beat the running maximum, i.e. max over k of k * larger
        chosen = larger.view(np.uint8)
        chosen *= np.uint8(k)
        np.maximum(winner, chosen, out=winner)
    if relu:
        np.copyto(winner, NO_WINNER, where=~(best > 0))
        np.maximum(best, 0, out=best)
    return best, winner


def max_pool_backward(g: np.ndarray, winner: np.ndarray, image_shape: tuple, kernel: tuple,
                      stride: tuple, empty=np.empty) -> np.ndarray:
    """The gradient of max_pool: each g (N, OH, OW, C) added to its window's winner, 0 elsewhere, as
    an (N, H, W, C) array (from `empty` when the windows tile the image exactly)."""
    (kh, kw), (sh, sw) = kernel, stride
    n, oh, ow, c = g.shape
    overlapping = sh < kh or sw < kw
    covered = sh * oh == image_shape[1] and sw * ow == image_shape[2] and (sh, sw) == (kh, kw)
    image = empty(image_shape, g.dtype) if covered else np.zeros(image_shape, g.dtype)
    kernels = _kernels_for(image.size)
    if kernels:
        kernels["max_pool_backward"](np.ascontiguousarray(g), winner, image, kh, kw, sh, sw, overlapping)
        return image
    taps = _taps(image, kh, kw, sh, sw, oh, ow)
    for k in range(kh * kw):
        if overlapping:  # several windows may send a term to one element: add them tap by tap
            np.add(taps[k], g, out=taps[k], where=winner == k)
        else:  # each element hears from one window at most: g where this tap won, 0 (times g) elsewhere
            np.multiply(g, winner == k, out=taps[k])
    return image


def _padded(x, ph, pw):
    if not ph and not pw:
        return x
    n, h, w, c = x.shape
    padded = np.zeros((n, h + 2 * ph, w + 2 * pw, c), x.dtype)
    padded[:, ph:ph + h, pw:pw + w, :] = x
    return padded


def _taps(x, kh, kw, sh, sw, oh, ow) -> list:
    """The kh*kw strided views x[:, i::sh, j::sw, :] (oh x ow positions each), in row-major tap order."""
    return [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]


def _kernels_for(elements: int):
    """The compiled kernels when numba is available and the array is big enough, else False."""
    global _kernels
    if elements < NUMBA_MIN_ELEMENTS:
        return False
    if _kernels is None:
        _kernels = jit.compiled(_compile)
    return _kernels


def _compile() -> dict:
    import numba

    # as in disttrain.fused: no fastmath, so every sum rounds as numpy's does
    jit = numba.njit(cache=True, error_model="numpy", nogil=True)

    @jit
    def im2col_kernel(x, cols, sh, sw, ph, pw):
        # for one output position and one kernel row, the kw*C values are one contiguous run in both
        # x and cols: copy runs, not single channels
        n, h, w, c = x.shape
        _, oh, ow, kh, kw, _ = cols.shape
        x_rows = x.reshape(n, h, w * c)
        col_runs = cols.reshape(n, oh, ow, kh, kw * c)
        run = kw * c
        for b in range(n):
            for r in range(oh):
                for i in range(kh):
                    row = r * sh + i - ph
                    for s in range(ow):
                        start = (s * sw - pw) * c
                        if 0 <= row < h and start >= 0 and start + run <= w * c:
                            for t in range(run):
                                col_runs[b, r, s, i, t] = x_rows[b, row, start + t]
                        else:
                            for t in range(run):
                                inside = 0 <= row < h and 0 <= start + t < w * c
                                col_runs[b, r, s, i, t] = x_rows[b, row, start + t] if inside else 0

    @jit
    def col2im_kernel(g_cols, image, sh, sw, ph, pw):
        # g_cols is read in memory order; an image element's terms arrive in reverse tap order
        n, h, w, c = image.shape
        _, oh, ow, kh, kw, _ = g_cols.shape
        image[...] = 0
        for b in range(n):
            for r in range(oh):
                for s in range(ow):
                    for i in range(kh):
                        row = r * sh + i - ph
                        if row < 0 or row >= h:
                            continue
                        for j in range(kw):
                            column = s * sw + j - pw
                            if column < 0 or column >= w:
                                continue
                            for ch in range(c):
                                image[b, row, column, ch] += g_cols[b, r, s, i, j, ch]

    @jit
    def max_pool_kernel(x, best, winner, kh, kw, sh, sw, relu):
        n, oh, ow, c = best.shape
        for b in range(n):
            for r in range(oh):
                for s in range(ow):
                    for ch in range(c):
                        best[b, r, s, ch] = x[b, r * sh, s * sw, ch]
                        winner[b, r, s, ch] = 0
                    for k in range(1, kh * kw):
                        i = k // kw
                        for ch in range(c):
                            value = x[b, r * sh + i, s * sw + k - i * kw, ch]
                            if value > best[b, r, s, ch]:
                                best[b, r, s, ch] = value
                                winner[b, r, s, ch] = k
                            elif value != value:  # NaN: np.maximum's result, not a new winner
                                best[b, r, s, ch] = value
                    if relu:
                        for ch in range(c):
                            if not best[b, r, s, ch] > 0:
                                winner[b, r, s, ch] = NO_WINNER
                            if best[b, r, s, ch] < 0:  # keeps -0.0 and NaN, as np.maximum(m, 0) does
                                best[b, r, s, ch] = 0

    @jit
    def max_pool_backward_kernel(g, winner, image, kh, kw, sh, sw, overlapping):
        n, oh, ow, c = g.shape
        # overlapping windows: add the terms tap by tap, in numpy's order; disjoint windows: each
        # element is written once, g times (this tap won), in one pass over the windows
        for tap in range(kh * kw if overlapping else 1):
            for b in range(n):
                for r in range(oh):
                    for s in range(ow):
                        for k in range(tap, tap + 1 if overlapping else kh * kw):
                            i = k // kw
                            j = k - i * kw
                            for ch in range(c):
                                if not overlapping:
                                    chosen = np.float32(winner[b, r, s, ch] == k)
                                    image[b, r * sh + i, s * sw + j, ch] = g[b, r, s, ch] * chosen
                                elif winner[b, r, s, ch] == k:
                                    image[b, r * sh + i, s * sw + j, ch] += g[b, r, s, ch]

    return {"im2col": im2col_kernel, "col2im": col2im_kernel, "max_pool": max_pool_kernel,
            "max_pool_backward": max_pool_backward_kernel}
