"""Plans of sharded runs (FSDP2): one process's memory, traced on fake tensors under a fake process group,
against each process of a real run over two processes (gloo).

gloo copies every collective's buffer on a thread of its own and frees the copy when it is done, so a
process's real peak moves by a share of one layer's gathered weights from run to run; the shapes here keep
that share under the tolerance (activations of 16 x 256 tokens over layers 64 wide).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import fitune
from fitune.memory.tracker import Category, MemoryTracker
from fitune.recipe import Recipe

from .conftest import TINY_LLAMA

TOLERANCE = {"lora": 0.02, "full": 0.02, "qlora": 0.05}


def _recipe(kind: str, ranks: int = 2) -> dict:
    return {
        "model": {"config": dict(TINY_LLAMA, num_hidden_layers=2), "dtype": "bf16"},
        "method": {"kind": "full"} if kind == "full" else {"kind": kind, "r": 4},
        "train": {"seq_len": 256, "batch_size": 16, "precision": "bf16"},
        "hardware": {"device": "cpu", "num_devices": ranks},
    }


def test_the_tracker_sees_storages_resized_outside_the_dispatcher():
    """FSDP2 frees a gathered weight with ``UntypedStorage.resize_(0)`` and gathers it again by resizing
    it back; no op the dispatcher sees does either."""
    t = torch.empty(1000, dtype=torch.float32)
    original = torch.UntypedStorage.resize_
    tracker = MemoryTracker()
    with tracker:
        x = t * 2  # a storage the tracker counts
        before = tracker.live_bytes
        x.untyped_storage().resize_(0)
        assert tracker.live_bytes == before - 4000
        x.untyped_storage().resize_(4000)
        assert tracker.live_bytes == before
        grown = torch.empty(0)
        grown.untyped_storage().resize_(800)  # a storage first seen as it is resized: a gathered weight
        assert tracker.live_breakdown()[Category.GATHERED_WEIGHTS] == 800
        assert torch.UntypedStorage.resize_ is not original
    assert torch.UntypedStorage.resize_ is original  # put back on exit


def test_a_sharded_plan_shrinks_the_weights_each_process_holds():
    one, two = fitune.plan(_recipe("lora", 1)), fitune.plan(_recipe("lora", 2))
    assert two.ranks == 2 and one.ranks == 1
    frozen = {p.ranks: p.phase_breakdowns["steady_step"]["frozen_weights"] for p in (one, two)}
    assert frozen[2] == pytest.approx(frozen[1] / 2, rel=0.05)  # halves, padded rows aside
    gathered = two.phase_breakdowns["steady_step"]
    assert (
        gathered.get("gathered_weights", 0) > 0
        and "gathered_weights" not in one.phase_breakdowns["steady_step"]
    )
    assert any("sharded over 2 processes" in n for n in two.notes)


def test_a_sharded_qlora_plan_holds_half_of_the_block_scales_on_each_of_two_processes():
    """The 4-bit layers' block scales (absmax) are sharded with their weights: a process of two plans half of
    their bytes as quantization state, the small second-level state staying whole."""
    from fitune.session import build_session

    one, two = (
        fitune.plan(Recipe.from_dict(_recipe("qlora", 1))),
        fitune.plan(Recipe.from_dict(_recipe("qlora", 2))),
    )
    held = {p.ranks: p.phase_breakdowns["steady_step"]["quant_state"] for p in (one, two)}
    session = build_session(Recipe.from_dict(_recipe("qlora", 1)), with_tokenizer=False)
    scales = sum(
        m.quant_state.absmax.nbytes
        for m in session.model.modules()
        if getattr(m, "quant_state", None) is not None
    )
    assert scales > 0 and held[1] - held[2] == pytest.approx(scales / 2, rel=0.02)


@pytest.mark.limits(mem_gib=6, timeout_s=300)
def test_each_process_of_a_sharded_run_peaks_where_its_plan_says(tmp_path):
    kinds = ["lora", "full", "qlora"]
    (tmp_path / "recipes.json").write_text(json.dumps({k: _recipe(k) for k in kinds}))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "tests/fsdp_measure.py",
            str(tmp_path / "recipes.json"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "FITUNE_COLLECTIVE_TIMEOUT_MIN": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for kind in kinds:
        planned = fitune.plan(Recipe.from_dict(_recipe(kind)))
        for rank, m in enumerate(measured):
            for phase in ("first_step", "steady_step"):
                assert planned.phases[phase] == pytest.approx(
                    m[kind]["phases"][phase], rel=TOLERANCE[kind]
                ), (kind, rank, phase)
            assert planned.peak_bytes == pytest.approx(m[kind]["peak"], rel=TOLERANCE[kind]), (kind, rank)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_a_sharded_plan_of_a_deep_model_equals_its_full_trace(kind):
    """Every sharded decoder layer adds the same bytes, so two short traces give the full depth."""
    body = _recipe(kind)
    body["model"]["config"]["num_hidden_layers"] = 9
    r = Recipe.from_dict(body)
    short, full = fitune.plan(r), fitune.plan(r, full_trace=True)
    assert short.traced_layers == [2, 3] and full.traced_layers == [9]
    assert short.phases == full.phases
    assert short.breakdown == full.breakdown


def test_a_sharded_plan_for_gpus_moves_the_model_to_each_gpu_group_by_group():
    """On GPUs the model is prepared in host memory and each group reaches its GPU as it is sharded, so a GPU
    holds its shards (and one group at a time) from the load on; the host memory each process needs for it is
    said apart."""
    plans = {}
    for ranks in (1, 2, 4):
        body = _recipe("qlora", ranks)
        body["model"]["config"]["num_hidden_layers"] = 4
        body["hardware"]["device"] = "rtx-4090"
        plans[ranks] = fitune.plan(Recipe.from_dict(body))
    frozen = {n: p.phase_breakdowns["load"].get("frozen_weights", 0) for n, p in plans.items()}
    assert frozen[4] < frozen[2] < frozen[1]
    assert plans[4].phases["load"] < plans[2].phases["load"] < plans[1].phases["load"]
    assert "staged_model" in plans[2].host and "staged_model" not in plans[1].host
    assert plans[2].host["staged_model"] == pytest.approx(plans[4].host["staged_model"], rel=0.01)
    assert any("one group at a time" in n for n in plans[2].notes)
