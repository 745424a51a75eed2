"""Allocation tracker: live tensor bytes, op by op, on fake or real tensors.

`MemoryTracker` is a `TorchDispatchMode`. Every aten op that reaches the Python dispatch key passes
through it; each *storage* is counted once, the first time it appears as the output of an op that
allocates (schema return without alias info), by `untyped_storage().nbytes()` passed through the
allocator model `round_bytes`. A weakref on the storage object tells when the allocation is freed
(torch keeps one Python object per live storage, so the weakref dies with the allocation). Views
share their base's storage and are not counted again.

The same code runs on real CPU tensors and inside `FakeTensorMode` (enter the tracker *inside* the
fake mode, so it sees ops before the fake mode computes them). What it cannot see, on either:
allocations made inside one kernel and freed before it returns (scratch buffers, dtype casts of
operands), Python numbers wrapped as 0-dim tensors, and allocations that bypass the dispatcher
(`torch.from_numpy`, `torch.get_rng_state()`, tensors made before the tracker and not registered).
`UntypedStorage.resize_` bypasses it too, and FSDP2 frees and re-gathers its weights with it: while
tracking, the tracker wraps it and counts the storage's new size. Measured against `measure_cpu.py` on
two steps of the test models:
0 B apart for a 2-layer Llama, 12 B of 1.55 MB for an MLP (one wrapped float, one cast inside
`aten.div`); with `torch.utils.checkpoint`, 5,056 B (the CPU RNG state it saves, host memory) per
checkpointed call alive at the peak.

A sharded model (FSDP2) adds three categories: the whole weights of the groups gathered now (each FSDP2
module's parameters as its forward starts, and storages first seen growing through `resize_`), and the
flat buffers its all-gathers fill and its reduce-scatters read (by the collective op). The model's own
parameters are then this rank's shards, and its gradients the shards the reduce-scatter leaves.

Categories: parameters and buffers by identity (`register_model`), gradients through
post-accumulate-grad hooks, optimizer state from `optimizer.state` after each step, activations
from the saved-tensors pack hook, everything else TEMPORARIES. A storage's category only moves up
(`_RANK`) as more is learnt, and a move is applied to the recorded peaks too when the storage was
live then (it is live now and was allocated before the peak), so the breakdown at a peak that falls
inside `optimizer.step()` names the freshly created optimizer state correctly.

Legend: `st` an untyped storage, `rec` its `_Storage` record, `nb` bytes after rounding.
"""

from __future__ import annotations

import bisect
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from functools import partial, partialmethod
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class Category(str, Enum):
    FROZEN_WEIGHTS = "frozen_weights"  # parameters with requires_grad=False, and module buffers
    TRAINABLE_WEIGHTS = "trainable_weights"
    GRADIENTS = "gradients"
    OPTIMIZER_STATE = "optimizer_state"
    ACTIVATIONS = "activations"  # packed by autograd for backward
    TEMPORARIES = "temporaries"
    QUANT_STATE = "quant_state"  # bitsandbytes absmax / code / SCB next to a quantized weight
    OTHER = "other"  # registered through `register_tensors`
    # a sharded model (FSDP2): the weights and gradients above are this rank's shards; these are the rest
    GATHERED_WEIGHTS = "gathered_weights"  # whole parameters of the groups all-gathered now
    ALL_GATHER = "all_gather_buffers"  # a group's flat buffer an all-gather fills
    REDUCE_SCATTER = "reduce_scatter_buffers"  # a group's whole gradients, flat, as they are reduce-scattered


# A 4-bit layer of a sharded model holds its block scales (bitsandbytes' absmax) as a frozen parameter of
# this name, so that FSDP2 shards them (``fitune.distributed.shard``); counted as quantization state.
QUANT_STATE_PARAMETER = "quant_absmax"

# A storage is re-categorised only towards a higher rank, unless the caller knows by identity.
_RANK = {
    Category.TEMPORARIES: 0,
    Category.OTHER: 0,
    Category.ACTIVATIONS: 1,
    Category.ALL_GATHER: 1,
    Category.REDUCE_SCATTER: 1,
    Category.GRADIENTS: 2,
    # an all-gathered weight the forward saves for backward is a weight, not an activation
    Category.GATHERED_WEIGHTS: 3,
    Category.OPTIMIZER_STATE: 3,
    Category.QUANT_STATE: 3,
    Category.FROZEN_WEIGHTS: 4,
    Category.TRAINABLE_WEIGHTS: 4,
}

