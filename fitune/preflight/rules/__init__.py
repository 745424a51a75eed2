"""The doctor's rules: known failures of LLM fine-tuning, each as data plus one small predicate.

A rule is caught before launch from what a ``DoctorContext`` holds: the recipe, the environment, the
model's ``config.json`` when known and the planned peak memory. Each one names the public reports it was
distilled from (shared/error-catalog.md, in ``fitune.preflight.sources``), says in plain words what would fail
and why, and gives the recipe change that avoids it when exactly one exists. Message and fix texts are
templates filled from ``fitune.preflight.facts``; the predicates read the context through
``fitune.preflight.readers``.

The rules are grouped by concept, one module each, and checked in this order. To add a rule: append a
``Rule`` to its group's ``RULES`` and a trigger/clear case to ``tests/test_doctor.py``.
"""

from __future__ import annotations

from fitune.preflight.rule import Rule
from fitune.preflight.rules import bitsandbytes, data, gpu, memory, method, precision, sequence, sharding

RULES: list[Rule] = [
    *gpu.RULES,
    *precision.RULES,
    *bitsandbytes.RULES,
    *sharding.RULES,
    *method.RULES,
    *sequence.RULES,
    *data.RULES,
    *memory.RULES,
]
