"""Simulate a run on fake tensors: build the session and run the training step under the tracker.

Nothing here models memory by formula: the session builder and ``train_step`` are the ones training uses,
running inside ``FakeTensorMode`` (shapes and dtypes only), and the tracker records every storage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field

import torch

from fitune.errors import FituneError, PlanError

AFTER_OPTIMIZER = "after_optimizer"  # the part of a step after its optimizer step (see simulate)
PHASES = ("load", "first_step", "steady_step", "eval", "samples", "checkpoint", "save")
STEP_PHASES = ("first_step", "steady_step")
GATHERED_RESULT = "gathered_result"  # host memory: a sharded run's trained weights gathered for the save


@dataclass
class Simulation:
    """What one fake run recorded; byte figures are after the device's allocator rounding."""

    num_layers: int
    phase_peaks: dict[str, int]
    peak_bytes: int
    peak_phase: str
    peak_op: str
    peak_module: str
    peak_stage: str
    breakdown: dict[str, int]  # category -> bytes at the peak
    phase_breakdowns: dict[str, dict[str, int]]
    phase_peak_ops: dict[str, str] = field(default_factory=dict)
    phase_peak_modules: dict[str, str] = field(default_factory=dict)
    phase_peak_stages: dict[str, str] = field(default_factory=dict)
    # with an allocator model: its allocated / reserved peaks per phase (whole blocks, segments)
    phase_allocated: dict[str, int] = field(default_factory=dict)
    phase_reserved: dict[str, int] = field(default_factory=dict)
    timeline: list[dict] = field(
        default_factory=list
    )  # steady step: event, op, module, live bytes by category
    # host memory the run keeps off the device (offloaded activations): phase -> name -> peak bytes
    phase_host_peaks: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    # phases the recipe's run does not have (no eval split, no prompts, no save_every): phase -> why
    absent: dict[str, str] = field(default_factory=dict)
    # how the samples phase was sized (tokenized prompts, or a stated bound)
    notes: list[str] = field(default_factory=list)
    # the peaks of each phase's parts (fitune.memory.tracker: the pass, "phase/optimizer", "phase/end"):
    # part -> bytes, breakdown, op, module, stage, and the allocator model's allocated / reserved peaks
    parts: dict[str, dict] = field(default_factory=dict)


@contextlib.contextmanager
def _fitune_never_packs():
    """fitune never packs several sequences into one row, and a real run finds that out by reading the
    position ids; fake tensors cannot be read, so transformers would assume packing and build a full mask.
    Tell it what the real run finds."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def _fake_params_move_in_place():
    """``module.to()`` swaps a fake parameter with its converted copy, which fake tensors refuse (the fake
    mode keeps weak references to them); on fake tensors, assigning the converted data is the same move."""
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor):
            with torch.no_grad():
                t1.data = t2.data
            return
        original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


@contextlib.contextmanager
def _fake_world(ranks: int):
    """Rank 0 of ``ranks`` processes, in this one: a fake process group (its collectives move nothing) and
    the device mesh the session shards over, built before the fake tensor mode is entered (building it reads
    values). Yields the mesh, or None for one process."""
    if ranks <= 1:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError(
            "a sharded run cannot be planned inside a distributed run; fix: plan it before launch"
        )
    dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (ranks,))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _allocator_phase(allocator, name: str, out: dict):
    """Per-phase peaks of an allocator model, as torch.cuda.reset_peak_memory_stats gives them."""
    if allocator is None:
        yield
        return
    allocator.peak_allocated = allocator.allocated_bytes
    allocator.peak_reserved = allocator.reserved_bytes
    yield
    out[name] = (allocator.peak_allocated, allocator.peak_reserved)


def with_layers(config, num_layers: int):
    """A copy of ``config`` with ``num_layers`` decoder layers (per-layer lists cut to match)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = num_layers
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list):
        cfg.layer_types = layer_types[:num_layers]
    return cfg


