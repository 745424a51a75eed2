"""Planning: predict a run's memory by simulating it on fake tensors."""

from fitune.planner.plan import Plan, plan

__all__ = ["Plan", "plan"]
