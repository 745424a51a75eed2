"""The run folder's lifecycle: what fitune-run.json says, which folders a new run may use, interruptions."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_ERROR, EXIT_INTERRUPTED, app
from fitune.errors import DataError, RunFolderError
from fitune.trainer.oom import OutOfMemory
from fitune.trainer.runfolder import RUN_MARKER

from .conftest import fail_step_with_out_of_memory, tiny_recipe

QUIET = {"progress": False, "echo": lambda *a: None}
STEPS = 60
REPO = Path(__file__).resolve().parent.parent


def _marker(out: Path) -> dict:
    return json.loads((out / RUN_MARKER).read_text())


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # no step missing or repeated
    return [r["loss"] for r in rows]


def test_marker_says_running_with_pid_and_host_then_done(tmp_path, monkeypatch):
    import socket

    import fitune.trainer.run as run_module

    seen = {}
    real = run_module.train_step

    def step(session, batches):
        seen.setdefault("marker", _marker(tmp_path / "run"))
        return real(session, batches)

    monkeypatch.setattr(run_module, "train_step", step)
    fitune.train(tiny_recipe(tmp_path), max_steps=2, **QUIET)
    running = seen["marker"]
    assert running["status"] == "running"
    assert running["pid"] == os.getpid() and running["host"] == socket.gethostname()
    done = _marker(tmp_path / "run")
    assert done["status"] == "done" and done["steps"] == 2 and done["saved"] == "adapter"


def test_failed_on_bad_data_then_the_fixed_rerun_trains_without_a_flag(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data = Path(recipe["data"]["path"])
    good = data.read_text()
    lines = good.splitlines()
    lines[6] = '{"messages": [oops'
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:7"):
        fitune.train(recipe, max_steps=2, **QUIET)
    marker = _marker(tmp_path / "run")
    assert marker["status"] == "failed" and marker["phase"] == "data"
    assert "train.jsonl:7" in marker["error"] and marker["checkpoint_step"] is None
    data.write_text(good)
    result = fitune.train(recipe, max_steps=2, **QUIET)
    assert result.steps == 2 and _marker(tmp_path / "run")["status"] == "done"


def test_cli_rerun_after_a_failure_needs_no_flag(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["data"]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress", "--force"])
    assert first.exit_code == EXIT_ERROR, first.output
    assert "missing.jsonl" in first.output
    assert _marker(tmp_path / "run")["status"] == "failed"
    recipe["data"]["path"] = str(tmp_path / "train.jsonl")
    path.write_text(yaml.safe_dump(recipe))
    second = runner.invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress"])
    assert second.exit_code == 0, second.output
    assert _marker(tmp_path / "run")["status"] == "done"


def test_output_dir_that_is_a_file_is_named_and_never_replaced(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    recipe = tiny_recipe(tmp_path, output={"dir": str(target)})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for flags in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress", *flags])
        assert result.exit_code == EXIT_ERROR, result.output
        assert f"output.dir: {target} is a file, not a folder" in " ".join(result.output.split())
    assert target.read_text() == "mine"
    recipe["output"]["dir"] = str(tmp_path / "run")
    path.write_text(yaml.safe_dump(recipe))
    assert CliRunner().invoke(app, ["train", str(path), "--max-steps", "1", "--no-progress"]).exit_code == 0


def test_folder_of_foreign_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    recipe = tiny_recipe(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="holds files that are not a fitune run"):
            fitune.train(recipe, max_steps=1, overwrite=overwrite, **QUIET)
    assert (out / "thesis.tex").read_text() == "mine"


def test_a_run_alive_on_this_host_is_refused_and_a_dead_one_is_not(tmp_path):
    import socket

    from fitune.trainer.runfolder import _process_start

    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker = {"status": "running", "pid": other.pid, "host": socket.gethostname()}
        marker["pid_start"] = _process_start(other.pid)
        (out / RUN_MARKER).write_text(json.dumps(marker))
        recipe = tiny_recipe(tmp_path)
        for overwrite in (False, True):
            with pytest.raises(
                RunFolderError, match=f"still training \\(process {other.pid} on this host\\)"
            ):
                fitune.train(recipe, max_steps=1, overwrite=overwrite, **QUIET)
    finally:
        other.kill()
        other.wait()
    # the process is gone and no checkpoint was left: the folder holds nothing worth keeping
    assert fitune.train(recipe, max_steps=1, **QUIET).steps == 1


def test_out_of_memory_with_a_checkpoint_asks_for_resume_or_overwrite(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, output={"dir": str(tmp_path / "run"), "save_every": 2})
    fail_step_with_out_of_memory(monkeypatch, 3)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=4, **QUIET)
    monkeypatch.undo()
    marker = _marker(tmp_path / "run")
    assert marker["status"] == "out_of_memory" and marker["phase"] == "steady_step"
    assert marker["checkpoint_step"] == 2
    with pytest.raises(RunFolderError, match=r"--resume to continue it from its checkpoint \(step 2\)"):
        fitune.train(recipe, max_steps=4, **QUIET)
    assert fitune.train(recipe, max_steps=4, resume=True, **QUIET).losses
    assert _marker(tmp_path / "run")["status"] == "done"


def test_out_of_memory_without_a_checkpoint_leaves_a_reusable_folder(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path)
    fail_step_with_out_of_memory(monkeypatch, 1)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=2, **QUIET)
    monkeypatch.undo()
    assert _marker(tmp_path / "run")["phase"] == "first_step"
    assert fitune.train(recipe, max_steps=2, **QUIET).steps == 2


def _accumulating_recipe(tmp_path: Path, name: str, **output) -> dict:
    """Gradient accumulation and no dropout: a resumed run repeats the uninterrupted one's losses."""
    recipe = tiny_recipe(
        tmp_path / name,
        train={"grad_accum": 2, "batch_size": 2, "seed": 3, "max_steps": STEPS},
        output={"dir": str(tmp_path / name / "run"), **output},
    )
    recipe["data"]["eval_fraction"] = 0.0
    return recipe


