"""fitune: fine-tune open LLMs on the hardware you have.

Public API: ``Recipe``, ``train``, ``plan``, ``measure``, ``doctor``; ``Listener`` for ``train(callbacks=...)``. Heavy modules (torch, transformers)
load on first use, so ``import fitune`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fitune.version import __version__

if TYPE_CHECKING:
    from fitune.recipe import Recipe
    from fitune.trainer.events import Listener
    from fitune.trainer.run import TrainResult

__all__ = ["Listener", "Recipe", "TrainResult", "doctor", "measure", "plan", "train", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Recipe":
        from fitune.recipe import Recipe

        return Recipe
    if name == "TrainResult":
        from fitune.trainer.run import TrainResult

        return TrainResult
    if name == "Listener":
        from fitune.trainer.events import Listener

        return Listener
    raise AttributeError(f"module 'fitune' has no attribute {name!r}")


def train(recipe, max_steps: int | None = None, **kwargs):
    """Train a recipe (a ``Recipe``, a dict or a YAML path); returns a ``TrainResult``.

    ``callbacks=[...]``: listeners of the run's events (subclasses of ``fitune.Listener``; see
    ``fitune/trainer/events.py``), e.g. to send each step's figures to your own tracker."""
    from fitune.trainer.run import train as _train

    return _train(_as_recipe(recipe), max_steps=max_steps, **kwargs)


def plan(recipe, **kwargs):
    """Predict a run's memory (a ``Plan``: peak_bytes, phases, breakdown, peak_op, peak_module, timeline)."""
    from fitune.planner.plan import plan as _plan

    return _plan(_as_recipe(recipe), **kwargs)


def measure(recipe):
    """Run the load and two real steps; a ``Measurement`` with peak_bytes and per-phase peaks."""
    from fitune.memory.measure import measure as _measure

    return _measure(_as_recipe(recipe))


def doctor(recipe, **kwargs):
    """Preflight checks of a recipe against this machine (or the catalog GPU it names): list of findings."""
    from fitune.preflight import doctor as _doctor

    return _doctor(_as_recipe(recipe), **kwargs)


def _as_recipe(recipe):
    from pathlib import Path

    from fitune.recipe import Recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.from_yaml(recipe)
    raise TypeError(f"expected a Recipe, a dict or a YAML path, got {type(recipe).__name__}")
