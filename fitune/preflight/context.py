"""What the doctor's rules read: the recipe, the environment, the model's config, the plan's peak, the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fitune.hardware.detect import Environment
    from fitune.recipe import Recipe


@dataclass
class DoctorContext:
    recipe: Recipe
    env: Environment | None  # None checks the recipe alone
    model_config: dict | None = None  # config.json of the model; the recipe's inline config when None
    planned_peak_bytes: int | None = None  # from `fitune plan`; memory rules are skipped without it
    margin: float = 0.10  # share of free memory kept back for what the plan cannot see
    data_examples: int | None = None  # usable examples, when the data check read the dataset