def simulate(
    recipe,
    *,
    source=None,
    num_layers: int | None = None,
    round_bytes=None,
    allocator=None,
    host_is_device: bool = True,
    steps: bool = True,
    kernel_scratch=None,
    steady_step_in_full: bool = False,
    ranks: int = 1,
) -> Simulation:
    """Run the load, the first training step and the later phases of ``recipe`` on fake tensors, and take
    the steady step from the first; ``num_layers`` overrides the depth.

    ``host_is_device=False`` (planning for a GPU): work the session builder stages in host memory is not
    counted as device memory.

    The steady step's micro-batches run the first step's operations on the same tensors with the optimizer
    state beside them, so they are taken from the first step (``_steady_from_first``), which halves the
    traced operations; its optimizer step is traced, run a second time on the first step's gradients once
    the state exists. On a CUDA target the allocator model replays the first step's allocations as the
    steady step's (``_replay_steady``), so its blocks and segments come out as after two real steps.
    ``steady_step_in_full`` traces a second training step instead; ``tests/test_plan.py`` checks that both
    give the same figures, part by part and op by op.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fitune.data.batching import synthetic_batch
    from fitune.memory.tracker import PART_END, Category, MemoryTracker, PeakInfo, largest, phase_of
    from fitune.models import sources
    from fitune.session import build_session
    from fitune.step import train_step

    if source is None:
        source = sources.resolve(recipe, need_weights=False)
    depth = num_layers if num_layers is not None else source.config.num_hidden_layers
    src = copy.copy(source)
    src.config = with_layers(source.config, depth)
    src.weights_dir = None
    t = recipe.train
    tracker = MemoryTracker(
        round_bytes=round_bytes or (lambda n: n),
        allocator=allocator,
        kernel_scratch=kernel_scratch,
        collective_copies=ranks > 1 and host_is_device,  # gloo, between CPUs
    )
    absent: dict[str, str] = {}
    notes: list[str] = []
    if ranks > 1:
        notes.append(
            f"sharded over {ranks} processes with FSDP2: every figure is one process's; "
            + (
                "each process builds the whole model before it shards it, so the load's peak does not shrink "
                "with more processes"
                if host_is_device
                else "each process prepares the whole model in host memory (staged_model) and moves it to its "
                "GPU one group at a time as it shards it"
            )
        )
        notes.append(
            "gloo copies every collective's buffer: counted as a second buffer for as long as FSDP2 holds its own"
            if host_is_device
            else "NCCL's own communication buffers (outside PyTorch's allocator) are not counted"
        )
    alloc_peaks: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    try:
        with (
            _fake_world(ranks) as mesh,
            FakeTensorMode(allow_non_fake_inputs=True),
            _fitune_never_packs(),
            _fake_params_move_in_place(),
            tracker,
        ):
            with tracker.phase("load"), _allocator_phase(allocator, "load", alloc_peaks):
                session = build_session(
                    recipe,
                    fake=True,
                    device="cpu",
                    source=src,
                    with_tokenizer=False,
                    host_staging=None if host_is_device else tracker.off_device,
                    mesh=mesh,
                )
            tracker.register_model(session.model)
            tracker.register_optimizer(session.optimizer)
            for phase in STEP_PHASES if steps else ():  # steps=False: the load alone
                if phase == "steady_step" and not steady_step_in_full:
                    continue
                derive = phase == "first_step" and not steady_step_in_full
                with (
                    tracker.phase(phase),
                    _allocator_phase(allocator, phase, alloc_peaks),
                    _steady_optimizer_step(session.optimizer, tracker, allocator, derive) as replay,
                ):
                    group = [
                        synthetic_batch(t.batch_size, t.seq_len, src.config.vocab_size)
                        for _ in range(min(t.grad_accum, 2))
                    ]
                    train_step(session, group)
                    del group
                if replay is not None:  # the steady step on the allocator model, after the first
                    alloc_peaks["steady_step"] = replay()
            for phase, run in _other_phases(recipe, session, src, absent, notes).items() if steps else ():
                # a sharded run's save gathers the result into host memory, tensor by tensor; on a GPU that is
                # not the device's (on a CPU it is)
                gathered = phase == "save" and ranks > 1 and not host_is_device
                with (
                    tracker.phase(phase),
                    _allocator_phase(allocator, phase, alloc_peaks),
                    tracker.off_device(GATHERED_RESULT) if gathered else contextlib.nullcontext(),
                ):
                    run()
    except FituneError:  # a user error the session builder names with its fix (PlanError included)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside the fake run must name where it happened
        op, module = tracker.failed_at or ("(before any op)", "setup")
        raise PlanError(
            f"the training step could not run on fake tensors: op {op} in module {module}: "
            f"{type(exc).__name__}: {str(exc)[:300]}. An operation that reads tensor values cannot be planned; "
            "fix: choose another attention kernel, method or optimizer for the plan, or report the op"
        ) from exc
    parts = tracker.part_peak_infos()
    part_alloc = tracker.part_allocator_peaks()
    host_peaks = tracker.host_phase_peaks()
    if steps and not steady_step_in_full:
        steady_points = _steady_from_first(parts, tracker.timeline)
        if "first_step" in host_peaks:
            host_peaks["steady_step"] = dict(host_peaks["first_step"])
    else:
        steady_points = [p for p in tracker.timeline if p.phase == "steady_step"]
    # Beyond two micro-batches, gradient accumulation repeats the same forward and backward over buffers that
    # already exist; only the waiting micro-batches (host memory, where host is the device) add bytes, until
    # the step lets its group go (before its end, as fitune.measure does).
    waiting = max(0, t.grad_accum - 2) if host_is_device else 0
    if waiting:
        per_batch = 2 * (round_bytes or (lambda n: n))(t.batch_size * t.seq_len * 8)  # ids + targets, int64
        for part, info in parts.items():
            if phase_of(part) in STEP_PHASES and not part.endswith(f"/{PART_END}"):
                info.bytes += waiting * per_batch
                info.breakdown = dict(info.breakdown)
                info.breakdown[Category.TEMPORARIES] = (
                    info.breakdown.get(Category.TEMPORARIES, 0) + waiting * per_batch
                )
    traced = [name for name in PHASES if any(phase_of(part) == name for part in parts)]
    infos = {
        name: largest((info for part, info in parts.items() if phase_of(part) == name), PeakInfo(phase=name))
        for name in traced
    }
    timeline = [
        {
            "event": p.event,
            "phase": p.phase,
            "op": p.op,
            "module": p.module,
            "stage": p.stage,
            "live_bytes": p.live_bytes,
            "by_category": _by_name(p.by_category),
        }
        for p in steady_points
    ]
    overall = largest(infos.values())
    return Simulation(
        num_layers=depth,
        phase_peaks={name: int(infos[name].bytes) for name in traced},
        peak_bytes=int(overall.bytes),
        peak_phase=overall.phase,
        peak_op=overall.op,
        peak_module=overall.module,
        peak_stage=overall.stage,
        breakdown=_by_name(overall.breakdown),
        phase_breakdowns={name: _by_name(infos[name].breakdown) for name in traced},
        phase_peak_ops={name: infos[name].op for name in traced},
        phase_peak_modules={name: infos[name].module for name in traced},
        phase_peak_stages={name: infos[name].stage for name in traced},
        phase_allocated={name: a for name, (a, _) in alloc_peaks.items()},
        phase_reserved={name: r for name, (_, r) in alloc_peaks.items()},
        timeline=timeline,
        phase_host_peaks=host_peaks,
        seconds=time.perf_counter() - start,
        absent=absent,
        notes=notes,
        parts={
            part: {
                "bytes": int(info.bytes),
                "breakdown": _by_name(info.breakdown),
                "op": info.op,
                "module": info.module,
                "stage": info.stage,
                "allocated": part_alloc.get(part, (None, None))[0],
                "reserved": part_alloc.get(part, (None, None))[1],
            }
            for part, info in parts.items()
            if phase_of(part) in PHASES
        },
    )


@contextlib.contextmanager
def _steady_optimizer_step(optimizer, tracker, allocator, active: bool):
    """While active: every optimizer step runs twice, the second as the steady step's (phase
    ``steady_step``), on the same gradients with the state the first created, as a later step finds it.
    Yields None, or with an allocator model a callable to run once the first step has ended: it replays
    the steady step on the allocator model (``_replay_steady``)."""
    if not active:
        yield None
        return
    own = "step" in vars(optimizer)  # an LR scheduler wraps the bound method on the instance
    original = optimizer.step
    part = tracker._part
    recorder = _StepRecorder(allocator) if allocator is not None else None

    @functools.wraps(original)  # keeps what the LR scheduler marked on it
    def step(*args, **kwargs):
        if recorder is not None:
            recorder.segment = "first_optimizer"
        out = original(*args, **kwargs)
        if recorder is not None:
            recorder.segment = "steady_optimizer"
        with tracker.phase("steady_step"):
            original(*args, **kwargs)
        if recorder is not None:
            recorder.segment = "after"
        # what the step does after its optimizer step (the state beside it) is a part of its own: the
        # micro-batches' part is the one the steady step's is taken from
        tracker._part = AFTER_OPTIMIZER
        return out

    optimizer.step = step
    if recorder is not None:
        tracker.allocator = recorder
    try:
        yield None if recorder is None else functools.partial(_replay_steady, recorder, tracker)
    finally:
        tracker._part = part
        tracker.allocator = allocator
        if own:
            optimizer.step = original
        else:
            del optimizer.step


class _StepRecorder:
    """The allocator model as the tracker drives it through the first step: every call goes through and is
    kept, with the segment of the step it came in (``pass``, ``first_optimizer``, ``steady_optimizer``,
    ``after``) and the tracker's notes between them. The second optimizer step's allocations are kept only
    (they are no part of the first step): ``_replay_steady`` replays them in the steady step."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.segment = "pass"
        self.events: list[tuple[str, str, object, int]] = []
        self._kept: set[int] = set()

    def malloc(self, key: int, nbytes: int) -> None:
        self.events.append((self.segment, "malloc", key, nbytes))
        if self.segment == "steady_optimizer":
            self._kept.add(key)
        else:
            self.inner.malloc(key, nbytes)

    def free(self, key: int) -> None:
        self.events.append((self.segment, "free", key, 0))
        if key in self._kept:
            self._kept.discard(key)
        else:
            self.inner.free(key)

    def note(self, part: str) -> None:
        self.events.append((self.segment, "note", part, 0))

    @property
    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.inner.reserved_bytes


