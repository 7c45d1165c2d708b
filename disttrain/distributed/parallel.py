"""DataParallel: one model replica per rank, parameters and gradients in flat buffers, gradients
combined across ranks in buckets (one MPI call per bucket, never one per parameter).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from ..nn import Module
from ..tensor import is_grad_enabled, queue_callback
from .buckets import GradientBuckets
from .comm import Communicator, digest48
from .compression import check_options, make_compressor
from .flat import FlatParameters
from .gathering import ParameterGather

STRATEGIES = ("auto", "reduce_scatter", "allreduce")
# small enough that backward completes the last layers' buckets while it still computes the first
# layers' gradients, and that a lazy allgather lets the first layer start before the last bucket has
# arrived; large enough that a call's fixed cost stays small. Measured on 1 Gbit/s fake hosts, MLP
# 784-1024-1024-10 (7.5 MB), 2x1: one bucket 94-98 ms a step, 4 MB 83-86 ms, 1 MB 82 ms.
DEFAULT_BUCKET_MB = 4.0
# id(parameter) -> the DataParallel that laid it out (entries vanish with their DataParallel)
_owners: "weakref.WeakValueDictionary[int, DataParallel]" = weakref.WeakValueDictionary()


class ModelMismatchError(RuntimeError):
    """Ranks hold models with different parameter names, shapes or dtypes."""


class DataParallel(Module):
    """Wraps `model` for data-parallel training over `comm`. COLLECTIVE to construct.

    At construction the parameters move into flat float32 buffers, every rank checks (one small
    allreduce) that all ranks have the same parameter names, shapes and dtypes, and rank 0's
    parameters and buffers are broadcast. `strategy` is "reduce_scatter" (each rank receives only the
    summed gradient of the chunks it owns: half an allreduce's traffic; for a ShardedOptimizer, and
    parameters' `.grad` are cleared after the sync because the rest of the buffer is then scratch),
    "allreduce" (every rank receives the whole summed gradient: any optimizer works), or "auto"
    (the default: reduce_scatter once a ShardedOptimizer with shard=True adopts it, else allreduce;
    see `strategy`). `bucket_mb` bounds one collective.

    With `overlap` (the default), each bucket is combined in a background thread as soon as backward
    has produced all its gradients (buckets.py), on a duplicate of `comm`; sync_gradients() then only
    waits. The results are the same bits as with overlap=False. A forward under grad mode outside
    no_sync() arms the next backward; call backward once per step (accumulate inside no_sync()).
    Overlap is off in a world of one, and where MPI lacks MPI_THREAD_MULTIPLE (`overlap` says which).

    `hierarchical` (True, False or "auto") runs the bucket collectives in three phases (within each
    node, among one leader per node, within the node: hierarchical.py), so that each node's link
    carries one share of the gradient, not one per rank; "auto" chooses it when the ranks span several
    nodes and some node holds more than one rank (`hierarchical` says what was chosen).

    `compression` ("none", "bf16", "fp16" or "powersgd", with `powersgd_rank`) changes what each
    bucket's collective sends, not its contract (compression.py): 16-bit gradients summed in float32,
    or PowerSGD's rank-r factors of each whole 2-D gradient with error feedback. Parameters stay float32
    and identical on every rank (PowerSGD with allreduce: given the same BLAS kernels on every rank, see
    powersgd.py); `compressor` holds the per-rank state that checkpoints carry.
    """

    def __init__(self, model, comm: Communicator, strategy: str = "auto",
                 bucket_mb: float = DEFAULT_BUCKET_MB, overlap: bool = True, hierarchical="auto",
                 compression: str = "none", powersgd_rank: int = 4):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        if hierarchical not in (True, False, "auto"):
            raise ValueError(f"hierarchical must be True, False or 'auto', got {hierarchical!r}")
        check_options(compression, powersgd_rank)
        self.module = model
        self.comm = comm
        self.requested_strategy = strategy
        self.sharded_update = False  # set by adopt(): a ShardedOptimizer with shard=True reads the gradients
        named = list(_named_parameters(model))
        check_same_model(comm, [(name, p.shape, str(p.dtype)) for name, p in named])
        self.flat = FlatParameters(named, comm.size, int(bucket_mb * 2**20) // 4)
        self.layout = self.flat.layout
        self.compression = compression
        self.compressor = make_compressor(compression, self.layout, powersgd_rank)
        self.owned_ranges = self.layout.owned_ranges(comm.rank)
        self.absent = []  # indices of parameters that had no gradient on any rank in the last sync
        self.synced = False  # combined and scaled (sync_gradients ran) since the last optimizer step
        self.combined = False  # the collectives of this step are done (by the end of an armed backward)
        self._sync_enabled = True
        for param in self.flat.params:
            _owners[id(param)] = self
        comm.broadcast(self.flat.flat_params, root=0)
        self.broadcast_buffers()
        self.overlap = bool(overlap) and comm.size > 1 and comm.threads_ok
        self.bucket_comm = _bucket_comm(comm, hierarchical)  # COLLECTIVE: bucket traffic only
        self.hierarchical = self.bucket_comm is not comm and getattr(self.bucket_comm, "is_hierarchical", False)
        self.buckets = GradientBuckets(self.flat, self._reduce_bucket, background=self.overlap,
                                       on_first_launch=lambda: queue_callback(self._combine))
        self.gathering = ParameterGather(self)

    @staticmethod
    def owning(params) -> "DataParallel | None":
        """The DataParallel whose parameters are exactly `params` (same tensors, same order), else None."""
        params = list(params)
        owner = _owners.get(id(params[0])) if params else None
        if owner is None or [id(p) for p in owner.flat.params] != [id(p) for p in params]:
            return None
        return owner

    def adopt(self, sharded: bool, strategy: str | None = None) -> None:
        """Declare the optimizer that reads this DataParallel's gradients: a sharded update (each rank
        updates only its owned ranges) or a replicated one. With strategy "auto" that choice decides
        the collective (reduce_scatter for a sharded update, else allreduce); an explicit `strategy`
        must agree with the one this DataParallel was given. Raises ValueError on a combination that
        cannot work (a replicated update needs every rank to hold the whole gradient)."""
        if strategy not in (None, "auto") and self.requested_strategy not in ("auto", strategy):
            raise ValueError(f"strategy {strategy!r} differs from the DataParallel's {self.requested_strategy!r}")
        if strategy not in (None, "auto"):
            self.requested_strategy = strategy
        self.sharded_update = bool(sharded)
        if not sharded and self.strategy != "allreduce":
            raise ValueError("shard=False needs the 'allreduce' strategy (every rank updates everything)")

    @property
    def strategy(self) -> str:
        """The collective that combines gradients: "reduce_scatter" or "allreduce" ("auto" resolved:
        reduce_scatter once a sharded update is adopted, else allreduce)."""
        if self.requested_strategy != "auto":
            return self.requested_strategy
        return "reduce_scatter" if self.sharded_update else "allreduce"

    @property
    def _scatters(self) -> bool:
        # reduce-scatter runs in place: the summed gradient of the chunk this rank owns in bucket
        # [lo, hi) lands at flat_grads[lo:lo + chunk] (MPI's in-place rule), so no second buffer exists
        return self.strategy == "reduce_scatter" and self.comm.size > 1

    def broadcast_buffers(self) -> None:
        """COLLECTIVE. Copy rank 0's float32 buffers (e.g. BatchNorm statistics) to every rank."""
        for _, buffer in self.named_buffers():
            if buffer.dtype == np.float32 and buffer.flags.c_contiguous:
                self.comm.broadcast(buffer, root=0)

    # --- the model's face
    def forward(self, *args, **kwargs):
        """The wrapped model's forward; under grad mode and outside no_sync() it also arms the coming
        backward to combine buckets as they complete (with overlap)."""
        if self._sync_enabled and is_grad_enabled() and not self.combined:
            self.buckets.arm()
        return self.module(*args, **kwargs)

    def named_parameters(self, prefix: str = ""):
        for name, param in zip(self.flat.names, self.flat.params):
            yield prefix + name, param

    def parameters(self) -> list:
        return list(self.flat.params)

    def named_buffers(self, prefix: str = ""):
        if isinstance(self.module, Module):
            yield from self.module.named_buffers(prefix)

    def train(self, mode: bool = True):
        if isinstance(self.module, Module):
            self.module.train(mode)
        self.training = mode
        return self

    # --- gradient synchronisation
    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches inside accumulate gradients locally: sync_gradients() is a no-op here."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def sync_gradients(self, grad_scale: float | None = None) -> None:
        """COLLECTIVE. Combine this step's gradients across ranks (waiting for the buckets that backward
        already launched), then multiply the combined gradient by `grad_scale`.

        `grad_scale` defaults to 1/size (the mean of equal shares); pass local_count/global_count for
        uneven shares, or 1.0 when the backward seed already carried that weight. With overlap, the
        collectives already ran at the end of backward, and this only scales. "allreduce":
        `flat.flat_grads` then holds the sum on every rank. "reduce_scatter": the sum of this rank's
        owned chunk of each bucket lands at the start of that bucket in `flat.flat_grads` (see
        owned_grads()); the rest of the buffer is then scratch. `absent` lists the parameters that had
        no gradient on any rank (their combined gradient is zero; a sharded update skips them).
        """
        if not self._sync_enabled:
            return
        self._combine()
        self.combined = self.buckets.sealed = False
        scale = np.float32(1.0 / self.comm.size if grad_scale is None else grad_scale)
        if scale != 1:
            for grads in self.owned_grads() if self._scatters else [self.flat.flat_grads]:
                grads *= scale
        self.synced = True

    def _combine(self) -> None:
        """COLLECTIVE. The step's collectives, once: agree which parameters had a gradient anywhere,
        then finish every bucket. Runs at the end of a backward that launched buckets (so that no
        bucket is still in flight when backward returns), else at sync_gradients()."""
        if self.combined:
            return
        self.gathering.wait()
        self.flat.repair_views()
        present = np.array([p.grad is not None for p in self.flat.params], dtype=np.uint8)
        if self.comm.size > 1:
            self.comm.allreduce(present, "max")  # on the world's communicator, beside the buckets' own
        self.absent = [i for i in np.flatnonzero(present == 0).tolist()]
        with self.comm._inside("gradient buckets"):
            self.buckets.finish()
        absent = set(self.absent)
        for index, (param, slot) in enumerate(zip(self.flat.params, self.flat.slots)):
            # reduce_scatter: outside this rank's chunks the buffer now holds scratch, not gradients;
            # allreduce: every rank holds the combined gradient of each parameter some rank used
            param.grad = None if self._scatters or index in absent else slot.buffer
        self.combined = True
        self.buckets.sealed = self.overlap  # until sync_gradients(), a further gradient is an error

    def new_step(self) -> None:
        """Forget this step's gradient combination (optimizers call it after their update or reset)."""
        self.synced = self.combined = self.buckets.sealed = False

    def _reduce_bucket(self, bucket: int) -> None:
        """COLLECTIVE over bucket_comm: combine bucket `bucket` of flat_grads across ranks in place."""
        if self.comm.size == 1:
            return
        if self.compressor is not None:
            self.compressor.combine(self.bucket_comm, self.flat.flat_grads, bucket, self._scatters)
            return
        lo, hi = self.layout.buckets[bucket]
        if self._scatters:
            self.bucket_comm.reduce_scatter(self.flat.flat_grads[lo:hi])
        else:
            self.bucket_comm.allreduce(self.flat.flat_grads[lo:hi])

    def owned_grads(self) -> list:
        """Views of the combined gradient of each owned range (valid after sync_gradients)."""
        flat_grads = self.flat.flat_grads
        if not self._scatters:
            return [flat_grads[lo:hi] for lo, hi in self.owned_ranges]
        return [flat_grads[bucket_lo:bucket_lo + hi - lo]
                for (bucket_lo, _), (lo, hi) in zip(self.layout.buckets, self.owned_ranges)]

    def gather_parameters(self, lazy: bool = False) -> None:
        """COLLECTIVE. Every rank receives every rank's owned chunks into the flat parameter buffer;
        with `lazy`, the allgathers go on in the background until a layer needs them (gathering.py):
        call wait_for_parameters() before reading parameters outside a forward."""
        self.gathering.start(lazy)

    def wait_for_parameters(self) -> None:
        """Wait until every parameter allgather still in flight has arrived (see gather_parameters)."""
        self.gathering.wait()


