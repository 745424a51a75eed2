"""The planner: fake-tensor simulation of the real step, extrapolation, agreement with measurement."""

import json

import pytest
from typer.testing import CliRunner

import fitune
from fitune.cli import app
from fitune.errors import PlanError
from fitune.recipe import Recipe

from .conftest import TINY_LLAMA, save_tiny_model


def _recipe(kind="lora", device="cpu", layers=2, **train):
    return Recipe.from_dict(
        {
            "model": {"config": dict(TINY_LLAMA, num_hidden_layers=layers), "dtype": "bf16"},
            "method": {"kind": kind, "r": 4},
            "train": {"seq_len": 64, "batch_size": 2, "precision": "bf16", **train},
            "hardware": {"device": device},
        }
    )


@pytest.mark.parametrize("device", ["cpu", "rtx-4090"])
@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_extrapolation_equals_full_trace(kind, device):
    r = _recipe(kind, device, layers=9)
    short = fitune.plan(r)
    full = fitune.plan(r, full_trace=True)
    assert short.traced_layers == [2, 3] and full.traced_layers == [9]
    assert short.phases == full.phases
    assert short.breakdown == full.breakdown
    assert short.peak_op == full.peak_op and short.peak_module == full.peak_module


@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_plan_matches_cpu_measurement(kind):
    r = _recipe(kind, layers=3, seq_len=96)
    predicted = fitune.plan(r)
    measured = fitune.measure(r)
    for phase in ("first_step", "steady_step"):
        assert predicted.phases[phase] == pytest.approx(measured.phases[phase], rel=0.02), phase
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02)


def test_streamed_qlora_load_is_planned_as_measured(tmp_path):
    """QLoRA reads its checkpoint one tensor at a time; the fake load allocates the same tensors, in the same
    order, bitsandbytes' CPU quantize temporaries included."""
    folder = save_tiny_model(tmp_path / "model")
    r = Recipe.from_dict(
        {
            "model": {"source": str(folder), "dtype": "bf16"},
            "method": {"kind": "qlora", "r": 4},
            "train": {"seq_len": 64, "batch_size": 2, "precision": "bf16"},
            "hardware": {"device": "cpu"},
        }
    )
    predicted = fitune.plan(r, full_trace=True)
    measured = fitune.measure(r)
    assert predicted.phases["load"] == pytest.approx(measured.phases["load"], rel=0.02)


def test_breakdown_sums_to_peak_and_names_where():
    p = fitune.plan(_recipe("lora"))
    assert sum(p.breakdown.values()) == p.peak_bytes
    assert set(p.phases) == {"load", "first_step", "steady_step", "save"}  # no data, prompts, save_every
    assert p.peak_op.startswith("aten.")
    assert p.peak_module
    assert p.timeline and all("live_bytes" in point for point in p.timeline)


def test_plan_changes_in_the_expected_category():
    lora, qlora = fitune.plan(_recipe("lora")), fitune.plan(_recipe("qlora"))
    assert qlora.breakdown.get("quant_state", 0) > 0 and "quant_state" not in lora.breakdown
    assert qlora.breakdown["frozen_weights"] < lora.breakdown["frozen_weights"]
    full = fitune.plan(_recipe("full"))
    assert full.phases["steady_step"] > lora.phases["steady_step"]
    plain = fitune.plan(_recipe("full", seq_len=256, batch_size=4))
    ckpt = fitune.plan(_recipe("full", seq_len=256, batch_size=4, gradient_checkpointing=True))
    assert ckpt.phases["first_step"] < plain.phases["first_step"]


def test_cuda_target_models_the_allocator_and_overheads():
    p = fitune.plan(_recipe("lora", "t4"))
    assert p.device == "cuda" and p.gpu == "t4"
    assert p.peak_bytes % 512 == 0
    assert p.cuda["reserved"] >= p.cuda["allocated"] == p.peak_bytes
    assert p.cuda["device_total"] > p.cuda["reserved"]
    assert any("cuBLAS" in name for name in p.overheads)


def test_recipe_without_data_is_planned_from_seq_len_and_batch():
    small, big = fitune.plan(_recipe(seq_len=64)), fitune.plan(_recipe(seq_len=128))
    for phase in ("first_step", "steady_step"):
        assert big.phases[phase] > small.phases[phase]
    assert big.phases["load"] == small.phases["load"]


def test_a_data_dependent_step_is_named_not_guessed(monkeypatch):
    import fitune.step as step

    def reads_values(batches):
        return int(sum((b.targets_BT != -100).sum() for b in batches))  # .item(): reads tensor data

    monkeypatch.setattr(step, "count_targets", reads_values)
    with pytest.raises(PlanError, match=r"_local_scalar_dense"):
        fitune.plan(_recipe("lora"))


def test_plan_cli_json(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"config": TINY_LLAMA},
                "train": {"seq_len": 32, "batch_size": 1},
                "hardware": {"device": "cpu"},
            }
        )
    )
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["peak_bytes"] == max(data["phases"].values())
    table = CliRunner().invoke(app, ["plan", str(path)])
    assert "peak by phase" in table.output and "activations" in table.output


