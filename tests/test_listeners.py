"""The run's events: every listener sees each run's story, done, failed, interrupted or out of memory."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

import fitune
from fitune.errors import DataError, RunInterrupted
from fitune.trainer.events import EVENTS, Listener
from fitune.trainer.oom import OutOfMemory
from fitune.trainer.runfolder import RUN_MARKER

from .conftest import fail_step_with_out_of_memory, tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}


class Recorder(Listener):
    """Every event as (name, event), in the order they came."""

    def __init__(self):
        self.seen: list[tuple[str, object]] = []

    def __getattribute__(self, name):
        if name in EVENTS:
            return lambda event: self.seen.append((name, event))
        return super().__getattribute__(name)

    def names(self) -> list[str]:
        return [n for n, _ in self.seen]

    def of(self, name: str) -> list:
        return [e for n, e in self.seen if n == name]


def _status(out: Path) -> str:
    return json.loads((out / RUN_MARKER).read_text())["status"]


def test_a_done_run_sends_every_event_in_order_with_the_step_figures(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        train={"eval_every": 2},
        output={"dir": str(tmp_path / "run"), "save_every": 3},
        samples={"prompts": ["say 3"], "max_new_tokens": 2},
    )
    rec = Recorder()
    result = fitune.train(recipe, max_steps=4, callbacks=[rec], **QUIET)
    assert rec.names() == [
        "run_started",
        "samples_done",
        "eval_done",
        "step_done",
        "eval_done",  # eval_every 2: at step 2, sent before that step's figures, which carry it
        "step_done",
        "step_done",
        "checkpoint_written",  # save_every 3
        "step_done",
        "eval_done",
        "samples_done",
        "run_ended",
    ]
    start = rec.of("run_started")[0]
    assert (start.total_steps, start.first_step, start.n_eval) == (4, 1, 5) and not start.resumed
    steps = rec.of("step_done")
    assert [s.loss for s in steps] == result.losses
    assert all(s.tokens > 0 and s.seconds > 0 and s.lr > 0 and s.memory_bytes > 0 for s in steps)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [s.tokens for s in steps]
    evals = rec.of("eval_done")
    assert [(e.step, e.when) for e in evals] == [(0, "before"), (2, "during"), (4, "after")]
    assert {e.step: e.loss for e in evals} == result.eval_losses
    assert steps[1].eval_loss == evals[1].loss and rows[1]["eval_loss"] == evals[1].loss
    assert math.isclose(evals[0].perplexity, math.exp(evals[0].loss))
    before, after = rec.of("samples_done")
    assert (before.when, after.when) == ("before", "after") and after.answers == result.samples_after
    ckpt = rec.of("checkpoint_written")[0]
    assert ckpt.step == 3 and (ckpt.path / "state.json").is_file()
    end = rec.of("run_ended")[0]
    assert (end.status, end.error, end.result) == ("done", None, result)


def test_a_run_failing_on_bad_data_sends_run_ended_alone(tmp_path):
    recipe = tiny_recipe(tmp_path)
    Path(recipe["data"]["path"]).write_text('{"messages": [oops\n')
    rec = Recorder()
    with pytest.raises(DataError):
        fitune.train(recipe, max_steps=2, callbacks=[rec], **QUIET)
    assert rec.names() == ["run_ended"]
    end = rec.of("run_ended")[0]
    assert (end.status, end.phase, end.checkpoint_step) == ("failed", "data", None)
    assert "train.jsonl:1" in end.error


def test_an_out_of_memory_step_ends_the_run_as_out_of_memory_in_its_phase(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, output={"dir": str(tmp_path / "run"), "save_every": 1})
    fail_step_with_out_of_memory(monkeypatch, 2)
    rec = Recorder()
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=3, callbacks=[rec], **QUIET)
    assert rec.names()[-3:] == ["step_done", "checkpoint_written", "run_ended"]
    end = rec.of("run_ended")[0]
    assert (end.status, end.phase, end.checkpoint_step) == ("out_of_memory", "steady_step", 1)


def test_a_signal_during_the_steps_ends_the_run_interrupted_after_a_checkpoint(tmp_path):
    class SignalAtStep2(Recorder):
        def __getattribute__(self, name):
            record = super().__getattribute__(name)
            if name != "step_done":
                return record

            def step_done(event):
                record(event)
                if event.step == 2:
                    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, while the step's events go on

            return step_done

    rec = SignalAtStep2()
    with pytest.raises(RunInterrupted, match="after step 2"):
        fitune.train(tiny_recipe(tmp_path), max_steps=5, callbacks=[rec], **QUIET)
    assert [e.step for e in rec.of("step_done")] == [1, 2]
    assert [e.step for e in rec.of("checkpoint_written")] == [2]
    end = rec.of("run_ended")[0]
    assert (end.status, end.phase, end.checkpoint_step) == ("interrupted", "steady_step", 2)


def test_a_listener_that_raises_fails_the_run_and_one_failing_at_the_end_hides_nothing(tmp_path):
    class Broken(Listener):
        def step_done(self, event):
            if event.step == 2:
                raise ValueError("tracker unreachable")

    class BrokenEnd(Listener):
        def run_ended(self, event):
            raise ValueError("cannot close")

    rec, said = Recorder(), []
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(ValueError, match="tracker unreachable"):
        fitune.train(
            recipe, max_steps=3, callbacks=[BrokenEnd(), Broken(), rec], progress=False, echo=said.append
        )
    assert _status(tmp_path / "run") == "failed"
    end = rec.of("run_ended")[0]  # called after the BrokenEnd before it
    assert (end.status, end.phase, end.error) == ("failed", "steady_step", "tracker unreachable")
    assert any("BrokenEnd.run_ended failed: cannot close" in line for line in said)
    # the fixed re-run needs no flag: the failed folder holds no checkpoint
    assert fitune.train(recipe, max_steps=1, **QUIET).steps == 1


def test_a_callback_without_any_event_method_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="none of the event methods"):
        fitune.train(tiny_recipe(tmp_path), max_steps=1, callbacks=[object()], **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_starts_after_its_checkpoint(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, output={"dir": str(tmp_path / "run"), "save_every": 2})
    fail_step_with_out_of_memory(monkeypatch, 3)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=4, **QUIET)
    monkeypatch.undo()
    rec = Recorder()
    fitune.train(recipe, max_steps=4, resume=True, callbacks=[rec], **QUIET)
    start = rec.of("run_started")[0]
    assert start.resumed and start.first_step == 3
    assert [e.step for e in rec.of("step_done")] == [3, 4]


def test_the_folder_keeps_the_plan_and_each_step_its_gradient_norm_time_and_eval_perplexity(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"eval_every": 2, "max_grad_norm": 1e-3})
    rec = Recorder()
    fitune.train(recipe, max_steps=3, callbacks=[rec], **QUIET)
    out = tmp_path / "run"
    planned = json.loads((out / "plan.json").read_text())
    assert planned == rec.of("run_started")[0].plan
    assert planned["peak_bytes"] == fitune.plan(recipe).peak_bytes
    assert {"first_step", "steady_step", "eval"} <= set(planned["phase_breakdowns"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = rec.of("step_done")
    # the norm before clipping: far above the 1e-3 the gradients were clipped to
    assert all(
        r["grad_norm"] > 1e-2 and r["grad_norm"] == pytest.approx(s.grad_norm, rel=1e-5)
        for r, s in zip(rows, steps, strict=True)
    )
    assert [r["step_s"] for r in rows] == [round(s.seconds, 4) for s in steps] and all(
        r["step_s"] > 0 for r in rows
    )
    assert "allocated_bytes" not in rows[0]  # CUDA only
    assert rows[1]["eval_perplexity"] == pytest.approx(math.exp(rows[1]["eval_loss"]), rel=1e-5)
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [(e["step"], e["when"]) for e in evals] == [(0, "before"), (2, "during"), (3, "after")]
    assert all(e["perplexity"] == pytest.approx(math.exp(e["loss"]), rel=1e-5) for e in evals)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_the_step_leaves_the_norm_of_its_gradients_before_any_clipping(tmp_path, max_grad_norm):
    import torch

    from fitune.data.batching import Batch
    from fitune.session import build_session
    from fitune.step import micro_batch_loss, train_step

    recipe = fitune.Recipe.from_dict(tiny_recipe(tmp_path, train={"max_grad_norm": max_grad_norm}))
    s = build_session(recipe, total_steps=2, with_tokenizer=False)
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, None, (ids + 1) % 260)
    micro_batch_loss(s, batch, torch.tensor(ids.numel())).backward()  # the same gradients, by hand
    grads = [p.grad.norm() for _, p in s.trainable_parameters]
    expected = float(torch.linalg.vector_norm(torch.stack(grads)))
    s.optimizer.zero_grad()
    train_step(s, [batch])
    assert float(s.grad_norm) == pytest.approx(expected, rel=1e-5) and expected > 1e-2
