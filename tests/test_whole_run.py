"""The whole run planned: eval, samples, checkpoint and save beside the steps, against the real train call."""

import json

import pytest
import torch
from typer.testing import CliRunner

import fitune
from fitune.cli import app
from fitune.memory.measure_cpu import measure_cpu_allocations
from fitune.recipe import Recipe
from fitune.trainer.oom import OutOfMemory

from .conftest import TINY_LLAMA, tiny_recipe

# a vocabulary large next to the model, as in real models: the logits dominate the step and the eval pass
WIDE_VOCAB = dict(TINY_LLAMA, vocab_size=8192, hidden_size=64, num_hidden_layers=2, tie_word_embeddings=False)


def _long_text_data(path, rows: int = 20):
    """Rows longer than seq_len, so every micro-batch is full length (what the plan assumes)."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(f"w{i}-{j}" for j in range(200))}) + "\n")
    return path


def _recommended(tmp_path, kind: str) -> Recipe:
    """The settings fitune recommends (bf16, fused chunked loss), an eval split, sample prompts, checkpoints."""
    return Recipe.from_dict(
        {
            "model": {"config": WIDE_VOCAB, "dtype": "bf16"},
            "method": {"kind": kind, "r": 4},
            "data": {"path": str(_long_text_data(tmp_path / "data.jsonl")), "eval_fraction": 0.2},
            "train": {
                "seq_len": 128,
                "batch_size": 4,
                "precision": "bf16",
                "loss_chunk": "auto",
                "max_steps": 3,
                "eval_every": 2,
            },
            "samples": {"prompts": ["What comes after w1-5?"], "max_new_tokens": 8},
            "output": {"dir": str(tmp_path / "run"), "save_every": 2},
            "hardware": {"device": "cpu"},
        }
    )


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_plan_is_the_peak_of_the_whole_train_call(tmp_path, kind):
    r = _recommended(tmp_path, kind)
    planned = fitune.plan(r)
    assert set(planned.phases) == {
        "load",
        "first_step",
        "steady_step",
        "eval",
        "samples",
        "checkpoint",
        "save",
    }
    assert planned.absent == {}
    measured = measure_cpu_allocations(lambda: fitune.train(r, progress=False, echo=lambda *a: None))
    assert planned.peak_bytes == pytest.approx(measured.peak_bytes_relative, rel=0.02)
    # the eval pass goes through the chunked loss: it never needs more than a training step
    assert planned.phases["eval"] <= planned.phases["steady_step"]


def test_every_phase_is_planned_as_measured(tmp_path):
    r = _recommended(tmp_path, "lora")
    planned = fitune.plan(r)
    measured = fitune.measure(r)
    assert set(measured.phases) == set(planned.phases)
    for name, b in measured.phases.items():
        assert planned.phases[name] == pytest.approx(b, rel=0.02), name
    assert measured.phases["eval"] <= measured.phases["steady_step"]


def test_phases_the_run_does_not_have_are_named_with_why(tmp_path):
    r = Recipe.from_dict(
        {
            "model": {"config": TINY_LLAMA},
            "train": {"seq_len": 32, "batch_size": 1},
            "hardware": {"device": "cpu"},
        }
    )
    p = fitune.plan(r)
    assert set(p.phases) == {"load", "first_step", "steady_step", "save"}
    assert set(p.absent) == {"eval", "samples", "checkpoint"}
    assert "save_every" in p.absent["checkpoint"] and "samples.prompts" in p.absent["samples"]
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    out = CliRunner().invoke(app, ["plan", str(path)])
    assert out.exit_code == 0, out.output
    assert "absent: no eval split" in out.output


def test_out_of_memory_in_eval_is_explained_against_the_eval_phase(tmp_path, monkeypatch):
    import fitune.phases as phases

    def eval_runs_out(session, batches):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(phases, "eval_loss", eval_runs_out)
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(OutOfMemory) as info:
        fitune.train(recipe, max_steps=2, progress=False, echo=lambda *a: None)
    report = info.value.report
    assert report.phase == "eval" and report.step == 0
    planned = fitune.plan(Recipe.from_dict(recipe))
    assert report.planned == planned.phase_breakdowns["eval"]
    assert "out of memory in eval (step 0)" in str(info.value)
    assert "planned peak of eval: " in str(info.value)