# `torch.tensor(...)` allocates outside the dispatcher and then passes its result through
# `lift_fresh`, whose schema says "returns its input": the allocation is new all the same.
_FRESH = {torch.ops.aten.lift_fresh.default}


def _collective_buffers() -> dict[Any, tuple[int, Category]]:
    """FSDP2's collectives: op -> (the argument holding the group's flat buffer, its category)."""
    c10d = getattr(torch.ops, "c10d", None)
    try:
        return {
            c10d._allgather_base_.default: (0, Category.ALL_GATHER),  # (output, input shard)
            c10d._reduce_scatter_base_.default: (1, Category.REDUCE_SCATTER),  # (output shard, input)
        }
    except (AttributeError, RuntimeError):  # a torch built without distributed
        return {}


def _sharded_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def _group_parameters(module: nn.Module, sharded: type) -> Iterator[torch.Tensor]:
    """The parameters of ``module``'s FSDP2 group: its own and its submodules', those of nested groups left
    out."""
    stack = [module]
    while stack:
        m = stack.pop()
        yield from m.parameters(recurse=False)
        stack.extend(c for c in m.children() if not isinstance(c, sharded))


# fake tensors answer device queries through the dispatcher; they allocate nothing
_DEVICE_QUERY = torch.ops.prim.device.default

NO_MODULE = "(none)"
DEFAULT_PHASE = "default"
# Parts of a phase, each with its own peak: a phase's peak is the largest of them. Each part's peak grows in
# a straight line with the number of decoder layers, the phase's need not (past some depth the optimizer
# step, or the fully loaded model, overtakes the pass's peak), so the planner extrapolates parts.
PART_OPTIMIZER = "optimizer"  # the optimizer step
PART_END = "end"  # the live bytes when the phase ends
_ACTIVE: list[MemoryTracker] = []  # trackers entered, innermost last (``part`` marks the innermost)


@contextmanager
def part(name: str) -> Iterator[None]:
    """Mark a stage of the current phase as a part of its own ("load/quantize"), with its own peak, for code
    the tracker traces (the session builder); a no-op when no tracker is active. A stage whose peak grows
    with depth at its own rate must be a part, so that each part stays affine in the number of layers."""
    tracker = _ACTIVE[-1] if _ACTIVE else None
    if tracker is None:
        yield
        return
    previous, tracker._part = tracker._part, name
    try:
        yield
    finally:
        tracker._part = previous


def phase_of(part: str) -> str:
    """The phase a part ("steady_step", "steady_step/optimizer", "load/end") belongs to."""
    return part.split("/")[0]


def largest(peaks: Iterable[PeakInfo], default: PeakInfo | None = None) -> PeakInfo:
    """The peak of a phase: the largest of its parts' peaks, the earliest on a tie."""
    peaks = list(peaks)
    if not peaks and default is not None:
        return default
    return max(peaks, key=lambda info: (info.bytes, -info.event))


