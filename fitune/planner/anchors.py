"""Memory of many configurations from a few traced ones: the decomposition behind ``fitune plan --search``.

A search weighs hundreds of configurations; tracing each (``plan()``, 1-3 s for an 8B or 70B model) would
take minutes. Configurations are grouped by *structure*: the settings that change which operations the
training step runs (method, precision, gradient checkpointing, loss chunking). A structure is traced at up
to four *anchors*, each with the planner's own ``simulate`` at 2p and 3p decoder layers (or every layer of a
shallow model), as ``plan()`` traces:

- A1: the recipe's LoRA rank r0, micro-batch 1, no gradient accumulation, adamw;
- A2: as A1 with micro-batch E, the effective batch (when E > 1);
- A3: the searched rank r1 farthest from r0 (r0 for a full fine-tune), micro-batch 1, adamw8bit;
- A4: rank r1, micro-batch E, adamw8bit (adapters searched at several ranks, E > 1).

The search traces them lazily: A1 and A2 first, A3 once an 8-bit optimizer or another rank is weighed, A4
once another rank at another micro-batch is. Each trace's steady step gives the live bytes by category after
every op of the micro-batch (forward, loss, backward up to its last op), and at the peak of what follows it
(clipping and the optimizer step). A configuration is derived at each traced depth, then extrapolated to the
full depth as ``plan()`` extrapolates:

- micro-batch ``b`` and LoRA rank ``r``: a tensor's bytes scale with the tokens, with the rank, with both
  (the rank-``r`` projection of each token) or with neither, so the bytes live after an op are bilinear in
  ``(b, r)``. The anchors of a structure run the same ops in the same order (a micro-batch of 1 skips an
  ``expand`` or two; timelines are lined up on their common ops), so each op's bytes are interpolated, or
  extrapolated, between the anchors, and the peak is the largest op: exact for bilinear bytes;
- gradient accumulation: a later micro-batch of a group finds every gradient already allocated, so after
  each op the bytes are those traced, less the gradients there, plus all the gradients (as many bytes as the
  trainable weights; a new gradient is a temporary until it is added in place);
- optimizer: its state lives through the micro-batch, so every op carries the state of the configuration's
  optimizer: A1's adamw state or A3's 8-bit state, scaled by ``r`` over the anchor's rank for adapters
  (bitsandbytes keeps tensors under 4,096 elements in fp32; a small model's low-rank adapters can fall under
  that at one rank and not at the other, and the scaled 8-bit state is then off). The optimizer step's peak
  comes from the anchor with that optimizer; for adapters all its bytes but the frozen base scale with ``r``.
  ``paged_adamw8bit`` is planned as ``adamw8bit``, as ``plan()`` plans it (state resident on the device);
- attention: ``flash_attention_2`` cannot be traced on a machine without CUDA and flash-attn; it takes the
  ``sdpa`` trace, whose fused kernel saves the same tensors (q, k, v, the output and the log-sum-exp).

The peak is the larger of the load phase and the steady step, plus what the device adds as ``plan()`` adds
it: cuBLAS workspaces, and the caching allocator's whole blocks beyond the tensors, taken as the most any
anchor of the structure shows (whole-block counting follows no rule that interpolates; it moves a peak by
tens of MB, under 1% of an 8B model's). The first step is not derived: it runs the same ops without the
optimizer state, so it never exceeds the steady step. ``tests/test_search.py`` compares derived peaks with
direct ``plan()`` calls; BENCHMARKS-search.md lists the agreement on 8B models.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

from fitune.memory.simulate import Simulation
from fitune.memory.tracker import phase_of
from fitune.planner.plan import traced_runs

STEP_STAGES = ("backward", "recompute")
FROZEN = ("frozen_weights", "quant_state")
ALLOCATOR = "allocator_blocks"


def categories() -> tuple[str, ...]:
    from fitune.memory.tracker import Category

    return tuple(c.value for c in Category)


@dataclass
class Depth:
    """One simulation of an anchor, at its own number of decoder layers."""

    layers: int
    ops: tuple[tuple[str, str], ...]  # (op, stage) of each micro-batch point: how timelines line up
    step: Any  # numpy array, points x categories(): live bytes after each op of the micro-batch
    opt: Any  # numpy vector: bytes by category at the peak after the last backward op
    # part of the load phase -> bytes by category as plan() counts them (allocator blocks included)
    load: dict[str, dict[str, int]]
    excess: int  # allocator blocks beyond the tensors at the steady-step peak (CUDA)


@dataclass
class Anchor:
    depths: list[Depth]  # [2p, 3p] layers, or [all layers]
    k: float  # full depth = depths[0] + k * (depths[-1] - depths[0])

    @property
    def traced_layers(self) -> list[int]:
        return [d.layers for d in self.depths]

    @property
    def excess(self) -> int:
        a, b = self.depths[0].excess, self.depths[-1].excess
        return int(round(a + self.k * (b - a)))


def _depth(sim: Simulation) -> Depth:
    import numpy as np

    cats = categories()
    points = sim.timeline
    last = max((i for i, p in enumerate(points) if p["stage"] in STEP_STAGES), default=len(points) - 1)
    step, after = points[: last + 1], points[last + 1 :] or points[-1:]
    matrix = np.array([[p["by_category"].get(c, 0) for c in cats] for p in step], dtype=np.float64)
    opt = max(after, key=lambda p: p["live_bytes"])
    load = {}
    for name, part in sim.parts.items():
        if phase_of(name) == "load":
            load[name] = {**part["breakdown"], ALLOCATOR: max(0, (part["allocated"] or 0) - part["bytes"])}
    steady = sim.phase_peaks["steady_step"]
    return Depth(
        layers=sim.num_layers,
        ops=tuple((p["op"], p["stage"]) for p in step),
        step=matrix,
        opt=np.array([opt["by_category"].get(c, 0) for c in cats], dtype=np.float64),
        load=load,
        excess=max(0, sim.phase_allocated.get("steady_step", steady) - steady),
    )


def trace(recipe, *, source, device_model, warm_up: bool = True) -> Anchor:
    """Trace ``recipe`` at 2p and 3p decoder layers (or all of them), as ``plan()`` does. ``warm_up=False``
    skips the small first run that keeps lazy initialisations out of the trace, when one of this structure
    and optimizer already ran."""
    sims, k = traced_runs(recipe, source=source, device_model=device_model, warm_up=warm_up)
    return Anchor([_depth(sim) for sim in sims], k)


@dataclass(frozen=True)
class Point:
    """Where a configuration sits among its structure's anchors."""

    r: int
    batch_size: int
    grad_accum: int
    eight_bit: bool  # adamw8bit / paged_adamw8bit state instead of adamw's