def _replay_steady(recorder: _StepRecorder, tracker) -> tuple[int, int]:
    """The steady step on the allocator model, from the first step's calls, once the first step has ended:
    its micro-batches' calls again (fresh keys), the second optimizer step's, then what followed it. Sets
    the allocator's peaks of the steady step's parts as tracing a second step sets them, and returns the
    phase's (allocated, reserved) peaks."""
    from fitune.memory.tracker import PART_END

    alloc = recorder.inner
    alloc.peak_allocated, alloc.peak_reserved = alloc.allocated_bytes, alloc.reserved_bytes
    peaks: dict[str, list[int]] = {}

    def note(part: str) -> None:
        peak = peaks.setdefault(part, [0, 0])
        peak[0] = max(peak[0], alloc.allocated_bytes)
        peak[1] = max(peak[1], alloc.reserved_bytes)

    note("steady_step")  # the phase opens
    keys: dict[object, object] = {}
    for segment, kind, key, nbytes in recorder.events:
        if segment == "first_optimizer":  # creates the state, which the steady step finds in place
            continue
        if kind == "malloc":
            fresh = object()
            alloc.malloc(id(fresh), nbytes)
            keys[key] = (fresh, id(fresh))
        elif kind == "free":
            if key in keys:  # allocated in the step; anything older was freed once, in the first step
                alloc.free(keys.pop(key)[1])
        elif segment != "steady_optimizer" or key.startswith("steady_step/"):
            note("steady_step" + key[len("first_step") :] if key.startswith("first_step") else key)
    peaks[f"steady_step/{PART_END}"] = [alloc.allocated_bytes, alloc.reserved_bytes]
    for part, (allocated, reserved) in peaks.items():
        tracker._part_alloc[part] = [allocated, reserved]
    return alloc.peak_allocated, alloc.peak_reserved


