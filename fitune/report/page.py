"""The run report as one self-contained HTML page: data, uPlot and the drawing code inlined.

The page's Content-Security-Policy forbids every request (``default-src 'none'``), so it opens from
``file://``, offline, and nothing it holds leaves the machine. After drawing it counts the charts whose
canvas holds pixels (``data-charts-drawn`` on ``<body>``), which the browser test reads.
"""

from __future__ import annotations

import html
import json
from importlib import resources

from fitune.memory import human_bytes
from fitune.planner.report import CATEGORY_COLORS
from fitune.report.charts import Chart
from fitune.report.records import RunRecords

STATUS_WORDS = {
    "done": ("done", "#2e7d32"),
    "running": ("training", "#1565c0"),
    "failed": ("failed", "#c62828"),
    "out_of_memory": ("out of memory", "#c62828"),
    "interrupted": ("interrupted", "#ef6c00"),
}


def _vendor(name: str) -> str:
    return resources.files("fitune.report").joinpath("vendor", name).read_text(encoding="utf-8")


def _gib(n: int | float | None) -> str:
    return "—" if n is None else human_bytes(n)


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _script_json(value) -> str:
    """JSON that cannot end the <script> element it sits in."""
    return json.dumps(value).replace("</", "<\\/")


def headline(rec: RunRecords) -> str:
    """The run in one sentence."""
    h = rec.headline
    total = h["steps_total"]
    of = f" of {total}" if total else ""
    parts = []
    if h["loss_first"] is not None:
        parts.append(f"loss {_num(h['loss_first'])} → {_num(h['loss_last'])}")
    if h["eval_first"] is not None:
        after = f" → {_num(h['eval_last'])}" if h["eval_last"] is not None else " (before training)"
        parts.append(f"eval loss {_num(h['eval_first'])}{after}")
    if h["tokens_per_s"] is not None:
        parts.append(f"{h['tokens_per_s']:,.0f} tokens/s")
    if h["memory_peak"] is not None:
        parts.append(f"peak {h['memory_kind']} memory {_gib(h['memory_peak'])}")
    if h["plan_peak"] is not None:
        parts.append(f"plan {_gib(h['plan_peak'])} on {h['plan_device']}")
    figures = "; ".join(parts)
    status = h["status"]
    if status == "done":
        return f"Trained {h['steps_done']}{of} steps: {figures}."
    if status == "running":
        return f"Training, step {h['steps_done']}{of}: {figures}." if parts else "Training: no step yet."
    word = STATUS_WORDS.get(status, (status, ""))[0]
    said = f"Ended {word} in phase {h['phase']} after {h['steps_done']}{of} steps"
    return f"{said}: {figures}." if parts else f"{said}."


def _status_box(rec: RunRecords) -> str:
    h = rec.headline
    if h["status"] in ("done", "running"):
        return ""
    lines = [f"<b>{html.escape(STATUS_WORDS.get(h['status'], (h['status'],))[0])}</b> in phase "]
    lines.append(f"<code>{html.escape(str(h['phase']))}</code>")
    if h["error"]:
        lines.append(f"<pre>{html.escape(h['error'])}</pre>")
    if h["checkpoint_step"] is not None:
        lines.append(
            f"<p>The checkpoint of step {h['checkpoint_step']} is complete: the same command with "
            "<code>--resume</code> continues from it.</p>"
        )
    else:
        lines.append("<p>No checkpoint was written: the same command starts the run again.</p>")
    return f'<section class="problem">{"".join(lines)}</section>'


def _cards(rec: RunRecords) -> str:
    h = rec.headline
    total = f" / {h['steps_total']}" if h["steps_total"] else ""
    cards = [
        ("steps", f"{h['steps_done']}{total}"),
        ("train loss", f"{_num(h['loss_first'])} → {_num(h['loss_last'])}"),
        ("eval loss", f"{_num(h['eval_first'])} → {_num(h['eval_last'])}"),
        ("tokens/s", "—" if h["tokens_per_s"] is None else f"{h['tokens_per_s']:,.0f}"),
        (f"peak {h['memory_kind']}", _gib(h["memory_peak"])),
        ("planned peak", _gib(h["plan_peak"])),
    ]
    return "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{html.escape(v)}</div></div>'
        for k, v in cards
    )


