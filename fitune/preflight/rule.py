"""A doctor rule: one known failure as data plus a predicate over a ``DoctorContext``; ``gh`` names its
sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fitune.preflight.context import DoctorContext

Severity = Literal["error", "warning"]
Changes = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    id: str  # kebab-case, stable: users silence and search by it
    severity: Severity  # error: training refuses to start unless --force
    title: str  # one line for `fitune doctor --list`
    applies: Callable[[DoctorContext], bool]
    message: str  # template over `facts`: what would fail, why, and the offending value
    fix: Changes | Callable[[DoctorContext], Changes | None] | None  # dotted recipe keys -> value
    fix_text: str  # template: the fix in words (also when `fix` is None)
    source: tuple[str, ...]  # public issue URLs

    def fix_for(self, ctx: DoctorContext) -> Changes | None:
        changes = self.fix(ctx) if callable(self.fix) else self.fix
        return dict(changes) if changes else None


def gh(*refs: str) -> tuple[str, ...]:
    """'owner/repo#123' -> its GitHub URL (GitHub redirects /issues/N to /pull/N for pull requests)."""
    urls = []
    for ref in refs:
        repo, number = ref.split("#")
        urls.append(f"https://github.com/{repo}/issues/{number}")
    return tuple(urls)