def _steady_from_first(parts: dict, points: list) -> list:
    """The steady step from the first: its micro-batches (and the clipping after them) are the first step's
    with the optimizer state the first optimizer step created beside them, op for op; its optimizer step
    is the traced second one; it ends as the first step ends. Returns the steady step's timeline points."""
    from fitune.memory.tracker import PART_END, Category

    first, end = parts.get("first_step"), parts.get(f"first_step/{PART_END}")
    if first is None or end is None:
        return [p for p in points if p.phase == "steady_step"]
    # the state the first optimizer step created (an optimizer may hold a little from its construction on)
    before = first.breakdown.get(Category.OPTIMIZER_STATE, 0)
    state = end.breakdown.get(Category.OPTIMIZER_STATE, 0) - before
    breakdown = dict(first.breakdown)
    breakdown[Category.OPTIMIZER_STATE] = before + state
    parts["steady_step"] = dataclasses.replace(
        first, bytes=first.bytes + state, breakdown=breakdown, phase="steady_step"
    )
    for name in (AFTER_OPTIMIZER, PART_END):  # with the state already there: as the first step's
        if f"first_step/{name}" in parts:
            info = parts[f"first_step/{name}"]
            parts[f"steady_step/{name}"] = dataclasses.replace(
                info, breakdown=dict(info.breakdown), phase="steady_step"
            )
    # the first step's points up to its optimizer step, carrying the state; the traced optimizer step; the
    # first step's points after its optimizer step
    first_points = [p for p in points if p.phase == "first_step"]
    stages = [p.stage for p in first_points]
    cut = stages.index("optimizer") if "optimizer" in stages else len(stages)
    resume = len(stages) - stages[::-1].index("optimizer") if "optimizer" in stages else len(stages)
    shifted = []
    for p in first_points[:cut]:
        by_category = dict(p.by_category)
        by_category[Category.OPTIMIZER_STATE] = by_category.get(Category.OPTIMIZER_STATE, 0) + state
        shifted.append(
            dataclasses.replace(
                p, phase="steady_step", live_bytes=p.live_bytes + state, by_category=by_category
            )
        )
    nested = [p for p in points if p.phase == "steady_step" and p.op != "phase:steady_step"]
    after = [dataclasses.replace(p, phase="steady_step") for p in first_points[resume:]]
    return shifted + nested + after


