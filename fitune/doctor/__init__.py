"""Preflight doctor: known fine-tuning failures checked against a recipe and an environment before launch."""

from __future__ import annotations

from fitune.doctor.checks import DoctorContext, Finding, apply_fixes, list_rules, run_rules

__all__ = ["DoctorContext", "Finding", "apply_fixes", "list_rules", "run_rules"]