def _bucket_comm(comm: Communicator, hierarchical) -> Communicator:
    """COLLECTIVE. The communicator for bucket traffic: a duplicate of `comm` (so that a background thread
    never interleaves with the main thread's collectives), hierarchical where asked or where "auto" finds
    several nodes with more than one rank on one of them."""
    if comm.size == 1:
        return comm
    if hierarchical == "auto" and comm.is_mpi and not getattr(comm, "is_hierarchical", False):
        topology = comm.node_topology()
        most_on_a_node = comm.allreduce(np.array([topology["local_size"]], np.float64), "max")[0]
        hierarchical = bool(topology["nodes"] > 1 and most_on_a_node > 1)
    if hierarchical is True and comm.is_mpi and not getattr(comm, "is_hierarchical", False):
        from .hierarchical import HierarchicalComm

        return HierarchicalComm(comm.dup())
    return comm.dup()


def _named_parameters(model):
    if isinstance(model, Module):
        return model.named_parameters()
    return ((param.name or f"param{i}", param) for i, param in enumerate(model))


def check_same_model(comm: Communicator, signature: list) -> None:
    """COLLECTIVE. Raise ModelMismatchError on every rank unless all ranks pass the same
    [(name, shape, dtype), ...]; the message names the first differing parameter on both sides."""
    text = ";".join(f"{name}:{tuple(shape)}:{dtype}" for name, shape, dtype in signature)
    if comm.all_equal([digest48(text)]).all():
        return
    everyone = comm.allgather_object(signature)  # error path only
    reference = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == reference:
            continue
        for i in range(max(len(reference), len(theirs))):
            ours_i = reference[i] if i < len(reference) else None
            theirs_i = theirs[i] if i < len(theirs) else None
            if ours_i != theirs_i:
                raise ModelMismatchError(
                    f"the model differs across ranks at parameter #{i}: rank 0 has {_describe(ours_i)}, "
                    f"rank {rank} has {_describe(theirs_i)}")
    raise ModelMismatchError("the model differs across ranks")


def _describe(entry) -> str:
    if entry is None:
        return "no parameter there"
    name, shape, dtype = entry
    return f"'{name}' shape {tuple(shape)} dtype {dtype}"
