"""Error types that fitune raises for its users.

Each carries a message that names what is wrong, the offending value and the fix. Internal invariants use
``assert``; anything a user can cause raises one of these.
"""

from __future__ import annotations


class FituneError(Exception):
    """Base class of errors caused by user input or environment."""


class RecipeError(FituneError):
    """A recipe is invalid. ``problems`` lists every problem found, each one line."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class ModelSourceError(FituneError):
    """A model source cannot be resolved or loaded."""


class DataError(FituneError):
    """A dataset cannot be read, or a line of it is bad (message names file:line). ``change`` is the recipe
    change that fixes it, where one does (dotted key -> value), for ``fitune doctor --fix``."""

    def __init__(self, message: str, change: dict | None = None):
        super().__init__(message)
        self.change = change


class PlanError(FituneError):
    """The training step cannot be simulated (names the op or module and what to do)."""


class RunFolderError(FituneError):
    """The output folder holds another run."""


class RunInterrupted(FituneError):
    """Ctrl-C or SIGTERM stopped a run; ``step`` is the last step it finished, when it was in the steps."""

    def __init__(self, signal_name: str, phase: str, step: int | None = None, message: str = ""):
        self.signal_name = signal_name
        self.phase = phase
        self.step = step
        super().__init__(message or f"interrupted by {signal_name}")


class OtherRankFailed(FituneError):
    """Another process of a distributed run failed, and said why itself; this one stops quietly."""