@dataclass
class Derived:
    peak_bytes: int
    breakdown: dict[str, int]  # category -> bytes at the peak (sums to peak_bytes)
    phase: str  # load | steady_step
    region: str  # where: load, "<stage> of the micro-batch", ..., optimizer step


@functools.lru_cache(maxsize=64)
def _alignment(ops1: tuple[str, ...], ops2: tuple[str, ...]):
    """Indices of the points two timelines share, in order. Anchors run the same ops except a few that a
    size of 1 elides (``expand`` of the rotary frequencies to the batch), so the longest matching blocks
    line them up."""
    import numpy as np

    blocks = difflib.SequenceMatcher(None, ops1, ops2, autojunk=False).get_matching_blocks()
    i1 = np.concatenate([np.arange(b.a, b.a + b.size) for b in blocks] or [np.zeros(0, int)])
    i2 = np.concatenate([np.arange(b.b, b.b + b.size) for b in blocks] or [np.zeros(0, int)])
    return i1, i2, tuple(ops1[i] for i in i1)


def _combine(m1, ops1, m2, ops2, k: float):
    """Interpolate two anchors' micro-batch timelines op by op (``ops``: (op, stage) of each point)."""
    if m2 is None or not k:
        return m1, ops1
    if ops1 == ops2:
        return m1 + k * (m2 - m1), ops1
    i1, i2, ops = _alignment(ops1, ops2)
    return m1[i1] + k * (m2[i2] - m1[i1]), ops


