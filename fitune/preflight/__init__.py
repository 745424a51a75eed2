"""Preflight doctor: known fine-tuning failures checked against a recipe and an environment before launch."""

from __future__ import annotations

from fitune.preflight.checks import DoctorContext, Finding, apply_fixes, list_rules, run_rules
from fitune.preflight.run import doctor, environment_for

__all__ = ["DoctorContext", "Finding", "apply_fixes", "doctor", "environment_for", "list_rules", "run_rules"]