def _plan_section(plan: dict | None) -> str:
    if plan is None:
        return "<p>This run folder holds no plan.json.</p>"
    phases = plan.get("phases", {})
    breakdowns = plan.get("phase_breakdowns", {})
    top = max(phases.values(), default=0) or 1
    rows = []
    for phase, peak in phases.items():
        parts = breakdowns.get(phase) or {}
        bars = "".join(
            f'<span style="width:{100 * b / top:.2f}%;background:{CATEGORY_COLORS.get(c, "#999")}" '
            f'title="{html.escape(c)}: {_gib(b)}"></span>'
            for c, b in parts.items()
            if b > 0
        )
        rows.append(
            f'<tr><th>{html.escape(phase)}</th><td class="bar">{bars}</td><td class="n">{_gib(peak)}</td></tr>'
        )
    used = sorted({c for parts in breakdowns.values() for c, b in parts.items() if b > 0})
    legend = "".join(
        f'<span class="sw" style="background:{CATEGORY_COLORS.get(c, "#999")}"></span>{html.escape(c)} '
        for c in used
    )
    at = (
        f"Peak {_gib(plan['peak_bytes'])} in <code>{html.escape(plan['peak_phase'])}</code> "
        f"({html.escape(plan.get('peak_stage', ''))}), at <code>{html.escape(plan['peak_op'])}</code> in "
        f"<code>{html.escape(plan['peak_module'])}</code>."
    )
    notes = "".join(
        f"<li>{html.escape(n)}</li>" for n in [plan.get("attention", ""), *plan.get("notes", [])] if n
    )
    absent = "".join(
        f"<li>{html.escape(p)}: {html.escape(why)}</li>" for p, why in plan.get("absent", {}).items()
    )
    return (
        f'<p>{at}</p><table class="plan">{"".join(rows)}</table><p class="legend">{legend}</p>'
        f"<ul>{notes}{absent}</ul>"
    )


def _samples_section(rec: RunRecords) -> str:
    table = rec.samples_table()
    if not table:
        return "<p>The recipe has no samples.prompts.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(p)}</td><td><pre>{html.escape(b if b is not None else '—')}</pre></td>"
        f"<td><pre>{html.escape(a if a is not None else '—')}</pre></td></tr>"
        for p, b, a in table
    )
    return f'<table class="samples"><tr><th>prompt</th><th>before</th><th>after</th></tr>{rows}</table>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.badge{display:inline-block;color:#fff;border-radius:4px;padding:1px 8px;font-size:13px;vertical-align:middle}
