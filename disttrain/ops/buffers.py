"""Large work arrays reused from one training step to the next instead of allocated afresh.

A convolution step allocates tens of MB of patches, outputs and gradient images. Freshly allocated
memory costs a page fault per 4 KiB page on first touch (the allocator hands big blocks back to the
OS on free), which measured more than all the copying and GEMMs of the step together: ~7,000 faults,
~15 ms per step of the Fashion-MNIST CNN. `BufferPool.empty` instead hands out an array of the same
shape and dtype from an earlier step once nothing references it any more.

"Nothing references it" is read from the reference count: the pool's own list, plus the reference
the check itself holds (calibrated at import). Every view of an array (a reshape, a transpose, a
Tensor's data) keeps a reference to it through `.base`, so an array still in use is never handed
out twice. The pool keeps at most `limit_bytes` of arrays: past that, the free ones are released.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

DEFAULT_LIMIT_BYTES = 512 << 20


def _references(arrays: list, index: int) -> int:
    return sys.getrefcount(arrays[index])


# the count _references sees for an array held only by its list (the interpreter's own temporaries vary)
_UNUSED = _references([np.empty(1)], 0)


class BufferPool:
    """Reusable C-contiguous arrays, by (shape, dtype); thread-safe."""

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES):
        self.limit_bytes = int(limit_bytes)
        self._arrays = {}  # (shape, dtype) -> [arrays]
        self._bytes = 0
        self._lock = threading.Lock()

    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        """An uninitialised array of `shape` and `dtype` that no one else references: one from the
        pool if one is free, else a new one that joins the pool."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        with self._lock:
            arrays = self._arrays.setdefault((shape, dtype), [])
            for index in range(len(arrays)):
                if _references(arrays, index) == _UNUSED:
                    return arrays[index]
            array = np.empty(shape, dtype)
            if self._bytes + array.nbytes > self.limit_bytes:
                self._release_free()
            if self._bytes + array.nbytes <= self.limit_bytes:
                arrays.append(array)
                self._bytes += array.nbytes
            return array

    @property
    def pooled_bytes(self) -> int:
        """Bytes of the arrays the pool holds (in use or free)."""
        return self._bytes

    def clear(self) -> None:
        """Forget every array (those in use stay valid for their holders)."""
        with self._lock:
            self._arrays.clear()
            self._bytes = 0

    def _release_free(self) -> None:
        for key in list(self._arrays):
            arrays = self._arrays[key]
            kept = [arrays[i] for i in range(len(arrays)) if _references(arrays, i) != _UNUSED]
            self._bytes -= sum(a.nbytes for a in arrays) - sum(a.nbytes for a in kept)
            if kept:
                self._arrays[key] = kept
            else:
                del self._arrays[key]
