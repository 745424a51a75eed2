"""``fitune report RUN_DIR``: the run as a page a person reads at a glance, PNG charts, and the plan as a
PyTorch memory snapshot.

Writes, in the run folder: ``report.html`` (self-contained: opens from ``file://`` and makes no request),
``report/*.png`` (one per chart) and ``report/plan.memory-snapshot.pickle`` (where the run has a plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fitune.report.charts import charts, write_pngs
from fitune.report.page import render
from fitune.report.records import read_run
from fitune.report.snapshot import SNAPSHOT, write_snapshot
from fitune.trainer.runfolder import write_atomic

PAGE = "report.html"
FOLDER = "report"


@dataclass
class ReportFiles:
    page: Path
    pngs: list[Path]
    snapshot: Path | None


def make_report(out: Path, *, pngs: bool = True) -> ReportFiles:
    """Read the run in ``out`` and write its report there; the run may still be training."""
    rec = read_run(Path(out))
    items = charts(rec)
    folder = rec.out / FOLDER
    png_paths = write_pngs(items, folder) if pngs else []
    snapshot = None
    if rec.plan is not None and rec.plan.get("timeline"):
        folder.mkdir(exist_ok=True)
        snapshot = write_snapshot(rec.plan, folder / SNAPSHOT)
    page = rec.out / PAGE
    text = render(rec, items, [p.name for p in png_paths], snapshot.name if snapshot else None)
    write_atomic(page, text)
    return ReportFiles(page, png_paths, snapshot)
