"""fitune report: the page holds the run's figures, offline; the PNGs and the plan's memory snapshot."""

from __future__ import annotations

import html
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fitune
from fitune.cli import app
from fitune.errors import FituneError
from fitune.report import make_report
from fitune.report.records import read_run
from fitune.trainer.oom import OutOfMemory
from fitune.trainer.runfolder import RUN_MARKER

from .conftest import fail_step_with_out_of_memory, tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}
PROMPTS = ["say 3", "a <b> & 'c'"]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    recipe = tiny_recipe(tmp, train={"eval_every": 3}, samples={"prompts": PROMPTS, "max_new_tokens": 3})
    fitune.train(recipe, max_steps=6, **QUIET)
    return tmp / "run"


def _data(page: str) -> dict:
    found = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_the_page_holds_the_runs_figures_samples_and_recipe(done_run):
    files = make_report(done_run)
    page = files.page.read_text()
    steps, evals = _rows(done_run, "metrics.jsonl"), _rows(done_run, "evals.jsonl")
    charts = {c["id"]: c for c in _data(page)["charts"]}
    assert list(charts) == ["loss", "lr", "grad_norm", "tokens_per_s", "memory"]
    loss = charts["loss"]
    assert loss["x"] == [0, 1, 2, 3, 4, 5, 6]
    train, ev = loss["series"]
    assert train["values"] == [None] + [r["loss"] for r in steps]
    assert [v for v in ev["values"] if v is not None] == [e["loss"] for e in evals]
    assert charts["grad_norm"]["series"][0]["values"] == [r["grad_norm"] for r in steps]
    plan = json.loads((done_run / "plan.json").read_text())
    planned = {s["label"]: s["values"][0] for s in charts["memory"]["series"] if s["dash"]}
    size = {"GiB": 2**30, "MiB": 2**20}[charts["memory"]["unit"]]  # GiB once the process passes one
    assert planned["plan: steady_step"] == pytest.approx(plan["phases"]["steady_step"] / size)
    lead = re.search(r'<p class="lead" id="lead">(.*?)</p>', page).group(1)
    assert lead.startswith("Trained 6 of 6 steps: loss ")
    assert f"{steps[-1]['loss']:.4g}" in lead and f"{evals[-1]['loss']:.4g}" in lead
    samples = _rows(done_run, "samples.jsonl")
    assert [(r["when"], r["prompt"]) for r in samples] == [("before", p) for p in PROMPTS] + [
        ("after", p) for p in PROMPTS
    ]
    for row in samples:
        assert html.escape(row["prompt"]) in page and html.escape(row["answer"]) in page
    assert html.escape((done_run / "recipe.resolved.yaml").read_text()) in page
    assert plan["peak_op"] in page and 'data-status="done"' in page


def test_the_page_makes_no_request_and_forbids_any(done_run):
    page = make_report(done_run, pngs=False).page.read_text()
    assert "default-src 'none'" in page  # the browser refuses every fetch, image or script from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<link" not in page and "@import" not in page


def test_one_png_a_chart(done_run):
    files = make_report(done_run)
    assert [p.name for p in files.pngs] == [
        "loss.png",
        "lr.png",
        "grad_norm.png",
        "tokens_per_s.png",
        "memory.png",
    ]
    for png in files.pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_plan_snapshot_replays_the_plans_timeline_category_by_category(done_run):
    from torch.cuda import _memory_viz

    snapshot = make_report(done_run, pngs=False).snapshot
    with open(snapshot, "rb") as f:
        data = pickle.load(f)  # the file fitune just wrote, plain lists and dicts
    timeline = json.loads((done_run / "plan.json").read_text())["timeline"]
    live: dict[str, int] = {}
    trace = iter(data["device_traces"][0])
    pending = next(trace, None)
    for t, row in enumerate(timeline):  # after each op's events, the live bytes per category are the plan's
        while pending is not None and pending["time_us"] == t:
            sign = {"alloc": 1, "free_completed": -1}.get(pending["action"], 0)
            live[pending["category"]] = live.get(pending["category"], 0) + sign * pending["size"]
            pending = next(trace, None)
        assert {c: b for c, b in live.items() if b} == {c: b for c, b in row["by_category"].items() if b}, t
    assert pending is None
    assert {e["category"] for e in data["device_traces"][0]} <= set(timeline[0]["by_category"])
    assert "TOTAL MEM" in _memory_viz.trace(data)  # PyTorch's own readers of a snapshot take it
    assert "total_allocated" in _memory_viz.segsum(data)


def test_a_run_that_ran_out_of_memory_says_so_with_its_phase_and_checkpoint(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, output={"save_every": 2})
    fail_step_with_out_of_memory(monkeypatch, 3)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=4, **QUIET)
    page = make_report(tmp_path / "run", pngs=False).page.read_text()
    lead = re.search(r'<p class="lead" id="lead">(.*?)</p>', page).group(1)
    assert lead.startswith("Ended out of memory in phase steady_step after 2 of 4 steps")
    assert 'class="problem"' in page and "CUDA out of memory" in page
    assert "The checkpoint of step 2 is complete" in page


def test_a_run_still_training_is_reported_as_it_stands(done_run, tmp_path):
    running = tmp_path / "running"
    shutil.copytree(done_run, running)
    marker = json.loads((running / RUN_MARKER).read_text())
    (running / RUN_MARKER).write_text(json.dumps({**marker, "status": "running", "total_steps": 10}))
    rows = (running / "metrics.jsonl").read_text().splitlines()
    (running / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n" + rows[3][:20])  # a row being written
    rec = read_run(running)
    assert len(rec.steps) == 3
    page = make_report(running, pngs=False).page.read_text()
    assert "Training, step 3 of 10" in page and 'data-status="running"' in page


def test_a_folder_that_is_not_a_run_is_refused_naming_it(tmp_path):
    with pytest.raises(FituneError, match="not a fitune run folder"):
        make_report(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such folder" in result.output and "Traceback" not in result.output


def test_the_cli_prints_where_the_report_is(done_run):
    result = CliRunner().invoke(app, ["report", str(done_run), "--no-png"])
    assert result.exit_code == 0, result.output
    assert f"report: {(done_run / 'report.html').resolve().as_uri()}" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_chromium_draws_every_chart_with_every_request_off_the_machine_blocked(done_run, tmp_path):
    page = make_report(done_run, pngs=False).page
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",  # no name resolves off the machine
            "--proxy-server=http://127.0.0.1:9",  # any other address only through a dead proxy (loopback bypasses it)
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    charts = int(re.search(r'data-charts="(\d+)"', body).group(1))
    drawn = int(re.search(r'data-charts-drawn="(\d+)"', body).group(1))
    assert charts == 5 and drawn == charts
