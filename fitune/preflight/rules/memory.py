"""Rules for memory: the plan's peak against the free memory of the target.

They read ``DoctorContext.planned_peak_bytes``, which only the caller can supply (``fitune plan`` computes
it; the doctor never builds a model), and are skipped without it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fitune.preflight.readers import on_cuda, real
from fitune.preflight.rule import Rule
from fitune.preflight.sources import F5_DOES_NOT_FIT, K1_OOM

if TYPE_CHECKING:
    from fitune.preflight.context import DoctorContext


def _peak_over(ctx: DoctorContext, share: float) -> bool:
    """The planned peak is above ``share`` of the free memory (False when either is unknown)."""
    peak, env = ctx.planned_peak_bytes, ctx.env
    return (
        peak is not None
        and env is not None
        and env.free_memory_bytes > 0
        and peak > share * env.free_memory_bytes
    )


def _expandable_segments_on() -> bool:
    conf = f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')},{os.environ.get('PYTORCH_ALLOC_CONF', '')}"
    return "expandable_segments:true" in conf.replace(" ", "").lower()


_SHRINK = (
    "run `fitune plan` for a configuration that fits: train.gradient_checkpointing: true, a smaller "
    "train.batch_size with a larger train.grad_accum, method.kind: qlora, or a shorter train.seq_len"
)

RULES: list[Rule] = [
    Rule(
        id="memory-exceeds-free",
        severity="error",
        title="Planned peak memory above the free memory",
        applies=lambda c: _peak_over(c, 1.0),
        message="the plan's peak is {peak} but {target} has {free} free: the run would stop with an "
        "out-of-memory error, at the latest in the first optimizer step",
        fix=None,
        fix_text=_SHRINK,
        source=K1_OOM + F5_DOES_NOT_FIT,
    ),
    Rule(
        id="memory-within-margin",
        severity="warning",
        title="Planned peak memory inside the safety margin",
        applies=lambda c: _peak_over(c, 1.0 - c.margin) and not _peak_over(c, 1.0),
        message="the plan's peak of {peak} leaves {headroom} of the {free} free on {target}, less than the "
        "{margin_pct} margin kept for allocator fragmentation, the CUDA context and library workspaces",
        fix=None,
        fix_text=_SHRINK,
        source=K1_OOM,
    ),
    Rule(
        id="expandable-segments-off",
        severity="warning",
        title="Near-limit CUDA run without expandable allocator segments",
        applies=lambda c: (
            real(c) and on_cuda(c) and _peak_over(c, 1.0 - 2 * c.margin) and not _expandable_segments_on()
        ),
        message="the plan's peak of {peak} is close to the {free} free on {target}, and "
        "PYTORCH_CUDA_ALLOC_CONF does not enable expandable_segments: fragmentation of the caching "
        "allocator alone can turn a fitting run into an out-of-memory error",
        fix=None,
        fix_text="export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting the run",
        source=K1_OOM,
    ),
]
