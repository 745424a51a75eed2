"""The out-of-memory guard, checkpoints and resume."""

import json

import pytest
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_OOM, app
from fitune.errors import RunFolderError
from fitune.trainer.oom import OutOfMemory, cheaper_configurations

from .conftest import fail_step_with_out_of_memory, tiny_recipe


def test_oom_is_explained_against_the_plan_and_checkpoint_survives(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, output={"dir": str(tmp_path / "run"), "save_every": 2})
    fail_step_with_out_of_memory(monkeypatch, 4)
    with pytest.raises(OutOfMemory) as info:
        fitune.train(recipe, max_steps=10, progress=False, echo=lambda *a: None)
    report = info.value.report
    assert report.phase == "steady_step" and report.step == 4
    assert report.outgrown in report.measured
    assert report.planned  # compared against a real plan
    assert report.suggestion  # the ladder found a cheaper configuration that fits this machine
    message = str(info.value)
    assert "out of memory in steady_step (step 4)" in message and "planned" in message
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # the last good checkpoint is intact


def test_oom_exit_code_from_the_cli(tmp_path, monkeypatch):
    import yaml

    recipe = tiny_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    fail_step_with_out_of_memory(monkeypatch, 1)
    result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "3", "--no-progress"])
    assert result.exit_code == EXIT_OOM, result.output
    assert "out of memory in first_step" in result.output


def test_resume_continues_where_the_run_stopped(tmp_path, monkeypatch):
    straight = fitune.train(
        tiny_recipe(tmp_path / "a", output={"dir": str(tmp_path / "ra")}),
        max_steps=6,
        progress=False,
        echo=lambda *a: None,
    )
    recipe = tiny_recipe(tmp_path / "b", output={"dir": str(tmp_path / "rb"), "save_every": 3})
    fail_step_with_out_of_memory(monkeypatch, 5)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=6, progress=False, echo=lambda *a: None)
    monkeypatch.undo()
    resumed = fitune.train(recipe, max_steps=6, resume=True, progress=False, echo=lambda *a: None)
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-5)


def test_resume_without_checkpoint_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path)
    fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None)
    with pytest.raises(RunFolderError, match="no complete checkpoint"):
        fitune.train(recipe, max_steps=2, resume=True, progress=False, echo=lambda *a: None)


def test_cheaper_configurations_accumulate():
    from fitune.recipe import Recipe

    r = Recipe.from_dict({"model": {"source": "x"}, "train": {"batch_size": 4, "loss_chunk": 0}})
    ladder = list(cheaper_configurations(r))
    assert ladder[0] == {"train.loss_chunk": "auto"}  # free: the fused loss recomputes nothing
    assert ladder[1] == {"train.loss_chunk": "auto", "train.recompute_mlp": True}  # lean is on already
    assert ladder[2]["train.gradient_checkpointing"] is True
    assert ladder[-1]["method.kind"] == "qlora" and ladder[-1]["train.batch_size"] == 2
    assert ladder[-1]["train.grad_accum"] == 2
    full = Recipe.from_dict(
        {"model": {"source": "x"}, "method": {"kind": "full"}, "train": {"loss_chunk": 8}}
    )
    assert list(cheaper_configurations(full))[-1]["method.kind"] == "lora"
    assert "train.loss_chunk" not in list(cheaper_configurations(full))[0]
    default = Recipe.from_dict({"model": {"source": "x"}, "train": {"batch_size": 4}})
    assert default.train.loss_chunk == "auto"  # the default: the fused loss is on already, not offered
    assert list(cheaper_configurations(default))[0] == {"train.recompute_mlp": True}
