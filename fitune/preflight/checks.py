"""Running the doctor: evaluate every rule against a context, report findings, apply their fixes.

``run_rules`` returns findings errors first; ``apply_fixes`` turns the unambiguous ones into a new recipe
and a unified diff of its YAML.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fitune.preflight.context import DoctorContext
from fitune.preflight.facts import Facts
from fitune.preflight.rules import RULES

if TYPE_CHECKING:
    from fitune.preflight.rule import Rule
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


def list_rules() -> list[Rule]:
    """Every rule the doctor checks, in evaluation order."""
    return list(RULES)


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