def derive(
    point: Point,
    *,
    adapters: bool,
    r0: int,
    r1: int,
    effective_batch: int,
    a1: Anchor,
    a2: Anchor | None,
    a3: Anchor | None,
    a4: Anchor | None,
    extra: dict[str, int],
) -> Derived:
    """A configuration's peak from its structure's anchors (see the module docstring). ``extra``: the device
    overheads ``plan()`` adds to every phase (cuBLAS workspaces)."""
    import numpy as np

    cats = categories()
    col = {c: i for i, c in enumerate(cats)}
    kb = (point.batch_size - 1) / (effective_batch - 1) if effective_batch > 1 else 0.0
    kr = (point.r - r0) / (r1 - r0) if adapters and r1 != r0 else 0.0
    assert a2 is not None or not kb, "a micro-batch other than 1 needs A2"
    assert a4 is not None or not (kb and kr), "another rank at another micro-batch needs A4"
    state_anchor, state_rank = (a3, r1) if point.eight_bit else (a1, r0)
    assert state_anchor is not None, "an 8-bit configuration needs the 8-bit anchor"
    scale = point.r / state_rank if adapters else 1.0
    keep = np.array([1.0 if (c in FROZEN or not adapters) else scale for c in cats])

    def prepared(depth: Depth):
        m = depth.step.copy()
        m[:, col["optimizer_state"]] = state_anchor.depths[i].step[0, col["optimizer_state"]] * scale
        if point.grad_accum > 1:
            m[:, col["gradients"]] = m[:, col["trainable_weights"]]
        return m

    steady, loads, where = [], [], ""
    for i, d1 in enumerate(a1.depths):
        lo, lo_ops = _combine(prepared(d1), d1.ops, *_pair(a2, i, prepared), kb)
        if a3 is not None and kr:
            d3 = a3.depths[i]
            hi, hi_ops = _combine(prepared(d3), d3.ops, *_pair(a4, i, prepared), kb)
            lo, lo_ops = _combine(lo, lo_ops, hi, hi_ops, kr)
        peak = int(np.argmax(lo.sum(1)))
        fb, opt = lo[peak], state_anchor.depths[i].opt * keep
        if opt.sum() > fb.sum():
            steady.append(opt)
            where = "optimizer step"
        else:
            steady.append(fb)
            stage = lo_ops[peak][1]
            batch = "micro-batch" if point.grad_accum == 1 else "later micro-batch"
            where = f"{'loss' if stage == 'other' else stage} of the {batch}"
        load = d1.load
        if a3 is not None and kr:
            load = {name: _affine(part, a3.depths[i].load[name], kr) for name, part in load.items()}
        loads.append(load)

    k = a1.k
    steady_bytes = {
        c: int(round(steady[0][j] + k * (steady[-1][j] - steady[0][j]))) for j, c in enumerate(cats)
    }
    steady_bytes[ALLOCATOR] = max(a.excess for a in (a1, a2, a3, a4) if a is not None)
    # each part of the load grows in a straight line with depth; the load's peak is the largest at full depth
    load_bytes = max(
        (_affine(loads[0].get(name, {}), loads[-1][name], k) for name in loads[-1]),
        key=lambda b: sum(b.values()),
    )
    if sum(load_bytes.values()) > sum(steady_bytes.values()):
        phase, breakdown, where = "load", load_bytes, "load"
    else:
        phase, breakdown = "steady_step", steady_bytes
    breakdown = {c: v for c, v in {**breakdown, **extra}.items() if v}
    return Derived(sum(breakdown.values()), dict(sorted(breakdown.items())), phase, where)


def _pair(anchor: Anchor | None, i: int, prepared):
    if anchor is None:
        return None, None
    return prepared(anchor.depths[i]), anchor.depths[i].ops


def _affine(a: dict[str, int], b: dict[str, int], k: float) -> dict[str, int]:
    return {c: int(round(a.get(c, 0) + k * (b.get(c, 0) - a.get(c, 0)))) for c in set(a) | set(b)}


def lower_bound(
    a1: Anchor, extra: dict[str, int], *, r: int, adapters: bool, eight_bit_possible: bool
) -> int:
    """Bytes no configuration of A1's structure can go below: larger micro-batches, ranks and accumulation
    only add; an 8-bit state takes at least a quarter of adamw's (one byte per moment instead of four)."""
    d = derive(
        Point(r, 1, 1, False),
        adapters=adapters,
        r0=r,
        r1=r,
        effective_batch=1,
        a1=a1,
        a2=None,
        a3=None,
        a4=None,
        extra=extra,
    )
    if eight_bit_possible and d.phase == "steady_step":
        return d.peak_bytes - 3 * d.breakdown.get("optimizer_state", 0) // 4
    return d.peak_bytes