@dataclasses.dataclass
class PeakInfo:
    """The highest live total seen (in one phase, or overall) and where it happened."""

    bytes: int = 0
    event: int = -1
    op: str = ""
    module: str = ""
    stage: str = ""  # forward | backward | recompute | optimizer | other
    phase: str = ""
    breakdown: dict[Category, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TimelinePoint:
    """Live bytes after one op (or the highest of `stride` consecutive ops once downsampled)."""

    event: int
    phase: str
    op: str
    module: str
    stage: str
    live_bytes: int
    by_category: dict[Category, int]


@dataclasses.dataclass(slots=True)
class _Storage:
    nbytes: int
    category: Category
    alloc_event: int
    ref: weakref.ref | None = None


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    elif t.layout == torch.strided:
        yield t.untyped_storage()


def _quant_state_tensors(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """Tensors a quantized parameter keeps beside its data (bnb Params4bit.quant_state, Int8Params.SCB)."""
    stack: list[tuple[Any, int]] = [(p, 0)]
    while stack:
        obj, depth = stack.pop()
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif depth < 2 and hasattr(value, "absmax"):  # bnb QuantState and its nested state2
                stack.append((value, depth + 1))


class MemoryTracker(TorchDispatchMode):
    """Counts live tensor storages op by op; records the peak, its breakdown, op, module and phase.

    Usage (fake or real tensors alike)::

        tracker = MemoryTracker()
        tracker.register_model(model)
        tracker.register_optimizer(optimizer)
        with tracker:
            with tracker.phase("step1"):
                train_step(...)
        tracker.peak_bytes, tracker.breakdown_at_peak(), tracker.phase_peaks()

    `round_bytes` models the allocator (e.g. the CUDA caching allocator's 512-byte blocks); it is
    applied to every storage. The tracker holds no strong reference to any tensor.
    """

    def __init__(
        self,
        round_bytes: Callable[[int], int] = lambda n: n,
        *,
        max_timeline_points: int = 4096,
        allocator: Any = None,
        kernel_scratch: Callable[[Any, tuple, dict], int] | None = None,
        collective_copies: bool = False,
    ) -> None:
        super().__init__()
        self.round_bytes = round_bytes
        # gloo (collectives between CPUs) copies each collective's buffer, out of the dispatcher's sight: an
        # all-gather into a flat output of its own, a reduce-scatter by reducing a clone of the whole input;
        # counted as a second buffer of the same size alive as long as the one FSDP2 holds (a bound: gloo
        # frees its copy when the collective completes on its worker thread)
        self.collective_copies = collective_copies
        self._copies: dict[int, tuple[object, weakref.ref]] = {}
        # optional model of the bytes a kernel allocates and frees inside one op, which no dispatcher-level
        # trace sees: (func, args, kwargs) -> bytes (``DeviceModel.kernel_scratch``), live for that op alone
        self.kernel_scratch = kernel_scratch
        # optional allocator model told of every allocation (malloc(key, nbytes)) and release (free(key)),
        # e.g. to model the segments a caching allocator reserves
        self.allocator = allocator
        self.failed_at: tuple[str, str] | None = None  # (op, module) of the first op that raised
        self._off_device = 0
        self._host_category: str | None = None
        self._host_live: dict[str, int] = {}
        self._host_refs: dict[int, weakref.ref] = {}  # id(storage) -> weakref whose callback frees its bytes
        self._host_peaks: dict[str, dict[str, int]] = {}  # phase -> host category -> peak bytes
        self.live_bytes = 0
        self._live_by_category = dict.fromkeys(Category, 0)
        self._records: dict[int, _Storage] = {}  # id(storage) -> record, live storages only
        self._event = 0
        self._phase = DEFAULT_PHASE
        self._part: str | None = None  # a stage of the phase marked by ``part``
        self.peak = PeakInfo()
        self._phase_peaks: dict[str, PeakInfo] = {}  # phase or "phase/part" -> peak
        self._part_alloc: dict[
            str, list[int]
        ] = {}  # same keys -> [allocated, reserved] peaks of the allocator
        # Timeline: one point per op, downsampled by keeping the max of `stride` ops when it grows.
        self._max_points = max_timeline_points
        self._points: list[TimelinePoint] = []
        self._pending: TimelinePoint | None = None
        self._pending_count = 0
        self._stride = 1
        # Module attribution.
        self._models: list[weakref.ref[nn.Module]] = []
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._param_module: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> module name
        self._module_stack: list[tuple[str, int]] = []  # (name, autograd sequence nr at entry)
        self._segments: list[tuple[int, int, str]] = []  # [start, end) sequence nrs -> innermost module
        self._max_segments = 200_000
        self._in_optimizer: str | None = None
        self._shared_grads: set[tuple[tuple[int, ...], torch.dtype]] = set()  # (shape, dtype) of tied weights
        self._handles: list[Any] = []
        self._saved_hooks: Any = None
        self._depth = 0
        self._collectives: dict[Any, tuple[int, Category]] = {}
        self._sharded_type: type | None = None
        self._resize: Any = None

    # ------------------------------------------------------------------ registration

    def register_model(self, model: nn.Module) -> None:
        """Count the model's parameters and buffers (frozen vs trainable by requires_grad)."""
        names = {m: (q or type(model).__name__) for q, m in model.named_modules(remove_duplicate=False)}
        uses: dict[int, int] = {}
        for mod, name in names.items():
            for p in mod.parameters(recurse=False):
                self._param_module.setdefault(p, name)
                uses[id(p)] = uses.get(id(p), 0) + 1
        # a trainable weight two modules share (tied embeddings) gets two gradients that backward adds up
        self._shared_grads |= {
            (tuple(p.shape), p.dtype)
            for p in model.parameters()
            if p.requires_grad and uses.get(id(p), 0) > 1
        }
        for p in model.parameters():
            cat = Category.TRAINABLE_WEIGHTS if p.requires_grad else Category.FROZEN_WEIGHTS
            self._categorize(p, cat, force=True)
            for q in _quant_state_tensors(p):
                self._categorize(q, Category.QUANT_STATE)
        for b in model.buffers():
            self._categorize(b, Category.FROZEN_WEIGHTS, force=True)
        for mod in names:  # a sharded 4-bit layer keeps its quantization state on the module, not the shard
            if getattr(mod, "quant_state", None) is not None:
                for q in _quant_state_tensors(mod):
                    self._categorize(q, Category.QUANT_STATE)
                scales = mod._parameters.get(QUANT_STATE_PARAMETER)
                if scales is not None:
                    self._categorize(scales, Category.QUANT_STATE, force=True)
        self._models.append(weakref.ref(model))
        if self._depth:
            self._install_model_hooks(model)
        self._note("register_model")

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count existing optimizer state; state created lazily in step() is categorised after it."""
        self._categorize_optimizer_state(optimizer)
        self._optimizers.append(weakref.ref(optimizer))
        if self._depth:
            self._install_optimizer_hooks(optimizer)
        self._note("register_optimizer")

    def register_tensors(self, *tensors: torch.Tensor, category: Category = Category.OTHER) -> None:
        """Count tensors created before tracking that the run keeps alive (e.g. a batch made earlier)."""
        for t in tensors:
            self._categorize(t, category, force=True)
        self._note("register_tensors")

    @contextmanager
    def off_device(self, host_category: str | None = None) -> Iterator[None]:
        """Allocations made inside are not on the tracked device (e.g. weights staged in host memory before
        they are quantized onto a GPU); tensors from here that stay alive are counted when registered.

        With `host_category` (e.g. "offloaded_activations", see `fitune/techniques/offload.py`) they are host memory the
        run keeps: counted apart from the device total, as live bytes under that name, with a peak per
        phase (`host_phase_peaks`); bytes as the tensors hold them, no allocator rounding."""
        self._off_device += 1
        previous, self._host_category = self._host_category, host_category
        try:
            yield
        finally:
            self._off_device -= 1
            self._host_category = previous

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute events to `name` ("load", "step1", ...); each phase keeps its own peak."""
        previous, self._phase = self._phase, name
        self._note(f"phase:{name}")
        try:
            yield
        finally:
            key = f"{name}/{PART_END}"
            module, stage = self._where()
            self._phase_peaks[key] = PeakInfo(
                self.live_bytes,
                self._event,
                "(end of phase)",
                module,
                stage,
                name,
                dict(self._live_by_category),
            )
            if self.allocator is not None:
                self._part_alloc[key] = [self.allocator.allocated_bytes, self.allocator.reserved_bytes]
            self._phase = previous

    # ------------------------------------------------------------------ results

    @property
    def peak_bytes(self) -> int:
        return self.peak.bytes

    @property
    def peak_op(self) -> str:
        return self.peak.op

    @property
    def peak_module(self) -> str:
        return self.peak.module

    @property
    def peak_phase(self) -> str:
        return self.peak.phase

    @property
    def peak_stage(self) -> str:
        return self.peak.stage

    def breakdown_at_peak(self) -> dict[Category, int]:
        """Bytes per category at the overall peak; the values sum to `peak_bytes`."""
        return dict(self.peak.breakdown)

    def phase_peaks(self) -> dict[str, int]:
        return {name: self.phase_peak_info(name).bytes for name in self._phase_names()}

    def phase_peak_info(self, name: str) -> PeakInfo:
        """The peak of phase ``name``: the largest of its parts."""
        return dataclasses.replace(
            largest(i for key, i in self._phase_peaks.items() if phase_of(key) == name)
        )

    def part_peak_infos(self) -> dict[str, PeakInfo]:
        """Peaks by part: ``phase`` (the pass outside the optimizer), ``phase/optimizer``, ``phase/end``."""
        return {key: dataclasses.replace(info) for key, info in self._phase_peaks.items()}

    def part_allocator_peaks(self) -> dict[str, tuple[int, int]]:
        """With an allocator model: its (allocated, reserved) peaks by part, keys as ``part_peak_infos``."""
        return {key: (a, r) for key, (a, r) in self._part_alloc.items()}

    def _phase_names(self) -> list[str]:
        return list(dict.fromkeys(phase_of(key) for key in self._phase_peaks))

    def host_phase_peaks(self) -> dict[str, dict[str, int]]:
        """Phase -> host category -> the most host bytes of that category live in the phase."""
        return {phase: dict(peaks) for phase, peaks in self._host_peaks.items()}

    def live_breakdown(self) -> dict[Category, int]:
        return dict(self._live_by_category)

    @property
    def timeline(self) -> list[TimelinePoint]:
        """At most ~2*max_timeline_points points; each is the highest of `stride` consecutive ops."""
        return self._points + ([self._pending] if self._pending is not None else [])

    # ------------------------------------------------------------------ dispatch mode

    def __enter__(self) -> MemoryTracker:
        if self._depth == 0:
            for ref in self._models:
                if (model := ref()) is not None:
                    self._install_model_hooks(model)
            for ref in self._optimizers:
                if (opt := ref()) is not None:
                    self._install_optimizer_hooks(opt)
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
            self._saved_hooks.__enter__()
            self._collectives = _collective_buffers()
            self._sharded_type = _sharded_module_type()
            self._resize = torch.UntypedStorage.resize_
            torch.UntypedStorage.resize_ = partialmethod(MemoryTracker._tracked_resize_of, self)
        self._depth += 1
        _ACTIVE.append(self)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        _ACTIVE.remove(self)
        self._depth -= 1
        if self._depth == 0:
            self._saved_hooks.__exit__(*exc)
            self._saved_hooks = None
            torch.UntypedStorage.resize_ = self._resize
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._module_stack.clear()
            self._in_optimizer = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is _DEVICE_QUERY:  # asked thousands of times per step (autograd's engine, linear); no tensor
            return func(*args, **(kwargs or {}))
        if self._engine_accumulates_in_place(func, args, kwargs):
            # autograd's engine adds the second gradient of a shared weight into the first in place when it
            # holds the only reference (a fresh gradient: always, here); on fake tensors it cannot tell, and
            # would allocate a third weight-sized tensor the real run never has
            torch.ops.aten.add_.Tensor(args[0], args[1])
            self._note("aten.add_.Tensor")
            return args[0]
        try:
            out = func(*args, **(kwargs or {}))
        except Exception:
            if self.failed_at is None:  # the op and module that could not run, for the caller's message
                self.failed_at = (str(func), self._where()[0])
            raise
        if self._off_device and self._host_category is None:
            return out
        buffer = self._collectives.get(func)
        if buffer is not None:
            self._categorize(args[buffer[0]], buffer[1])
            if self.collective_copies:
                self._copy_alongside(args[buffer[0]], buffer[1])
        returns = func._schema.returns
        if not returns:
            pairs: Any = ()
        elif len(returns) == 1:
            pairs = ((returns[0], out),)
        else:
            pairs = zip(returns, out, strict=True)
        produced = False
        for ret, value in pairs:
            # A view or in-place result is no new allocation.
            aliased = ret.alias_info is not None and func not in _FRESH
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    produced = True
                    if not self._off_device:
                        self._on_output(t, aliased)
                    elif not aliased:
                        self._add_host(t, self._host_category)
        if (
            produced and not self._off_device
        ):  # metadata queries (prim.device under FakeTensorMode, sym_size...) are no events
            self._note(str(func))
            scratch = self.kernel_scratch(func, args, kwargs or {}) if self.kernel_scratch is not None else 0
            if scratch:
                self._transient(scratch, f"{func} (kernel scratch)")
        return out

    def _transient(self, nbytes: int, op: str) -> None:
        """An allocation live for one event only: a kernel's scratch buffer, beside the op's output."""
        nb = self.round_bytes(nbytes)
        key = object()
        self._move(Category.TEMPORARIES, nb)
        if self.allocator is not None:
            self.allocator.malloc(id(key), nb)
        self._note(op)
        self._move(Category.TEMPORARIES, -nb)
        if self.allocator is not None:
            self.allocator.free(id(key))

    # ------------------------------------------------------------------ bookkeeping

    def _engine_accumulates_in_place(self, func, args, kwargs) -> bool:
        if func is not torch.ops.aten.add.Tensor or kwargs or not self._shared_grads or len(args) != 2:
            return False
        a, b = args
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and is_fake(a) and is_fake(b)):
            return False
        if torch._C._current_graph_task_id() == -1 or self._module_stack or self._in_optimizer is not None:
            return False  # only between backward nodes
        if a._base is not None:
            # the first gradient is a view (fp32 linear backward hands the weight's gradient over as the
            # transpose of a matmul's output): the view keeps its base alive, the engine sees the storage
            # shared, and adds out of place
            return False
        return a.shape == b.shape and a.dtype == b.dtype and (tuple(a.shape), a.dtype) in self._shared_grads

    def _on_output(self, t: torch.Tensor, aliased: bool) -> None:
        if t.device.type == "meta":  # shape-only placeholders own no memory
            return
        for st in _storages(t):
            rec = self._lookup(st)
            if rec is not None:
                self._resized(rec, self._rounded(st))  # resize_ may have grown or shrunk the allocation
            elif not aliased:
                self._add(st, Category.TEMPORARIES)

    def _copy_alongside(self, t: torch.Tensor, category: Category) -> None:
        for st in _storages(t):
            nb = self._rounded(st)
            if not nb:
                continue
            key = object()
            self._move(category, nb)
            if self.allocator is not None:
                self.allocator.malloc(id(key), nb)

            def freed(_ref, key=key, nb=nb, category=category):
                self._copies.pop(id(key), None)
                self._move(category, -nb)
                if self.allocator is not None:
                    self.allocator.free(id(key))

            self._copies[id(key)] = (key, weakref.ref(st, freed))

    @staticmethod
    def _tracked_resize_of(st: torch.UntypedStorage, tracker: MemoryTracker, size: int):
        return tracker._tracked_resize(st, size)

    def _tracked_resize(self, st: torch.UntypedStorage, size: int):
        """``UntypedStorage.resize_`` while tracking: FSDP2 frees a gathered parameter by resizing its storage
        to nothing and allocates it again by resizing it back, outside the dispatcher."""
        out = self._resize(st, size)
        if self._off_device:
            return out
        rec = self._lookup(st)
        if rec is None:
            self._add(st, Category.GATHERED_WEIGHTS)  # nothing when it is empty
        else:
            self._resized(rec, self._rounded(st))
        self._note("UntypedStorage.resize_")
        return out

    def _resized(self, rec: _Storage, nb: int) -> None:
        """A counted storage now holds ``nb`` bytes (0: freed, its record kept for when it grows again)."""
        if nb == rec.nbytes:
            return
        self._move(rec.category, nb - rec.nbytes)
        if self.allocator is not None:
            if rec.nbytes:
                self.allocator.free(id(rec))
            if nb:
                self.allocator.malloc(id(rec), nb)
        rec.nbytes = nb
        if nb:  # allocated again from here on
            rec.alloc_event = self._event

    def _lookup(self, st: torch.UntypedStorage) -> _Storage | None:
        rec = self._records.get(id(st))
        return rec if rec is not None and rec.ref is not None and rec.ref() is st else None

    def _rounded(self, st: torch.UntypedStorage) -> int:
        n = int(st.nbytes())
        return self.round_bytes(n) if n else 0

    def _add(self, st: torch.UntypedStorage, category: Category) -> None:
        nb = self._rounded(st)
        if nb == 0:
            return
        key = id(st)
        rec = _Storage(nb, category, self._event)
        rec.ref = weakref.ref(st, partial(self._on_free, key, rec))
        self._records[key] = rec
        self._move(category, nb)
        if self.allocator is not None:
            self.allocator.malloc(id(rec), nb)

    def _add_host(self, t: torch.Tensor, category: str) -> None:
        if t.device.type == "meta":  # shape-only placeholders own no memory
            return
        for st in _storages(t):
            known = self._host_refs.get(id(st))
            if known is not None and known() is st:  # counted already (an op that hands its input back)
                continue
            nb = int(st.nbytes())
            self._host_refs[id(st)] = weakref.ref(st, partial(self._on_host_free, id(st), category, nb))
            self._host_live[category] = live = self._host_live.get(category, 0) + nb
            peaks = self._host_peaks.setdefault(self._phase, {})
            peaks[category] = max(peaks.get(category, 0), live)

    def _on_host_free(self, key: int, category: str, nb: int, ref: weakref.ref) -> None:
        if self._host_refs.get(key) is ref:
            del self._host_refs[key]
        self._host_live[category] -= nb

    def _on_free(self, key: int, rec: _Storage, _ref: weakref.ref) -> None:
        if self._records.get(key) is rec:
            del self._records[key]
        self._move(rec.category, -rec.nbytes)
        if self.allocator is not None:
            self.allocator.free(id(rec))

    def _move(self, category: Category, nb: int) -> None:
        self.live_bytes += nb
        self._live_by_category[category] += nb

    def _categorize(
        self, t: torch.Tensor, category: Category, *, force: bool = False, add_missing: bool = True
    ) -> None:
        for st in _storages(t):
            rec = self._lookup(st)
            if rec is None:
                if add_missing:
                    self._add(st, category)
                continue
            old = rec.category
            if old == category or not (force or _RANK[category] > _RANK[old]):
                continue
            rec.category = category
            self._live_by_category[old] -= rec.nbytes
            self._live_by_category[category] += rec.nbytes
            # Live now and allocated before a peak means live at that peak: fix its breakdown.
            for peak in (self.peak, *self._phase_peaks.values()):
                if rec.alloc_event <= peak.event:
                    peak.breakdown[old] -= rec.nbytes
                    peak.breakdown[category] += rec.nbytes

    def _note(self, op: str) -> None:
        """Close one event: update the peaks and the timeline with the live total after `op`."""
        event, self._event = self._event, self._event + 1
        live = self.live_bytes
        if self._in_optimizer is not None:
            key = f"{self._phase}/{PART_OPTIMIZER}"
        else:
            key = f"{self._phase}/{self._part}" if self._part else self._phase
        if self.allocator is not None:
            note = getattr(self.allocator, "note", None)  # an allocator model may keep the parts' order
            if note is not None:
                note(key)
            alloc = self._part_alloc.setdefault(key, [0, 0])
            alloc[0] = max(alloc[0], self.allocator.allocated_bytes)
            alloc[1] = max(alloc[1], self.allocator.reserved_bytes)
        phase_peak = self._phase_peaks.get(key)
        new_peak = live > self.peak.bytes or self.peak.event < 0
        new_phase_peak = phase_peak is None or live > phase_peak.bytes
        pending = self._pending
        if not (new_peak or new_phase_peak or pending is None or live > pending.live_bytes):
            self._advance_timeline()
            return
        module, stage = self._where()
        if new_peak:
            self.peak = PeakInfo(live, event, op, module, stage, self._phase, dict(self._live_by_category))
        if new_phase_peak:
            self._phase_peaks[key] = PeakInfo(
                live, event, op, module, stage, self._phase, dict(self._live_by_category)
            )
        if pending is None or live > pending.live_bytes:
            self._pending = TimelinePoint(
                event, self._phase, op, module, stage, live, dict(self._live_by_category)
            )
        self._advance_timeline()

    def _advance_timeline(self) -> None:
        self._pending_count += 1
        if self._pending_count < self._stride:
            return
        assert self._pending is not None
        self._points.append(self._pending)
        self._pending, self._pending_count = None, 0
        if len(self._points) >= 2 * self._max_points:
            pts = self._points
            self._points = [max(pts[i : i + 2], key=lambda p: p.live_bytes) for i in range(0, len(pts), 2)]
            self._stride *= 2

    # ------------------------------------------------------------------ where are we

    def _where(self) -> tuple[str, str]:
        if self._in_optimizer is not None:
            return self._in_optimizer, "optimizer"
        in_backward = torch._C._current_graph_task_id() != -1
        if self._module_stack:
            return self._module_stack[-1][0], "recompute" if in_backward else "forward"
        if in_backward:
            return self._module_of_node(torch._C._current_autograd_node()), "backward"
        return NO_MODULE, "other"

    def _module_of_node(self, node: Any) -> str:
        if node is None:
            return NO_MODULE
        variable = getattr(node, "variable", None)  # AccumulateGrad: the parameter
        if variable is not None:
            return self._param_module.get(variable, NO_MODULE)
        seq = node._sequence_nr()
        i = bisect.bisect_right(self._segments, (seq, float("inf"), "")) - 1
        if i >= 0 and self._segments[i][0] <= seq < self._segments[i][1]:
            return self._segments[i][2]
        return NO_MODULE

    def _install_model_hooks(self, model: nn.Module) -> None:
        for qname, mod in model.named_modules():
            name = qname or type(model).__name__
            self._handles.append(mod.register_forward_pre_hook(partial(self._enter_module, name)))
            self._handles.append(
                mod.register_forward_hook(partial(self._exit_module, name), always_call=True)
            )
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _enter_module(self, name: str, mod: nn.Module, _args: Any) -> None:
        if self._sharded_type is not None and isinstance(mod, self._sharded_type):
            # FSDP2's own pre-forward hook ran first: the module's group is gathered now
            for p in _group_parameters(mod, self._sharded_type):
                self._categorize(p, Category.GATHERED_WEIGHTS, add_missing=False)
        self._module_stack.append((name, torch._C._autograd._get_sequence_nr()))

    def _exit_module(self, name: str, _mod: nn.Module, _args: Any, _out: Any) -> None:
        if not self._module_stack or self._module_stack[-1][0] != name:
            return  # unbalanced (an exception unwound a child): leave the stack alone
        _, start = self._module_stack.pop()
        end = torch._C._autograd._get_sequence_nr()
        # Autograd nodes created during this call got sequence nrs in [start, end). Children
        # finished first and own sub-ranges at the tail of `_segments`; this module fills the gaps.
        segs = self._segments
        i = len(segs)
        while i > 0 and segs[i - 1][0] >= start:
            i -= 1
        filled: list[tuple[int, int, str]] = []
        cursor = start
        for seg in segs[i:]:
            if seg[0] > cursor:
                filled.append((cursor, seg[0], name))
            filled.append(seg)
            cursor = max(cursor, seg[1])
        if cursor < end:
            filled.append((cursor, end, name))
        segs[i:] = filled
        if len(segs) > self._max_segments:
            del segs[: len(segs) // 2]

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._categorize(p.grad, Category.GRADIENTS, add_missing=False)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._categorize(t, Category.ACTIVATIONS, add_missing=False)
        return t

    def _install_optimizer_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        name = type(optimizer).__name__
        self._handles.append(optimizer.register_step_pre_hook(partial(self._enter_step, name)))
        self._handles.append(optimizer.register_step_post_hook(self._exit_step))

    def _enter_step(self, name: str, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        self._in_optimizer = name
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._categorize(p.grad, Category.GRADIENTS)

    def _exit_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        self._categorize_optimizer_state(optimizer)
        self._in_optimizer = None

    def _categorize_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # bitsandbytes' 8-bit optimizers build their quantization maps when constructed (``name2qmap``) and
        # put them in every parameter's state at the first step: optimizer state from the start
        for t in tree_leaves(getattr(optimizer, "name2qmap", {})):
            if isinstance(t, torch.Tensor):
                self._categorize(t, Category.OPTIMIZER_STATE)
        for state in optimizer.state.values():
            for t in tree_leaves(state):
                if isinstance(t, torch.Tensor):
                    self._categorize(t, Category.OPTIMIZER_STATE)
