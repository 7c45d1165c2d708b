"""Flat float32 buffers that parameters and gradients are views of, and how they split across ranks.

Parameters are laid out back to back in one contiguous buffer, in `named_parameters()` order; the
gradients in a second buffer with the same layout. Offsets therefore depend only on the model, never
on the world size: padding sits at the end. The padded buffer splits into buckets (the unit of one
collective call), and each bucket into `world_size` equal chunks; rank r owns chunk r of every bucket.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Gradient, GradSlot

ALIGN_ELEMENTS = 16  # each rank's chunk starts on a 64-byte boundary


class FlatLayout:
    """Offsets of named parameters in a flat buffer, and its buckets and per-rank chunks.

    `entries` is a list of (name, offset, shape); `total` the unpadded element count; `padded_total`
    a multiple of `world_size * ALIGN_ELEMENTS`; `buckets` a list of (lo, hi) ranges covering
    [0, padded_total), each a multiple of the world size * alignment.
    """

    def __init__(self, named_shapes, world_size: int, bucket_elements: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.entries = []
        offset = 0
        for name, shape in named_shapes:
            self.entries.append((name, offset, tuple(shape)))
            offset += int(np.prod(shape, dtype=np.int64))
        self.total = offset
        quantum = world_size * ALIGN_ELEMENTS
        self.padded_total = max(-(-offset // quantum) * quantum, quantum)
        bucket_len = max(quantum, (int(bucket_elements) // quantum) * quantum)
        self.buckets = [(lo, min(lo + bucket_len, self.padded_total))
                        for lo in range(0, self.padded_total, bucket_len)]

    def owned_ranges(self, rank: int) -> list:
        """The (lo, hi) flat ranges rank `rank` owns: chunk `rank` of every bucket."""
        ranges = []
        for lo, hi in self.buckets:
            chunk = (hi - lo) // self.world_size
            ranges.append((lo + rank * chunk, lo + (rank + 1) * chunk))
        return ranges

    def shard_size(self) -> int:
        """Elements each rank owns (padded_total / world_size)."""
        return self.padded_total // self.world_size

    def segments(self, lo: int, hi: int) -> list:
        """Pieces of parameters inside flat range [lo, hi): (name, start, stop, flat_lo, flat_hi),
        where [start, stop) indexes the parameter's flattened elements."""
        return [piece for _, piece in self.indexed_segments(lo, hi)]

    def indexed_segments(self, lo: int, hi: int) -> list:
        """segments(lo, hi), each paired with its parameter's index in `entries`: (index, piece)."""
        pieces = []
        for index, (name, offset, shape) in enumerate(self.entries):
            size = int(np.prod(shape, dtype=np.int64))
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                pieces.append((index, (name, a - offset, b - offset, a, b)))
        return pieces

    def signature(self) -> str:
        """Names and shapes in order: equal on every rank exactly when the models match."""
        return ";".join(f"{name}:{'x'.join(map(str, shape))}" for name, _, shape in self.entries)


class FlatGradSlot(GradSlot):
    """A parameter's GradSlot in a flat gradient buffer: `buffer` is its view of `flat_grads`, `index`
    its position in the layout, and `listener(index)`, if set, hears that its gradient is complete."""

    __slots__ = ("index", "listener")

    def __init__(self, buffer: np.ndarray, index: int):
        super().__init__(buffer)
        self.index = index
        self.listener = None

    def ready(self) -> None:
        if self.listener is not None:
            self.listener(self.index)


class FlatParameters:
    """Moves parameters into one flat float32 buffer (their `.data` become views of it) and gives each
    a FlatGradSlot: its view of a flat gradient buffer that backward() writes into.

    `flat_params` and `flat_grads` have `layout.padded_total` elements; `params[i]` and `slots[i]`
    belong to `names[i]`, in layout order. A parameter whose `.grad` is None has taken no part in this
    step's backward; `fill_missing_grads()` zeroes those views.
    """

    def __init__(self, named_params, world_size: int, bucket_elements: int):
        named_params = list(named_params)
        if not named_params:
            raise ValueError("no parameters to lay out (the model has no Parameters)")
        for name, param in named_params:
            if param.dtype != np.float32:
                raise TypeError(f"parameter '{name}' has dtype {param.dtype}; data-parallel training needs float32")
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.layout = FlatLayout([(name, p.shape) for name, p in named_params], world_size, bucket_elements)
        self.flat_params = np.zeros(self.layout.padded_total, np.float32)
        self.flat_grads = np.zeros(self.layout.padded_total, np.float32)
        self.views = []  # each parameter's view of flat_params, to repair a replaced .data
        self.slots = []
        for index, ((name, offset, shape), param) in enumerate(zip(self.layout.entries, self.params)):
            size = param.data.size
            view = self.flat_params[offset:offset + size].reshape(shape)
            self.views.append(view)
            view[...] = param.data
            slot = FlatGradSlot(self.flat_grads[offset:offset + size].reshape(shape).view(Gradient), index)
            if param.grad is not None:
                slot.buffer[...] = param.grad
                param.grad = slot.buffer
            param.data = view
            param.grad_slot = slot
            self.slots.append(slot)

    def fill_missing_grads(self, indices=None) -> None:
        """Zero the gradient views of parameters (all, or those at `indices`) that received no gradient,
        so that they sum as zeros."""
        for index in range(len(self.params)) if indices is None else indices:
            if self.params[index].grad is None:
                self.slots[index].buffer.fill(0.0)

    def repair_views(self) -> None:
        """Put back any parameter whose `.data` was replaced (`p.data = new_array`) instead of updated
        in place: its values go into its view of the flat buffer, which becomes its `.data` again.
        Without this the replaced parameter would silently stop being synchronised and trained."""
        for name, param, view in zip(self.names, self.params, self.views):
            if param.data is not view:
                if np.shape(param.data) != view.shape:
                    raise ValueError(f"parameter '{name}' was given data of shape {np.shape(param.data)}, "
                                     f"its shape is {view.shape}")
                np.copyto(view, param.data, casting="same_kind")
                param.data = view

    def view(self, lo: int, hi: int):
        """(params[lo:hi], grads[lo:hi]) views of the flat buffers."""
        return self.flat_params[lo:hi], self.flat_grads[lo:hi]
