"""fitune ui: the run list, the live page, its data and its events, served on loopback."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import fitune
from fitune.report.serve import folder_state, make_app

from .conftest import tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui")
    recipe = tiny_recipe(root, samples={"prompts": ["say 3"], "max_new_tokens": 2})
    fitune.train(recipe, max_steps=4, **QUIET)
    (root / "not-a-run").mkdir()
    return root


def test_the_list_shows_every_run_folder_and_nothing_else(runs):
    page = TestClient(make_app(runs)).get("/").text
    assert '<a href="/run/run">run</a>' in page and "not-a-run" not in page
    assert "done" in page and "4 / 4" in page


def test_the_run_page_is_the_report_following_its_server(runs):
    client = TestClient(make_app(runs))
    page = client.get("/run/run").text
    assert "connect-src 'self'" in page and 'LIVE_EVENTS = "/run/run/events"' in page
    figures = client.get("/run/run/data").json()
    rows = [json.loads(line) for line in (runs / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = next(c for c in figures["charts"] if c["id"] == "loss")
    assert [v for v in loss["series"][0]["values"] if v is not None] == [r["loss"] for r in rows]
    assert figures["steps"] == 4 and figures["status"] == "done"


@pytest.mark.parametrize("name", ["nowhere", "not-a-run", "%2e%2e", "run%2f..%2f..", ".%2e"])
def test_anything_but_a_run_folder_under_the_root_is_not_found(runs, name):
    assert TestClient(make_app(runs)).get(f"/run/{name}").status_code == 404


def test_the_folder_state_changes_when_the_run_writes(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs / "run", out)
    before = folder_state(out)
    assert folder_state(out) == before
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.0}\n')
    assert folder_state(out) != before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_or_a_folder_that_is_no_run_is_refused_in_words(runs):
    from typer.testing import CliRunner

    from fitune.cli import app

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", str(runs), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["report", str(runs / "not-a-run"), "--serve"])
    assert result.exit_code == 1 and "not a fitune run folder" in result.output


class _Server:
    """uvicorn serving ``root`` on a free loopback port, in a thread."""

    def __init__(self, root: Path):
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(make_app(root), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class _Browser:
    """Headless Chromium driven over its DevTools protocol, every request off the machine blocked."""

    def __init__(self, chromium: str, profile: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={self.port}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                "--proxy-server=http://127.0.0.1:9",  # any other address only through a dead proxy
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ws = None
        self.n = 0

    def open(self, url: str) -> None:
        import urllib.request

        from websockets.sync.client import connect

        deadline = time.monotonic() + 30
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?{url}", method="PUT")
                target = json.loads(urllib.request.urlopen(req, timeout=5).read())
                break
            except OSError:
                assert time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.2)
        self.ws = connect(target["webSocketDebuggerUrl"], max_size=None)

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.n:
                return reply.get("result", {})

    def body(self) -> dict:
        got = self.call(
            "Runtime.evaluate", expression="JSON.stringify(document.body.dataset)", returnByValue=True
        )
        return json.loads(got["result"]["value"]) if got.get("result", {}).get("type") == "string" else {}

    def wait_for(self, check, what: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            body = self.body()
            if check(body):
                return body
            assert time.monotonic() < deadline, f"the page never showed {what}; last: {body}"
            time.sleep(0.1)

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Watcher(fitune.Listener):
    """Opens the run's page once the run has started; each step then takes a while longer, and what the
    page shows after it is kept, so that the test sees the page follow the run."""

    def __init__(self, browser: _Browser, url: str):
        self.browser, self.url = browser, url
        self.seen: list[dict] = []

    def run_started(self, event) -> None:
        self.browser.open(self.url)
        self.browser.wait_for(lambda b: b.get("status") == "running", "the running run")

    def step_done(self, event) -> None:
        time.sleep(0.4)
        self.seen.append(self.browser.body())


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_the_live_page_follows_a_run_as_it_trains_and_after_a_reload(tmp_path):
    recipe = tiny_recipe(tmp_path, output={"dir": str(tmp_path / "runs" / "live")})
    (tmp_path / "runs").mkdir()
    browser = _Browser(CHROMIUM, tmp_path / "profile")
    try:
        with _Server(tmp_path / "runs") as server:
            watcher = _Watcher(browser, f"http://127.0.0.1:{server.port}/run/live")
            fitune.train(recipe, max_steps=12, callbacks=[watcher], **QUIET)
            done = browser.wait_for(lambda b: b.get("status") == "done", "the finished run")
            assert done["steps"] == "12" and int(done["updates"]) >= 2
            assert done["chartsDrawn"] == done["charts"] == "5"
            steps_seen = [int(b["steps"]) for b in watcher.seen if b.get("steps")]
            assert any(0 < s < 12 for s in steps_seen), steps_seen  # it moved while the run trained
            assert steps_seen == sorted(steps_seen)
            browser.call("Page.reload")
            again = browser.wait_for(
                lambda b: b.get("updates") == "0" and b.get("chartsDrawn") == "5", "the page after a reload"
            )
            assert again["steps"] == "12" and again["status"] == "done"
    finally:
        browser.close()


def test_without_the_ui_extra_the_live_view_names_it(runs, monkeypatch):
    import importlib.util

    from fitune.errors import FituneError
    from fitune.report.serve import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "uvicorn" else real(n, *a))
    with pytest.raises(
        FituneError, match=r'needs uvicorn, which is not installed; fix: pip install "fitune\[ui\]"'
    ):
        serve(runs, "127.0.0.1", _free_port(), echo=lambda *a: None)


def test_a_runs_plan_page_shows_its_peak_and_its_steady_step_op_by_op(runs):
    client = TestClient(make_app(runs))
    page = client.get("/run/run/plan").text
    plan = json.loads((runs / "run" / "plan.json").read_text())
    assert plan["peak_op"] in page and plan["peak_module"] in page
    found = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    (chart,) = json.loads(found.group(1))["charts"]
    size = {"GiB": 2**30, "MiB": 2**20}[chart["unit"]]
    total = chart["series"][0]
    assert total["label"] == "all"
    assert total["values"] == pytest.approx([r["live_bytes"] / size for r in plan["timeline"]])
    assert chart["x_names"][0].startswith(plan["timeline"][0]["op"])
    assert '<a href="/run/run/plan">' in client.get("/run/run").text


def test_a_recipe_given_to_the_ui_gets_its_plan_page(runs, tmp_path):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {seq_len: 1}\n")
    client = TestClient(make_app(runs, [path, broken]))
    assert '<a href="/plan/0">' in client.get("/").text
    page = client.get("/plan/0").text
    assert "recipe.yaml: the plan" in page and "steady_step" in page and "Planned for cpu" in page
    assert "seq_len" in client.get("/plan/1").text  # what is wrong with it, on its page
    assert client.get("/plan/2").status_code == 404