.lead{font-size:16px;margin:8px 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:140px}
.card .k{color:#666;font-size:12px}.card .v{font-size:17px;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:16px}
.chart{border:1px solid #eee;border-radius:6px;padding:8px}.chart h3{margin:0 0 4px;font-size:14px}
.note{color:#666;font-size:12px}
.problem{border:2px solid #c62828;background:#fff5f5;border-radius:6px;padding:10px 14px}
pre{white-space:pre-wrap;margin:0;font-size:12.5px}
table.plan{border-collapse:collapse;width:100%}table.plan th{text-align:left;width:110px;font-weight:500}
table.plan td.bar{display:flex;height:18px;padding:3px 0}table.plan td.bar span{display:block;height:100%}
table.plan td.n{width:90px;text-align:right}
.sw{display:inline-block;width:11px;height:11px;margin:0 4px 0 10px;vertical-align:-1px}
table.samples{border-collapse:collapse;width:100%}table.samples td,table.samples th{border:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
.recipe{background:#f7f7f7;padding:10px;border-radius:6px}
"""

DRAW = """
const charts = new Map();  // chart id -> its uPlot
function tick(v) {
  if (v == null) return "";
  return v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(3));
}
function draw(data) {
  const grid = document.getElementById("charts");
  for (const u of charts.values()) u.destroy();
  charts.clear();
  grid.textContent = "";
  if (!data.charts.length) grid.textContent = data.empty || "No step has finished yet.";
  for (const c of data.charts) {
    const box = document.createElement("div");
    box.className = "chart";
    const title = document.createElement("h3");
    title.textContent = c.title;
    const plot = document.createElement("div");
    box.append(title, plot);
    if (c.note) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = c.note;
      box.append(note);
    }
    grid.append(box);
    const x = {label: c.x_label};
    if (c.x_names) x.value = (u, v) => v == null ? "--" : (c.x_names[v] ?? v);
    const series = [x].concat(c.series.map(s => ({
      label: s.label, stroke: s.color, width: s.dash ? 1 : 2, dash: s.dash ? [6, 4] : undefined,
      spanGaps: s.points, points: {show: !s.dash && (s.points || c.x.length < 40), size: 5},
    })));
    const opts = {
      width: Math.max(box.clientWidth - 16, 320), height: 240, series,
      scales: {x: {time: false}},
      axes: [{label: c.x_label}, {label: c.unit, size: 60, values: (u, vals) => vals.map(tick)}],
    };
    charts.set(c.id, new uPlot(opts, [c.x].concat(c.series.map(s => s.values)), plot));
  }
  requestAnimationFrame(() => setTimeout(countDrawn, 0));
}
function countDrawn() {
  let n = 0;
  for (const el of document.querySelectorAll(".chart")) {
    const cv = el.querySelector("canvas");
    if (!cv) continue;
    const px = cv.getContext("2d").getImageData(0, 0, cv.width, cv.height).data;
    let ink = 0;
    for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) ink++;
    if (ink > 200) n++;
  }
  document.body.dataset.charts = String(charts.size);
  document.body.dataset.chartsDrawn = String(n);
}
draw(JSON.parse(document.getElementById("report-data").textContent));
"""

# the live view: the server says when the run folder changed; the page fetches the new data and redraws
LIVE = """
let updates = 0;
function refresh() {
  fetch(LIVE_DATA, {cache: "no-store"}).then(r => r.json()).then(d => {
    for (const id of ["lead", "cards", "problem", "samples", "badge"]) {
      document.getElementById(id).innerHTML = d.parts[id];
    }
    document.body.dataset.status = d.status;
    document.body.dataset.steps = String(d.steps);
    document.body.dataset.updates = String(++updates);
    draw(d);
  });
}
const events = new EventSource(LIVE_EVENTS);
events.onmessage = refresh;
"""


def parts(rec: RunRecords) -> dict[str, str]:
    """The pieces of the page a live view replaces as the run goes on (HTML)."""
    word, color = STATUS_WORDS.get(rec.status, (rec.status, "#555"))
    return {
        "lead": html.escape(headline(rec)),
        "cards": _cards(rec),
        "problem": _status_box(rec),
        "samples": _samples_section(rec),
        "badge": f'<span class="badge" style="background:{color}">{html.escape(word)}</span>',
    }


def data(rec: RunRecords, items: list[Chart]) -> dict:
    """What the page draws, as JSON: the charts, the status, and the parts a live view replaces."""
    return {
        "charts": [c.to_dict() for c in items],
        "status": rec.status,
        "steps": len(rec.steps),
        "parts": parts(rec),
    }


def plan_page(title: str, plan: dict | None, why: str | None = None, back: str | None = None) -> str:
    """A plan on its own page: peak per phase and category, the op and module at the peak, and the steady
    step op by op (``fitune ui``: a run's plan, or a recipe's before it runs)."""
    from fitune.report.charts import plan_chart

    chart = plan_chart(plan) if plan else None
    items = [chart] if chart else []
    body = _plan_section(plan) if plan else f"<p>No plan: {html.escape(why or 'none was made')}</p>"
    nav = f'<p class="note"><a href="{html.escape(back)}">back</a></p>' if back else ""
    where = ""
    if plan:
        where = f"<p>Planned for {html.escape(str(plan.get('gpu') or plan.get('device')))}: {_gib(plan['peak_bytes'])} at the peak.</p>"
    payload = {"charts": [c.to_dict() for c in items], "empty": "The plan holds no timeline."}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>{html.escape(title)} · fitune plan</title>
<style>{_vendor("uPlot.min.css")}</style><style>{CSS}</style></head>
<body data-charts="{len(items)}" data-charts-drawn="0">
{nav}<h1>{html.escape(title)}</h1>{where}{body}
<h2>The steady step</h2><div class="grid" id="charts"></div>
<script>{_vendor("uPlot.iife.min.js")}</script>
<script id="report-data" type="application/json">{_script_json(payload)}</script>
<script>{DRAW}</script>
</body></html>
"""


def render(
    rec: RunRecords,
    items: list[Chart],
    png_names: list[str],
    snapshot_name: str | None,
    live: tuple[str, str] | None = None,
) -> str:
    """The page's HTML text; ``live`` = (data URL, events URL) makes it follow the run (``fitune ui``)."""
    name = rec.out.name
    word = STATUS_WORDS.get(rec.status, (rec.status, "#555"))[0]
    p = parts(rec)
    files = [f"<code>report/{html.escape(n)}</code>" for n in png_names]
    snap = (
        f"<p>The plan's steady step as a PyTorch memory snapshot: <code>report/{html.escape(snapshot_name)}</code>; "
        "drop it on PyTorch's memory viz page (pytorch.org/memory_viz) to see it block by block, each block "
        "named by its category, op and module.</p>"
        if snapshot_name
        else ""
    )
    listed = ", ".join(files) or "none"
    files_part = "" if live else f"<h2>Files</h2><p>Charts as PNG: {listed}.</p>{snap}"
    connect = "'self'" if live else "'none'"  # a live page asks its own server, and nothing else
    script = ""
    if live:
        script = f"<script>const LIVE_DATA = {_script_json(live[0])}, LIVE_EVENTS = {_script_json(live[1])};{LIVE}</script>"
    nav = (
        f'<p class="note"><a href="/">all runs</a> · <a href="/run/{html.escape(name)}/plan">the plan, op by op</a></p>'
        if live
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; connect-src {connect}; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(name)}: {html.escape(word)} · fitune report</title>
<style>{_vendor("uPlot.min.css")}</style><style>{CSS}</style></head>
<body data-charts="{len(items)}" data-charts-drawn="0" data-status="{html.escape(rec.status)}" data-steps="{len(rec.steps)}" data-updates="0">
{nav}<h1>{html.escape(name)} <span id="badge">{p["badge"]}</span></h1>
<div class="note">{html.escape(str(rec.out))}</div>
<p class="lead" id="lead">{p["lead"]}</p>
<div id="problem">{p["problem"]}</div>
<div class="cards" id="cards">{p["cards"]}</div>
<h2>Training</h2><div class="grid" id="charts"></div>
<h2>Memory plan</h2>{_plan_section(rec.plan)}
<h2>Samples</h2><div id="samples">{p["samples"]}</div>
<h2>Recipe</h2><details><summary>recipe.resolved.yaml: every field, defaults included</summary>
<pre class="recipe">{html.escape(rec.recipe_yaml or "(no recipe.resolved.yaml)")}</pre></details>
{files_part}
<script>{_vendor("uPlot.iife.min.js")}</script>
<script id="report-data" type="application/json">{_script_json(data(rec, items))}</script>
<script>{DRAW}</script>{script}
</body></html>
"""
