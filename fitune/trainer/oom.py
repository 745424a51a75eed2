"""The out-of-memory guard: explain an OOM against the plan and name a configuration that fits.

When any phase of a run (a step, eval, samples, checkpoint, save) runs out of memory, fitune compares what
the session holds (weights, gradients, optimizer state, measured from the live objects) with the plan's
breakdown at the peak of the same phase, names the category that outgrew its planned size, and plans a short
ladder of cheaper configurations to suggest the first that fits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from fitune.errors import FituneError


class OutOfMemory(FituneError):
    """Training ran out of memory; the message explains it against the plan."""

    def __init__(self, message: str, report: OomReport):
        super().__init__(message)
        self.report = report


@dataclass
class OomReport:
    phase: str
    step: int
    measured: dict[str, int]  # category -> bytes held when the error struck
    planned: dict[str, int]  # category -> bytes at the plan's peak of that phase
    outgrown: str  # the category furthest above its plan
    suggestion: dict | None = None  # dotted recipe changes of the first cheaper configuration that fits
    suggestion_peak: int | None = None
    notes: list[str] = field(default_factory=list)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def measured_breakdown(session) -> dict[str, int]:
    """Bytes the session holds now, by the plan's categories (activations: what the device adds on top)."""
    params = list(session.model.parameters())
    state = [v for s in session.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out = {
        "frozen_weights": _storage_bytes(p for p in params if not p.requires_grad),
        "trainable_weights": _storage_bytes(p for p in params if p.requires_grad),
        "gradients": _storage_bytes(p.grad for p in params),
        "optimizer_state": _storage_bytes(state),
    }
    if session.device.type == "cuda":
        in_use = torch.cuda.max_memory_allocated(session.device)
        out["activations_and_temporaries"] = max(0, in_use - sum(out.values()))
    return out


# cheapest first: the fused chunked loss costs no compute, recomputing the MLP's two projections costs a
# seventh of a forward pass, checkpointing every layer a whole one
LADDER = (
    {"train.loss_chunk": "auto"},
    {"train.lean_activations": True, "train.recompute_mlp": True},
    {"train.gradient_checkpointing": True},
    "halve-batch",
    {"method.kind": "qlora"},
)


def cheaper_configurations(recipe):
    """Cheaper variants of a recipe, each adding one change to the previous one."""
    changes: dict = {}
    for step in LADDER:
        if step == "halve-batch":
            if recipe.train.batch_size == 1:
                continue
            changes = {
                **changes,
                "train.batch_size": max(1, recipe.train.batch_size // 2),
                "train.grad_accum": recipe.train.grad_accum * 2,
            }
        else:
            step = {
                key: value
                for key, value in step.items()
                if getattr(getattr(recipe, key.split(".")[0]), key.split(".")[1]) != value
                and not (key == "train.loss_chunk" and recipe.train.loss_chunk != 0)  # a chunk is set
            }
            if not step:
                continue
            if step.get("method.kind") == "qlora" and recipe.method.kind == "full":
                step["method.kind"] = "lora"
            changes = {**changes, **step}
        yield dict(changes)


def explain(session, exc: BaseException, phase: str, step: int, budget_bytes: int | None) -> OutOfMemory:
    """Build the error the guard raises: what outgrew the plan, and what would fit."""
    from fitune.planner import plan as make_plan

    recipe = session.recipe
    measured = measured_breakdown(session)
    planned: dict[str, int] = {}
    report = OomReport(phase, step, measured, planned, outgrown="unknown")
    try:
        planned_run = make_plan(recipe)
        planned.update(planned_run.phase_breakdowns.get(phase) or {})
        if phase in planned_run.phases:
            report.notes.append(
                f"planned peak of {phase}: {_size(planned_run.phases[phase])}; of the whole run: "
                f"{_size(planned_run.peak_bytes)} ({planned_run.peak_phase})"
            )
        else:
            why = planned_run.absent.get(phase, "the plan has no such phase")
            report.notes.append(f"the plan has no {phase} phase ({why}); compared with its peak instead")
            planned.update(planned_run.breakdown)
        excess = {c: measured[c] - planned.get(c, 0) for c in measured if c in planned}
        if excess:
            report.outgrown = max(excess, key=excess.get)
        if budget_bytes:
            for changes in cheaper_configurations(recipe):
                candidate = make_plan(recipe.updated(changes))
                if candidate.peak_bytes <= 0.9 * budget_bytes:
                    report.suggestion, report.suggestion_peak = changes, candidate.peak_bytes
                    break
    except FituneError as err:  # the explanation must never hide the original error
        report.notes.append(f"the plan could not be made: {err}")
    lines = [
        f"out of memory in {phase} (step {step}) on {session.device}: {str(exc).splitlines()[0][:200]}",
        "held when it struck vs planned at the peak of that phase:",
    ]
    for cat, b in measured.items():
        lines.append(f"  {cat}: {_size(b)} held, {_size(planned.get(cat, 0))} planned")
    lines.append(f"the category furthest above its plan: {report.outgrown}")
    if report.suggestion:
        change = ", ".join(f"{k}: {v}" for k, v in report.suggestion.items())
        lines.append(f"next configuration that fits (planned peak {_size(report.suggestion_peak)}): {change}")
    elif budget_bytes:
        lines.append("no configuration on the ladder fits; run `fitune plan` with --search for more options")
    lines.extend(report.notes)
    return OutOfMemory("\n".join(lines), report)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def device_budget(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total
    from fitune.hardware.detect import host_memory

    return host_memory()[1]


@contextlib.contextmanager
def oom_guard(session, phase: str, step: int = 0):
    """Turn an out-of-memory error inside ``phase`` into the guard's explanation against the plan."""
    try:
        yield
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        if session.optimizer is not None:
            session.optimizer.zero_grad(set_to_none=True)
        raise explain(session, exc, phase, step, device_budget(session.device)) from exc