def test_plan_cli_prints_the_host_memory_of_offloaded_activations(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {
        "model": {"config": TINY_LLAMA, "dtype": "bf16"},
        "train": {"seq_len": 64, "batch_size": 1, "offload_activations": True},
        "hardware": {"device": "rtx-4090"},
    }
    path.write_text(json.dumps(recipe))
    table = CliRunner().invoke(app, ["plan", str(path), "--no-search"])
    assert table.exit_code == 0, table.output
    assert "host memory: offloaded_activations peak at" in table.output


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_tied_embedding_gradients_are_summed_as_the_engine_does(precision):
    """A full fine-tune with tied embeddings: backward adds the head's and the embedding's gradients of the
    shared weight in place when the engine holds the only reference (bf16: the head's gradient is a fresh
    cast); the plan must not count a third copy. In fp32 the head's gradient is a view of a matmul's output,
    and the engine adds out of place: the plan must count it."""
    r = Recipe.from_dict(
        {
            "model": {"config": dict(TINY_LLAMA, vocab_size=8192), "dtype": precision},
            "method": {"kind": "full"},
            "train": {"seq_len": 32, "batch_size": 1, "precision": precision},
            "hardware": {"device": "cpu"},
        }
    )
    predicted, measured = fitune.plan(r), fitune.measure(r)
    embedding_grad = 8192 * TINY_LLAMA["hidden_size"] * 4
    assert abs(predicted.phases["steady_step"] - measured.phases["steady_step"]) < 0.1 * embedding_grad


# the forked child shares the test process's pages; resident memory counts them twice
@pytest.mark.limits(mem_gib=8)
def test_a_plan_traced_in_two_processes_equals_one_traced_in_one(monkeypatch):
    from fitune.planner.plan import _fork_helps

    monkeypatch.setenv("FITUNE_PLAN_PROCESSES", "2")
    if not _fork_helps():
        pytest.skip("no fork on this platform")
    r = _recipe("qlora", "rtx-4090", layers=9, grad_accum=2)
    two = fitune.plan(r)
    monkeypatch.setenv("FITUNE_PLAN_PROCESSES", "1")
    serial = fitune.plan(r)
    for name in ("phases", "breakdown", "peak_op", "peak_module", "timeline", "cuda", "phase_breakdowns"):
        assert getattr(two, name) == getattr(serial, name), name


@pytest.mark.limits(mem_gib=8)
def test_a_child_that_fails_is_replaced_by_a_run_here(monkeypatch):
    import os

    from fitune.memory.simulate import simulate
    from fitune.planner.plan import _fork_helps, in_two_processes

    monkeypatch.setenv("FITUNE_PLAN_PROCESSES", "2")
    if not _fork_helps():
        pytest.skip("no fork on this platform")
    here = os.getpid()
    runs = []

    def first():
        if os.getpid() != here:
            raise RuntimeError("the child fails")
        runs.append("first here")
        return simulate(_recipe("lora"), num_layers=1)

    a, b = in_two_processes(first, lambda: simulate(_recipe("lora"), num_layers=1))
    assert runs == ["first here"]
    assert a.phase_peaks == b.phase_peaks


@pytest.mark.parametrize(
    ("kind", "device", "grad_accum", "optimizer", "checkpointing"),
    [
        ("lora", "cpu", 1, "adamw", False),
        ("qlora", "rtx-4090", 3, "adamw8bit", True),
        ("full", "cpu", 2, "adamw8bit", False),
        ("full", "t4", 2, "adamw", True),
    ],
)
def test_steady_step_taken_from_the_first_equals_a_traced_one(
    kind, device, grad_accum, optimizer, checkpointing
):
    """The steady step's micro-batches are the first step's with the optimizer state beside them, and its
    optimizer step is traced on the first step's gradients: every part, the allocator's peaks (CUDA) and the
    timeline come out as tracing a second step does."""
    from fitune.memory.devices import device_model
    from fitune.memory.simulate import simulate
    from fitune.planner.plan import _target

    precision = "fp16" if device == "t4" else "bf16"
    r = _recipe(
        kind,
        device,
        grad_accum=grad_accum,
        optimizer=optimizer,
        precision=precision,
        gradient_checkpointing=checkpointing,
    )
    target = _target(r)
    model = device_model(target["device"], target["gpu"])

    def run(in_full: bool):
        return simulate(
            r,
            num_layers=2,
            round_bytes=model.round_bytes,
            allocator=model.new_allocator(),
            host_is_device=model.kind == "cpu",
            kernel_scratch=model.kernel_scratch,
            steady_step_in_full=in_full,
        )

    run(True)  # one-time initialisations inside torch and the libraries stay out of the compared runs
    traced, taken = run(True), run(False)
    assert taken.parts == traced.parts
    assert taken.phase_peaks == traced.phase_peaks
    assert taken.phase_allocated == traced.phase_allocated
    assert taken.phase_reserved == traced.phase_reserved
    assert (taken.peak_bytes, taken.peak_phase, taken.peak_op) == (
        traced.peak_bytes,
        traced.peak_phase,
        traced.peak_op,
    )

    def points(sim):
        return [(p["stage"], p["live_bytes"], p["by_category"]) for p in sim.timeline]

    assert points(taken) == points(traced)
