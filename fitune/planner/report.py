"""What a search shows: compact change labels, the JSON document, and a self-contained HTML report.

The HTML page embeds its charts as base64 PNGs (matplotlib, Agg backend): memory by category for the best
configurations against the budget, and the memory timeline of one training step of the chosen one.
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fitune.planner.candidates import Candidate
    from fitune.planner.plan import Plan
    from fitune.planner.search import SearchResult

_GIB = 2**30
# stacking order and colours of the memory categories (tracker categories, then device additions)
CATEGORY_COLORS = {
    "frozen_weights": "#4c72b0",
    "quant_state": "#64b5cd",
    "trainable_weights": "#55a868",
    "gradients": "#8fd694",
    "optimizer_state": "#c44e52",
    "activations": "#dd8452",
    "temporaries": "#f2c45f",
    "other": "#937860",
    "allocator_blocks": "#8c8c8c",
    "cuBLAS workspaces": "#b0b0b0",
}


def knob_label(name: str, value: Any) -> str:
    """A searched setting as the table shows it."""
    if name == "rank":
        return f"r{value}"
    if name == "checkpointing":
        return "ckpt on" if value else "ckpt off"
    if name == "loss_chunk":
        return f"chunk {value}"
    if name == "attention" and value == "flash_attention_2":
        return "fa2"
    if name == "split":
        return f"{value[0]}x{value[1]}"
    if name == "devices":
        return f"{value} GPU" + ("s" if value != 1 else "")
    return str(value)


_PREFIX = {"rank": "r", "loss_chunk": "chunk "}
_SUFFIX = {"devices": (" GPUs", " GPU")}


def twin_text(twins: list[str]) -> str:
    """Folded equal configurations, e.g. ``or fa2; or paged``."""
    short = {"attention flash_attention_2": "fa2", "optimizer paged_adamw8bit": "paged"}
    out = []
    for t in twins:
        out.append("+".join(short.get(p.strip(), p.strip()) for p in t.split(",")))
    return "or " + " / ".join(out) if out else ""


def change_text(candidate: Candidate, base) -> str:
    """The searched settings a candidate changes, e.g. ``lora->qlora, r16->8, 1x8``."""
    from fitune.planner.candidates import KNOBS, setting, unchanged

    parts = []
    for name in KNOBS:
        if name == "rank" and candidate.settings["method.kind"] == "full":
            continue
        if all(unchanged(base, k, candidate.settings[k]) for k in KNOBS[name]):
            continue
        old = tuple(setting(base, k) for k in KNOBS[name])
        old = old if len(old) > 1 else old[0]
        new = candidate.knob(name)
        if name == "checkpointing":
            parts.append(knob_label(name, new))
        else:
            new_label = knob_label(name, new).removeprefix(_PREFIX.get(name, ""))
            old_label = knob_label(name, old)
            for suffix in _SUFFIX.get(name, ()):
                old_label = old_label.removesuffix(suffix)
            parts.append(f"{old_label}->{new_label}")
    return ", ".join(parts) or "none (your recipe)"


def _candidate_json(c: Candidate, result: SearchResult, *, full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": dict(c.settings)}
    if full:
        out["recipe"] = result.recipe_of(c).to_dict()
    if c.peak_bytes is not None:
        out["peak_bytes"] = c.peak_bytes
    if c.status == "fits":
        out.update(
            headroom_bytes=result.target.memory_bytes - c.peak_bytes,
            tokens_per_s=c.speed.tokens_per_s,
            flops_per_token=c.speed.flops_per_token,
            score=c.score,
            breakdown=c.breakdown,
            peak_at=c.peak_region,
            traced=c.traced,
            changes=c.changes,
            equal_alternatives=c.twins,
        )
    else:
        out.update(status=c.status, reason=c.reason)
    return out


def search_json(result: SearchResult, *, chosen_plan: Plan | None = None) -> dict[str, Any]:
    """The search as a JSON document: ``candidates`` (fit, best first) and ``ruled_out`` (with reasons)."""
    target = result.target
    doc: dict[str, Any] = {
        "target": {
            "name": target.label,
            "device": target.device,
            "kind": target.kind,
            "memory_bytes": target.memory_bytes,
        },
        "margin": result.margin,
        "usable_bytes": result.usable_bytes,
        "seq_len": result.seq_len,
        "effective_batch": result.effective_batch,
        "processes": result.ranks,
        "counts": result.counts(),
        "candidates": [_candidate_json(c, result, full=True) for c in result.ranked],
        "ruled_out": [
            _candidate_json(c, result, full=False) for c in result.candidates if c.status != "fits"
        ],
        "suggestions": result.suggestions,
        "assumptions": result.assumptions,
        "notes": result.notes,
        "structures_traced": result.structures_traced,
        "fake_runs": result.fake_runs,
        "seconds": result.seconds,
    }
    if result.one_device is not None:
        doc["one_device"] = {
            "counts": result.one_device.counts(),
            "suggestions": result.one_device.suggestions,
        }
    if chosen_plan is not None:
        doc["chosen_plan"] = {"peak_bytes": chosen_plan.peak_bytes, "phases": chosen_plan.phases}
    return doc


# --- charts -----------------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(categories: list[str]) -> list[str]:
    spare = ["#9467bd", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f"]
    return [CATEGORY_COLORS.get(c) or spare[i % len(spare)] for i, c in enumerate(categories)]


def _ordered(categories: set[str]) -> list[str]:
    known = [c for c in CATEGORY_COLORS if c in categories]
    return known + sorted(categories - set(known))


def breakdown_chart(result: SearchResult, top: int) -> str:
    """Stacked bars of memory by category for the ``top`` best configurations, with the budget lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.ranked[:top]
    categories = _ordered({c for r in rows for c in r.breakdown})
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
    labels = [f"#{i + 1} {change_text(r, result.base)}"[:90] for i, r in enumerate(rows)]
    left = [0.0] * len(rows)
    for cat, color in zip(categories, _colors(categories), strict=True):
        values = [r.breakdown.get(cat, 0) / _GIB for r in rows]
        ax.barh(labels, values, left=left, color=color, label=cat)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.axvline(result.target.memory_bytes / _GIB, color="black", linewidth=1.5, label="memory")
    ax.axvline(
        result.usable_bytes / _GIB, color="black", linestyle="--", linewidth=1, label="usable (margin)"
    )
    ax.invert_yaxis()
    ax.set_xlabel("GiB at the predicted peak")
    ax.set_title(f"memory by category, best {len(rows)} configurations on {result.target.label}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.2 / max(1, len(rows))), ncol=5, fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out


def timeline_chart(plan: Plan, title: str) -> str:
    """Stacked areas of live bytes by category over the ops of one steady training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plan.timeline
    categories = _ordered({c for p in points for c, v in p["by_category"].items() if v})
    xs = list(range(len(points)))
    series = [[p["by_category"].get(c, 0) / _GIB for p in points] for c in categories]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.stackplot(xs, series, labels=categories, colors=_colors(categories), linewidth=0)
    ax.set_xlabel(
        f"op of one steady training step, as traced with {plan.traced_layers[-1]} of {plan.num_layers} "
        f"decoder layers (the full model peaks at {plan.peak_bytes / _GIB:,.2f} GiB)"
    )
    ax.set_ylabel("GiB live (traced layers)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out


# --- HTML -------------------------------------------------------------------------------------------------


def html_report(result: SearchResult, *, chosen_plan: Plan | None, top: int = 10) -> str:
    """A self-contained page: summary, ranked table, the two charts, ruled-out reasons, assumptions."""
    e = html.escape
    target = result.target
    rows = []
    for i, c in enumerate(result.ranked[:top]):
        s = c.settings
        speed = f"{c.speed.tokens_per_s:,.0f}" if c.speed.tokens_per_s is not None else "-"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{e(str(v))}</td>"
                for v in (
                    i + 1,
                    s["method.kind"] + ("" if s["method.kind"] == "full" else f" r{s['method.r']}"),
                    s["train.precision"],
                    "on" if s["train.gradient_checkpointing"] else "off",
                    s["train.attention"],
                    s["train.loss_chunk"],
                    s["train.optimizer"],
                    f"{s['train.batch_size']} x {s['train.grad_accum']}",
                    f"{c.peak_bytes / _GIB:,.2f}",
                    f"{(target.memory_bytes - c.peak_bytes) / _GIB:,.2f}",
                    speed,
                    change_text(c, result.base),
                )
            )
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "method",
            "precision",
            "ckpt",
            "attention",
            "loss chunk",
            "optimizer",
            "micro x accum",
            "peak GiB",
            "headroom GiB",
            "tokens/s",
            "changes",
        )
    )
    charts = []
    if result.ranked:
        charts.append(("Memory by category", breakdown_chart(result, top)))
    if chosen_plan is not None and chosen_plan.timeline:
        charts.append(
            (
                "Memory timeline of one step of the chosen configuration",
                timeline_chart(chosen_plan, f"#1: {change_text(result.ranked[0], result.base)}"),
            )
        )
    reasons: dict[str, int] = {}
    for c in result.candidates:
        if c.status != "fits":
            reasons[f"{c.status}: {c.reason}"] = reasons.get(f"{c.status}: {c.reason}", 0) + 1
    top_reasons = sorted(reasons.items(), key=lambda kv: -kv[1])[:15]
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in result.counts().items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fitune plan</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#eee}"
        "img{max-width:100%}li{margin:2px 0}</style></head><body>",
        f"<h1>fitune plan: {e(str(result.base.model.source or 'inline config'))} on {e(result.where)}</h1>",
        *(
            [f"<p>Nothing fits one {e(target.label)}: {e('; '.join(result.one_device.suggestions))}</p>"]
            if result.one_device is not None
            else []
        ),
        f"<p>usable {result.usable_bytes / _GIB:,.2f} GiB{' per GPU' if result.ranks > 1 else ''} after a {result.margin:.0%} margin; seq_len "
        f"{result.seq_len}, effective batch {result.effective_batch}. {e(counts)}; "
        f"{result.structures_traced} structures traced ({result.fake_runs} fake runs) in "
        f"{result.seconds:.1f} s.</p>",
    ]
    if result.ranked:
        parts.append(f"<h2>Best configurations that fit</h2><table><tr>{head}</tr>{''.join(rows)}</table>")
    else:
        parts.append("<h2>Nothing fits</h2><ul>" + "".join(f"<li>{e(s)}</li>" for s in result.suggestions))
        parts.append("</ul>")
    if chosen_plan is not None and result.ranked:
        parts.append(
            f"<p>Direct plan of the chosen configuration: peak {chosen_plan.peak_bytes / _GIB:,.2f} GiB "
            f"(search: {result.ranked[0].peak_bytes / _GIB:,.2f} GiB).</p>"
        )
    for title, png in charts:
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
    parts.append("<h2>Not chosen, by reason</h2><ul>")
    parts += [f"<li>{n} x {e(reason)}</li>" for reason, n in top_reasons]
    parts.append("</ul><h2>Assumptions</h2><ul>")
    parts += [f"<li>{e(a)}</li>" for a in (*result.assumptions, *result.notes)]
    parts.append("</ul></body></html>")
    return "\n".join(parts)