def _other_phases(recipe, session, source, absent: dict, notes: list) -> dict:
    """The phases after the steps that this recipe's run has, each a call into the code the training loop
    runs (``fitune.step.eval_loss``, ``fitune.phases``, ``fitune.trainer.checkpoint``) up to where it
    would read values; the others are named in ``absent``. They are traced after the steps, when the
    optimizer state exists, so each bounds the same phase earlier in the run (eval and samples before the
    first step) too."""
    from fitune import phases
    from fitune.data.batching import synthetic_batch
    from fitune.step import eval_loss
    from fitune.trainer.checkpoint import checkpoint_state

    t = recipe.train
    runs = {}
    if recipe.data is not None and recipe.data.eval_fraction > 0:
        # the longest eval micro-batch: train.batch_size examples of seq_len tokens
        runs["eval"] = lambda: eval_loss(
            session, [synthetic_batch(t.batch_size, t.seq_len, source.config.vocab_size)]
        )
    else:
        absent["eval"] = "no eval split (data.eval_fraction: 0, or no data section)"
    prompts = recipe.samples.prompts
    if prompts:
        longest, how = _longest_prompt(source, tuple(prompts))
        notes.append(
            f"samples: longest prompt {longest} tokens ({how}) + {recipe.samples.max_new_tokens} new tokens, "
            "KV cache included"
        )
        runs["samples"] = lambda: phases.generation_bound(session, longest, recipe.samples.max_new_tokens)
    else:
        absent["samples"] = "no sample prompts (samples.prompts is empty)"
    if recipe.output.save_every:
        runs["checkpoint"] = lambda: checkpoint_state(session)
    else:
        absent["checkpoint"] = "no checkpoints during the run (output.save_every is not set)"
    runs["save"] = lambda: phases.saved_state(session)
    return runs


_PROMPT_LENGTHS: dict[tuple, tuple[int, str]] = {}  # (tokenizer source, prompts) -> longest, how found


def _longest_prompt(source, prompts: tuple[str, ...]) -> tuple[int, str]:
    """The longest prompt in tokens with the run's tokenizer when its files are at hand, else a bound; kept
    for the process, as every traced depth of one plan asks the same."""
    from fitune.models.tokenizers import load_tokenizer
    from fitune.phases import prompt_lengths

    key = (source.tokenizer_source, prompts)
    if key not in _PROMPT_LENGTHS:
        try:
            tok = load_tokenizer(source, source.config)
        except FituneError:  # no tokenizer at hand is not an error for the plan: the bound is used
            tok = None
        lengths, how = prompt_lengths(list(prompts), tok)
        _PROMPT_LENGTHS[key] = max(lengths), how
    return _PROMPT_LENGTHS[key]


def _by_name(by_category: dict) -> dict[str, int]:
    return {getattr(c, "value", str(c)): int(v) for c, v in by_category.items()}
