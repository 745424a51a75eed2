"""Running the doctor: evaluate every rule against a context, report findings, apply their fixes.

``run_rules`` returns findings errors first; ``apply_fixes`` turns the unambiguous ones into a new recipe
and a unified diff of its YAML. The memory rules live here because they read the plan's peak, which only
the caller can supply (``fitune plan`` computes it; the doctor never builds a model).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fitune.preflight.context import DoctorContext
from fitune.preflight.rules import RULES, Facts, Rule, gh, on_cuda, real

if TYPE_CHECKING:
    from fitune.recipe import Recipe

SEVERITY_ORDER = {"error": 0, "warning": 1, "note": 2}


@dataclass(frozen=True)
class Finding:
    rule_id: str
    severity: str  # "error" | "warning" | "note" (information, nothing to fix)
    message: str
    fix: dict[str, Any] | None  # dotted recipe keys -> value, or None when no single change exists
    fix_text: str
    source: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.severity} [{self.rule_id}]: {self.message}; fix: {self.fix_text}"


# --- memory rules ---------------------------------------------------------------------------------------------

K1_OOM = gh("meta-pytorch/torchtune#1185", "mistralai/mistral-finetune#69", "hiyouga/LlamaFactory#4559")
F5_DOES_NOT_FIT = gh("meta-llama/llama-cookbook#56", "meta-llama/llama-cookbook#333")


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

MEMORY_RULES: list[Rule] = [
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


# --- running ----------------------------------------------------------------------------------------------------


def list_rules() -> list[Rule]:
    """Every rule the doctor checks, in evaluation order."""
    return [*RULES, *MEMORY_RULES]


def _finding(rule: Rule, ctx: DoctorContext) -> Finding:
    facts = Facts(ctx)
    return Finding(
        rule_id=rule.id,
        severity=rule.severity,
        message=rule.message.format_map(facts),
        fix=rule.fix_for(ctx),
        fix_text=rule.fix_text.format_map(facts),
        source=rule.source,
    )


def run_rules(ctx: DoctorContext, rules: list[Rule] | None = None) -> list[Finding]:
    """Findings of every rule that applies to ``ctx``: errors first, then warnings, each in rule order."""
    findings = [
        _finding(rule, ctx) for rule in (rules if rules is not None else list_rules()) if rule.applies(ctx)
    ]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


def apply_fixes(recipe: Recipe, findings: list[Finding]) -> tuple[Recipe, list[str]]:
    """Apply every finding's fix (errors first, then in the given order) and diff the recipe's YAML.

    A fix that would set a key an earlier fix already set to another value is skipped whole, so a
    multi-key fix is never applied in part. Returns the validated new recipe and the unified diff lines.
    """
    changes: dict[str, Any] = {}
    for finding in sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity]):
        if not finding.fix:
            continue
        if any(key in changes and changes[key] != value for key, value in finding.fix.items()):
            continue
        changes.update(finding.fix)
    fixed = recipe.updated(changes) if changes else recipe
    diff = difflib.unified_diff(
        recipe.to_yaml().splitlines(),
        fixed.to_yaml().splitlines(),
        fromfile="recipe.yaml",
        tofile="recipe.yaml (fixed)",
        lineterm="",
    )
    return fixed, list(diff)
