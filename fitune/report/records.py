"""A run folder read back: its marker, rows, samples, plan and recipe, and the figures a report leads with.

Reading never changes the folder and never fails on a row a crash cut short (that row is skipped), so a
report can be made of a run that is still training, failed or ran out of memory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from fitune.errors import FituneError
from fitune.trainer.listeners import EVALS, METRICS, SAMPLES
from fitune.trainer.runfolder import PLAN, RECIPE, RUN_MARKER, read_marker


@dataclass
class RunRecords:
    out: Path
    marker: dict
    steps: list[dict] = field(default_factory=list)  # metrics.jsonl
    evals: list[dict] = field(default_factory=list)  # evals.jsonl
    samples: list[dict] = field(default_factory=list)  # samples.jsonl
    plan: dict | None = None
    recipe_yaml: str = ""

    @property
    def status(self) -> str:
        return self.marker.get("status", "unknown")

    @property
    def on_cuda(self) -> bool:
        return any("allocated_bytes" in row for row in self.steps)

    def samples_table(self) -> list[tuple[str, str | None, str | None]]:
        """(prompt, answer before training, answer after): a resumed run's first "before" is kept."""
        before: dict[str, str] = {}
        after: dict[str, str] = {}
        for row in sorted(self.samples, key=lambda r: r["step"]):
            if row["when"] == "before":
                before.setdefault(row["prompt"], row["answer"])
            else:
                after[row["prompt"]] = row["answer"]
        prompts = list(dict.fromkeys([*before, *after]))
        return [(p, before.get(p), after.get(p)) for p in prompts]

    @functools.cached_property
    def headline(self) -> dict:
        """The figures a person reads first (once per read of the folder)."""
        losses = [r["loss"] for r in self.steps]
        evals = [r for r in self.evals if r.get("loss") is not None]
        seconds = sum(r.get("step_s", 0.0) for r in self.steps)
        tokens = sum(r.get("tokens", 0) for r in self.steps)
        memory = [r["memory_bytes"] for r in self.steps if r.get("memory_bytes")]
        planned = None
        if self.plan is not None:
            planned = (self.plan.get("cuda") or {}).get("allocated") or self.plan["peak_bytes"]
        return {
            "status": self.status,
            "phase": self.marker.get("phase"),
            "error": self.marker.get("error"),
            "checkpoint_step": self.marker.get("checkpoint_step"),
            "steps_done": len(self.steps),
            "steps_total": self.marker.get("total_steps") or self.marker.get("steps"),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "eval_first": evals[0]["loss"] if evals else None,
            "eval_last": evals[-1]["loss"] if len(evals) > 1 else None,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "memory_peak": max(memory) if memory else None,
            "memory_kind": "allocated" if self.on_cuda else "resident",
            "plan_peak": planned,
            "plan_device": (self.plan.get("gpu") or self.plan.get("device")) if self.plan else None,
        }


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file the run writes (none when it is missing), a row cut short skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row a crash cut short
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_run(out: Path) -> RunRecords:
    """The run in folder ``out``; a folder that holds no fitune run is refused, naming it."""
    out = Path(out)
    if not out.is_dir():
        raise FituneError(f"{out}: no such folder; fix: give the output.dir of a run (runs/... by default)")
    marker = read_marker(out)
    if marker is None:
        raise FituneError(
            f"{out}: not a fitune run folder (no readable {RUN_MARKER}); fix: give the output.dir of a run, "
            "the folder fitune train wrote"
        )
    plan = None
    if (out / PLAN).is_file():
        try:
            plan = json.loads((out / PLAN).read_text(encoding="utf-8"))
        except ValueError:
            plan = None  # a plan cut short: the report goes on without it
    recipe = out / RECIPE
    return RunRecords(
        out=out,
        marker=marker,
        steps=read_rows(out / METRICS),
        evals=read_rows(out / EVALS),
        samples=read_rows(out / SAMPLES),
        plan=plan,
        recipe_yaml=recipe.read_text(encoding="utf-8") if recipe.is_file() else "",
    )
