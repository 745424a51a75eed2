"""The report's charts, described once: the page draws them with uPlot, ``write_pngs`` with matplotlib."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fitune.report.records import RunRecords

GIB = 2**30
# plan phases drawn on the memory chart, and their colours
PHASE_COLORS = {
    "load": "#4c72b0",
    "first_step": "#937860",
    "steady_step": "#c44e52",
    "eval": "#55a868",
    "samples": "#8172b3",
    "checkpoint": "#64b5cd",
    "save": "#8c8c8c",
}


@dataclass
class Series:
    label: str
    values: list[float | None]  # one per x; None where the series has no point
    color: str
    dash: bool = False  # a reference line (the plan, the device limit), not a measurement
    points: bool = False  # points joined across gaps (evals come every few steps)


@dataclass
class Chart:
    id: str
    title: str
    unit: str
    x: list[int]
    series: list[Series] = field(default_factory=list)
    note: str = ""
    x_label: str = "step"
    x_names: list[str] | None = (
        None  # what each x stands for, shown as the cursor moves (an op and its module)
    )

    @property
    def empty(self) -> bool:
        return not self.x or all(v is None for s in self.series if not s.dash for v in s.values)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "unit": self.unit,
            "note": self.note,
            "x": self.x,
            "x_label": self.x_label,
            "x_names": self.x_names,
            "series": [vars(s) for s in self.series],
        }


def _column(rows: list[dict], key: str, steps: list[int], scale: float = 1.0) -> list[float | None]:
    by_step = {r["step"]: r.get(key) for r in rows}
    return [None if by_step.get(s) is None else by_step[s] / scale for s in steps]


def charts(rec: RunRecords) -> list[Chart]:
    """Loss (train and eval), learning rate, gradient norm, tokens/s and memory against the plan."""
    steps = [r["step"] for r in rec.steps]
    eval_steps = [r["step"] for r in rec.evals]
    loss_x = sorted(set(steps) | set(eval_steps))
    out = [
        Chart(
            "loss",
            "Loss",
            "",
            loss_x,
            [
                Series("train loss", _column(rec.steps, "loss", loss_x), "#4c72b0"),
                Series("eval loss", _column(rec.evals, "loss", loss_x), "#dd8452", points=True),
            ],
        ),
        Chart(
            "lr",
            "Learning rate",
            "",
            steps,
            [Series("learning rate", _column(rec.steps, "lr", steps), "#55a868")],
        ),
        Chart(
            "grad_norm",
            "Gradient norm (before clipping)",
            "",
            steps,
            [Series("gradient norm", _column(rec.steps, "grad_norm", steps), "#8172b3")],
        ),
        Chart(
            "tokens_per_s",
            "Throughput",
            "tokens/s",
            steps,
            [Series("tokens/s", _column(rec.steps, "tokens_per_s", steps), "#937860")],
        ),
        _memory(rec, steps),
    ]
    return [c for c in out if not c.empty]


def _unit(largest: int) -> tuple[str, int]:
    """A memory chart's unit: GiB once its largest figure reaches one, else MiB (as ``human_bytes``)."""
    return ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)


def _memory(rec: RunRecords, steps: list[int]) -> Chart:
    """Memory over the steps, with the plan's phase peaks and the device's limit as lines (GiB, or MiB for a
    run that never reaches one GiB)."""
    plan = rec.plan
    unit, size = _unit(
        max([r.get("memory_bytes") or 0 for r in rec.steps] + [plan["peak_bytes"] if plan else 0])
    )
    chart = Chart("memory", "Memory", unit, steps)
    if rec.on_cuda:
        chart.series += [
            Series("peak allocated so far", _column(rec.steps, "memory_bytes", steps, size), "#c44e52"),
            Series("allocated after the step", _column(rec.steps, "allocated_bytes", steps, size), "#dd8452"),
            Series("reserved after the step", _column(rec.steps, "reserved_bytes", steps, size), "#f2c45f"),
        ]
        chart.note = "CUDA: what torch.cuda reports; the plan's lines are its allocated peak per phase"
    else:
        chart.series.append(
            Series(
                "resident memory of the process", _column(rec.steps, "memory_bytes", steps, size), "#c44e52"
            )
        )
        chart.note = (
            "CPU: the process's resident memory (Python, libraries and tensors); the plan's lines count the "
            "run's tensors only"
        )
    if plan is not None and steps:
        for phase, peak in plan.get("phases", {}).items():
            color = PHASE_COLORS.get(phase, "#999999")
            chart.series.append(Series(f"plan: {phase}", [peak / size] * len(steps), color, dash=True))
        limit = device_limit(plan)
        if limit is not None:
            chart.series.append(Series("device memory", [limit / size] * len(steps), "#000000", dash=True))
    return chart


def plan_chart(plan: dict) -> Chart | None:
    """The plan's steady step (of the traced model), op by op: live bytes in all and per category."""
    from fitune.planner.report import CATEGORY_COLORS

    timeline = plan.get("timeline") or []
    if not timeline:
        return None
    unit, size = _unit(max(r["live_bytes"] for r in timeline))
    used = [c for c in timeline[0]["by_category"] if any(r["by_category"].get(c) for r in timeline)]
    series = [Series("all", [r["live_bytes"] / size for r in timeline], "#222222")]
    series += [
        Series(c, [r["by_category"].get(c, 0) / size for r in timeline], CATEGORY_COLORS.get(c, "#999999"))
        for c in used
    ]
    return Chart(
        "plan_timeline",
        "One steady step, op by op",
        unit,
        list(range(len(timeline))),
        series,
        note=f"traced with {_layers(plan)}, which the plan scales to the full depth for its peaks; the cursor "
        "names each op and its module",
        x_label="op",
        x_names=[f"{r['op']} in {r['module']} ({r['stage']})" for r in timeline],
    )


def _layers(plan: dict) -> str:
    traced = plan.get("traced_layers") or []
    total = plan.get("num_layers")
    if not traced or traced[-1] == total:  # the timeline is the deeper traced run's
        return "every decoder layer"
    return f"{traced[-1]} of the model's {total} decoder layers"


def device_limit(plan: dict) -> int | None:
    """The planned GPU's memory (the catalog's figure); none for a CPU."""
    if plan.get("device") != "cuda" or not plan.get("gpu"):
        return None
    from fitune.errors import FituneError
    from fitune.hardware.catalog import get_gpu

    try:
        return get_gpu(plan["gpu"]).memory_bytes
    except FituneError:  # a GPU the catalog of this version does not know
        return None


def write_pngs(items: list[Chart], folder: Path) -> list[Path]:
    """One PNG a chart (matplotlib, Agg), for a README, a slide or an issue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for chart in items:
        fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
        for s in chart.series:
            points = [(x, v) for x, v in zip(chart.x, s.values, strict=True) if v is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = {"linestyle": "--", "linewidth": 1} if s.dash else {"linewidth": 1.6}
            ax.plot(
                xs, ys, color=s.color, label=s.label, marker="o" if s.points else None, markersize=3, **style
            )
        ax.set_title(chart.title)
        ax.set_xlabel("step")
        if chart.unit:
            ax.set_ylabel(chart.unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = folder / f"{chart.id}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