def _random_recipe(tmp_path: Path, name: str, **output) -> dict:
    """LoRA dropout and gradient accumulation: a resumed run is exact only with every RNG state restored."""
    recipe = _accumulating_recipe(tmp_path, name, **output)
    recipe["method"]["dropout"] = 0.1
    return recipe


def test_resume_with_dropout_and_accumulation_is_exact(tmp_path, monkeypatch):
    straight = fitune.train(_random_recipe(tmp_path, "a"), max_steps=18, **QUIET)
    recipe = _random_recipe(tmp_path, "b", save_every=3)
    fail_step_with_out_of_memory(monkeypatch, 17)  # past an epoch (48 examples, 4 a step)
    with pytest.raises(OutOfMemory):
        fitune.train(recipe, max_steps=18, **QUIET)
    monkeypatch.undo()
    resumed = fitune.train(recipe, max_steps=18, resume=True, **QUIET)
    assert resumed.losses == straight.losses[15:]  # equal to the bit
    # metrics.jsonl: every step once, the resumed ones after the checkpoint's (rounded as written)
    assert _losses(tmp_path / "b" / "run") == [round(x, 6) for x in straight.losses]


def test_resume_takes_the_old_checkpoint_when_a_crash_struck_between_the_renames(tmp_path, monkeypatch):
    straight = fitune.train(_accumulating_recipe(tmp_path, "a"), max_steps=8, **QUIET)
    recipe = _accumulating_recipe(tmp_path, "b", save_every=2)
    import fitune.trainer.checkpoint as ckpt

    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".checkpoint-tmp-") and (self.parent / ckpt.OLD).exists():
            raise SystemExit("crash between the renames")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(SystemExit):
        fitune.train(recipe, max_steps=8, **QUIET)
    monkeypatch.undo()
    out = tmp_path / "b" / "run"
    assert not (out / "checkpoint").exists() and (out / ".checkpoint-old" / "state.json").is_file()
    resumed = fitune.train(recipe, max_steps=8, resume=True, **QUIET)
    assert resumed.losses == straight.losses[2:]  # the checkpoint of step 2, renamed away, was used
    assert not (out / ".checkpoint-old").exists() and ckpt.find_checkpoint(out)[1] == 6


def _cli(recipe: dict, folder: Path, *flags: str) -> subprocess.Popen:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fitune.cli", "train", str(path), "--no-progress", "--force", *flags],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.is_file() and metrics.read_text().count("\n") >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.002)
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.limits(timeout_s=300)  # seven training processes, one after the other
def test_sigkill_at_a_random_step_then_resume_gives_every_loss_to_the_bit(tmp_path):
    straight = _cli(_random_recipe(tmp_path, "straight", save_every=2), tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    expected = _losses(tmp_path / "straight" / "run")
    assert len(expected) == STEPS
    for seed in (1, 2, 3):
        name = f"killed-{seed}"
        recipe = _random_recipe(tmp_path, name, save_every=2)
        out = tmp_path / name / "run"
        proc = _cli(recipe, tmp_path / name)
        _wait_for_step(proc, out / "metrics.jsonl", random.Random(seed).randint(3, STEPS - 10))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _marker(out)["status"] == "running"  # a killed process cannot say more; its pid is gone
        resumed = _cli(recipe, tmp_path / name, "--resume")
        assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
        assert _losses(out) == expected, f"seed {seed}"


@pytest.mark.limits(timeout_s=300)  # four training processes
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_documented_code(tmp_path):
    recipe = _accumulating_recipe(tmp_path, "t")  # no save_every: the interruption writes the checkpoint
    out = tmp_path / "t" / "run"
    proc = _cli(recipe, tmp_path / "t")
    _wait_for_step(proc, out / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_INTERRUPTED, output
    marker = _marker(out)
    assert marker["status"] == "interrupted" and marker["signal"] == "SIGTERM"
    step = marker["checkpoint_step"]
    assert step is not None and step >= 5, output
    assert "interrupted by SIGTERM after step" in " ".join(output.split()), output
    assert "--resume" in output
    again = _cli(recipe, tmp_path / "t")  # a plain re-run would throw the checkpoint away: refused
    assert again.wait(timeout=120) == EXIT_ERROR
    assert "--resume to continue it" in " ".join(again.stdout.read().split())
    resumed = _cli(recipe, tmp_path / "t", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert _marker(out)["status"] == "done" and len(_losses(out)) == STEPS
