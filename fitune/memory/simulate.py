"""Simulate a run on fake tensors: build the session and run the training step under the tracker.

Nothing here models memory by formula: the session builder and ``train_step`` are the ones training uses,
running inside ``FakeTensorMode`` (shapes and dtypes only), and the tracker records every storage.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch

from fitune.errors import FituneError, PlanError

PHASES = ("load", "first_step", "steady_step", "eval", "samples", "checkpoint", "save")
STEP_PHASES = ("first_step", "steady_step")


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
) -> Simulation:
    """Run load + two training steps of ``recipe`` on fake tensors; ``num_layers`` overrides the depth.

    ``host_is_device=False`` (planning for a GPU): work the session builder stages in host memory is not
    counted as device memory.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fitune.data.batching import synthetic_batch
    from fitune.memory.tracker import MemoryTracker, PeakInfo, largest, phase_of
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
        round_bytes=round_bytes or (lambda n: n), allocator=allocator, kernel_scratch=kernel_scratch
    )
    absent: dict[str, str] = {}
    notes: list[str] = []
    alloc_peaks: dict[str, tuple[int, int]] = {}
    start = time.perf_counter()
    try:
        with (
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
                )
            tracker.register_model(session.model)
            tracker.register_optimizer(session.optimizer)
            for phase in STEP_PHASES if steps else ():  # steps=False: the load alone
                with tracker.phase(phase), _allocator_phase(allocator, phase, alloc_peaks):
                    group = [
                        synthetic_batch(t.batch_size, t.seq_len, src.config.vocab_size)
                        for _ in range(min(t.grad_accum, 2))
                    ]
                    train_step(session, group)
                    del group
            for phase, run in _other_phases(recipe, session, src, absent, notes).items() if steps else ():
                with tracker.phase(phase), _allocator_phase(allocator, phase, alloc_peaks):
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
    # Beyond two micro-batches, gradient accumulation repeats the same forward and backward over buffers that
    # already exist; only the waiting micro-batches (host memory, where host is the device) add bytes.
    waiting = max(0, t.grad_accum - 2) if host_is_device else 0
    if waiting:
        per_batch = 2 * (round_bytes or (lambda n: n))(t.batch_size * t.seq_len * 8)  # ids + targets, int64
        for part, info in parts.items():
            if phase_of(part) in STEP_PHASES:
                info.bytes += waiting * per_batch
                info.breakdown = dict(info.breakdown)
                key = next(c for c in info.breakdown if getattr(c, "value", c) == "temporaries")
                info.breakdown[key] += waiting * per_batch
    traced = [name for name in PHASES if any(phase_of(part) == name for part in parts)]
    infos = {
        name: largest((info for part, info in parts.items() if phase_of(part) == name), PeakInfo(phase=name))
        for name in traced
    }
    part_alloc = tracker.part_allocator_peaks()
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
        for p in tracker.timeline
        if p.phase == "steady_step"
    ]
    return Simulation(
        num_layers=depth,
        phase_peaks={name: int(infos[name].bytes) for name in traced},
        peak_bytes=max(int(info.bytes) for info in infos.values()),
        peak_phase=tracker.peak_phase,
        peak_op=tracker.peak_op,
        peak_module=tracker.peak_module,
        peak_stage=tracker.peak_stage,
        breakdown=_by_name(tracker.breakdown_at_peak()),
        phase_breakdowns={name: _by_name(infos[name].breakdown) for name in traced},
        phase_peak_ops={name: infos[name].op for name in traced},
        phase_peak_modules={name: infos[name].module for name in traced},
        phase_peak_stages={name: infos[name].stage for name in traced},
        phase_allocated={name: a for name, (a, _) in alloc_peaks.items()},
        phase_reserved={name: r for name, (_, r) in alloc_peaks.items()},
        timeline=timeline,
        phase_host_peaks=tracker.host_phase_peaks(),
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


def _other_phases(recipe, session, source, absent: dict, notes: list) -> dict:
    """The phases after the steps that this recipe's run has, each a call into the code the training loop
    runs (``fitune.step.eval_loss``, ``fitune.trainer.phases``, ``fitune.trainer.checkpoint``) up to where it
    would read values; the others are named in ``absent``. They are traced after the steps, when the
    optimizer state exists, so each bounds the same phase earlier in the run (eval and samples before the
    first step) too."""
    from fitune.data.batching import synthetic_batch
    from fitune.step import eval_loss
    from fitune.trainer import phases
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
    from fitune.trainer.phases import prompt_lengths

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
