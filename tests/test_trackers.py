"""train.report_to: each tracker's own files, read back with the library's own reader."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

import fitune
from fitune.errors import FituneError
from fitune.recipe import Recipe
from fitune.trainer.oom import OutOfMemory

from .conftest import fail_step_with_out_of_memory, tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}
ALL = ["tensorboard", "mlflow", "wandb", "trackio"]


@pytest.fixture
def local_stores(tmp_path, monkeypatch):
    """Every tracker in its default local mode, its store under tmp_path."""
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "WANDB_MODE",
        "WANDB_PROJECT",
        "TRACKIO_PROJECT",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # wandb's own caches and settings, off the home folder
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    return tmp_path


def _rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


@pytest.fixture
def tracked_run(local_stores):
    """One 4-step run reported to all four trackers, with an eval every 2 steps and samples."""
    tmp = local_stores
    recipe = tiny_recipe(
        tmp,
        train={"report_to": ALL, "eval_every": 2},
        samples={"prompts": ["say 3"], "max_new_tokens": 2},
    )
    lines: list[str] = []
    result = fitune.train(recipe, max_steps=4, progress=False, echo=lines.append)
    return tmp / "run", result, lines


def test_every_tracker_says_at_start_where_it_writes(tracked_run):
    out, _, lines = tracked_run
    said = "\n".join(lines)
    assert f"tensorboard: {out / 'tensorboard'}" in said
    assert f"mlflow: sqlite:///{out.resolve().parent / 'mlflow.db'}" in said
    assert f"wandb (offline): {out / 'wandb'}" in said
    assert "trackio: project fitune" in said


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result, _ = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)
    rows = _rows(out)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in rows])
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx(
        [r["grad_norm"] for r in rows], rel=1e-5
    )
    assert {e.step: e.value for e in acc.Scalars("eval/loss")} == pytest.approx(result.eval_losses)
    assert [e.step for e in acc.Scalars("eval/perplexity")] == [0, 2, 4]
    assert acc.Scalars("plan/peak_gib")[0].value > 0
    texts = acc.Tags()["tensors"]  # add_text is stored as a string tensor
    assert {"recipe/text_summary", "samples/before/text_summary", "status/text_summary"} <= set(texts)
    status = acc.Tensors("status/text_summary")[0].tensor_proto.string_val[0].decode()
    assert status.startswith("done")


def test_mlflow_keeps_the_metrics_the_recipe_and_the_status(tracked_run):
    from mlflow.tracking import MlflowClient

    out, result, _ = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve().parent / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["fitune.status"] == "done"
    assert run.data.params["train.eval_every"] == "2" and run.data.params["method.kind"] == "lora"
    history = client.get_metric_history(run_id, "train/loss")
    history = sorted(history, key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx(result.losses)
    evals = {m.step: m.value for m in client.get_metric_history(run_id, "eval/loss")}
    assert evals == pytest.approx(result.eval_losses)
    samples = client.download_artifacts(run_id, "samples_after.json", str(out.parent / "dl"))
    assert json.loads(Path(samples).read_text())[0]["prompt"] == "say 3"
    (kept,) = (out.parent / "mlruns").glob("*/artifacts/samples_after.json")  # beside the store
    assert json.loads(kept.read_text()) == json.loads(Path(samples).read_text())


def _wandb_records(path: Path):
    """The records of a W&B offline file: a 7-byte header, then LevelDB-log blocks of 32 KiB, each record
    a 4-byte checksum, a 2-byte length and a 1-byte type (1 whole; 2, 3, 4 first, middle, last piece)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            yield record


def test_wandb_offline_files_hold_the_history_the_config_and_the_status(tracked_run):
    out, result, _ = tracked_run
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, summary = {}, {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind in ("run", "config"):  # the run record holds the configuration init was given
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
    losses = [history[s]["train/loss"] for s in sorted(history) if "train/loss" in history[s]]
    assert losses == pytest.approx(result.losses)
    assert history[2]["eval/loss"] == pytest.approx(result.eval_losses[2])
    assert config["train"]["eval_every"] == 2
    assert json.loads(summary["status"]) == "done"


def test_trackio_keeps_the_metrics_in_its_local_store(tracked_run):
    from trackio.sqlite_storage import SQLiteStorage

    out, result, _ = tracked_run
    logs = SQLiteStorage.get_logs("fitune", "run")
    losses = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    assert [losses[s] for s in sorted(losses)] == pytest.approx(result.losses)
    evals = {row["step"]: row["eval/loss"] for row in logs if "eval/loss" in row}
    assert evals == pytest.approx(result.eval_losses)


def test_a_resumed_run_continues_its_tracker_runs_without_repeating_a_step(local_stores):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp = local_stores
    recipe = tiny_recipe(tmp, train={"report_to": ["tensorboard", "mlflow"]}, output={"save_every": 2})
    with pytest.MonkeyPatch.context() as failing:
        fail_step_with_out_of_memory(failing, 4)  # steps 1-3 logged; the checkpoint is step 2's
        with pytest.raises(OutOfMemory):
            fitune.train(recipe, max_steps=4, **QUIET)
    out = tmp / "run"
    first_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    result = fitune.train(recipe, max_steps=4, resume=True, **QUIET)

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # step 3 of the failed run dropped, written again
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in _rows(out)])
    assert result.losses == pytest.approx([e.value for e in loss[2:]])

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve().parent / 'mlflow.db'}")
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == first_id
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED" and run.data.tags["fitune.status"] == "done"
    (experiment,) = [e for e in client.search_experiments() if e.name == "fitune"]
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_failed_run_leaves_its_status_and_phase_with_the_tracker(local_stores, monkeypatch):
    from mlflow.tracking import MlflowClient

    tmp = local_stores
    recipe = tiny_recipe(tmp, train={"report_to": ["mlflow"]})
    fail_step_with_out_of_memory(monkeypatch, 2)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=3, **QUIET)
    out = tmp / "run"
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve().parent / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FAILED"
    assert (run.data.tags["fitune.status"], run.data.tags["fitune.phase"]) == ("out_of_memory", "steady_step")


def test_a_tracker_not_installed_is_refused_naming_its_extra_before_anything_is_written(
    tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    recipe = tiny_recipe(tmp_path, train={"report_to": ["tensorboard", "wandb"]})
    with pytest.raises(
        FituneError, match=r'train.report_to: wandb is not installed; fix: pip install "fitune\[wandb\]"'
    ):
        fitune.train(recipe, max_steps=1, **QUIET)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("given", "meant"),
    [("tensorboard", ["tensorboard"]), ("none", []), (None, []), (["wandb", "mlflow"], ["wandb", "mlflow"])],
)
def test_report_to_takes_one_name_a_list_or_none(tmp_path, given, meant):
    recipe = Recipe.from_dict(tiny_recipe(tmp_path, train={"report_to": given}))
    assert recipe.train.report_to == meant


@pytest.mark.parametrize(
    ("given", "says"),
    [(["tensorbord"], "tensorbord"), (["wandb", "wandb"], "'wandb' is listed twice")],
)
def test_report_to_refuses_an_unknown_or_repeated_tracker_naming_it(tmp_path, given, says):
    with pytest.raises(Exception, match="report_to") as info:
        Recipe.from_dict(tiny_recipe(tmp_path, train={"report_to": given}))
    assert says in str(info.value)
