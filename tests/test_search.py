"""``fitune plan --search``: derived figures equal direct plans, the doctor rules out what a target cannot
run, ranking respects fit and margin, nothing-fits names a change; the CLI's JSON, recipe and HTML."""

from __future__ import annotations

import base64
import importlib
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

import fitune
from fitune.cli import app
from fitune.hardware.catalog import get_gpu
from fitune.models.sources import config_from_dict
from fitune.planner import candidates as C
from fitune.planner import search as S
from fitune.planner import speed
from fitune.recipe import Recipe

# Wide enough that every LoRA tensor has 4,096 elements or more (bitsandbytes' smallest 8-bit tensor) and that
# the projections of a few tokens are a real share of memory; shallow, so that a trace takes a fraction of a
# second (fake tensors cost per op, not per byte).
WIDE = {
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 2048,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
GIB = 2**30


def _base(layers: int = 1, **train) -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"config": dict(WIDE, num_hidden_layers=layers), "dtype": "bf16"},
            "method": {"kind": "lora", "r": 16, "alpha": 32},
            "train": {"seq_len": 64, "batch_size": 2, "grad_accum": 2, "precision": "bf16", **train},
            "hardware": {"device": "cpu"},
        }
    )


@pytest.fixture
def narrow(monkeypatch):
    """Search fewer settings, and every one of them (no early stop), so a test traces what it checks."""

    def apply(**knobs):
        monkeypatch.setattr(S, "SETTLED", 10**6)
        for name, values in knobs.items():
            monkeypatch.setattr(C, name, values)

    return apply


@pytest.fixture
def memo_plan(monkeypatch):
    """``plan()`` once per recipe: the suggestions re-plan configurations that a test planned to set up."""
    plan_module = importlib.import_module("fitune.planner.plan")  # the package re-exports the function

    done: dict[str, object] = {}
    original = plan_module.plan

    def plan(recipe, **kw):
        key = recipe.to_yaml()
        if key not in done:
            done[key] = original(recipe, **kw)
        return done[key]

    monkeypatch.setattr(plan_module, "plan", plan)
    return plan


def _find(result, **settings):
    for c in result.candidates:
        if all(c.settings[k.replace("__", ".")] == v for k, v in settings.items()):
            return c
    raise AssertionError(f"no candidate with {settings}")


def _direct(result, c) -> int:
    return fitune.plan(result.recipe_of(c)).peak_bytes


def _speed_args(gpu, *, checkpointing: bool) -> dict:
    return dict(
        kind="lora",
        r=16,
        targets="all-linear",
        seq_len=512,
        batch_size=4,
        grad_accum=2,
        checkpointing=checkpointing,
        optimizer="adamw",
        tflops=gpu.bf16_tflops,
        bandwidth_gbps=gpu.bandwidth_gbps,
    )


def test_speed_model_orders_the_techniques():
    shape = speed.model_shape(config_from_dict(WIDE, where="test"))
    gpu = get_gpu("a100-80gb")

    def tps(**kw):
        return speed.estimate(shape, **{**_speed_args(gpu, checkpointing=False), **kw})

    lora = tps()
    assert tps(checkpointing=True).tokens_per_s < lora.tokens_per_s
    assert tps(kind="qlora").tokens_per_s < lora.tokens_per_s
    assert tps(kind="full").tokens_per_s < lora.tokens_per_s
    assert tps(tflops=65.0, bandwidth_gbps=300.0).tokens_per_s < lora.tokens_per_s
    # full fine-tune, no attention: 6 FLOPs per weight and token (2 forward, 2 + 2 backward)
    weights = shape.layer_weights + shape.head_weights
    assert tps(kind="full", seq_len=1).flops_per_token == pytest.approx(6 * weights, rel=1e-3)


def test_derived_equals_plan_with_depth_extrapolation(narrow):
    """8 decoder layers: anchors traced at 2 and 3 and extrapolated; a micro-batch between the anchors, in an
    accumulation group (every gradient already live), derived."""
    narrow(RANKS=(16,), PRECISIONS=("bf16",), CHECKPOINTING=(False,), ATTENTIONS=("sdpa",), LOSS_CHUNKS=(0,))
    narrow(OPTIMIZERS=("adamw",))
    base = _base(layers=8)
    result = S.search(base, C.resolve_target(base, None, 64.0), methods=("lora",), top=1000)
    assert _find(result, train__batch_size=4).traced
    c = _find(result, train__batch_size=2)
    assert not c.traced and c.peak_region == "backward of the later micro-batch"
    assert c.peak_bytes == pytest.approx(_direct(result, c), rel=0.01)


@pytest.mark.parametrize(
    ("kind", "device", "train", "knobs", "sample"),
    [
        # another rank at another micro-batch (the b x r cross term), a paged 8-bit optimizer
        (
            "lora",
            None,
            {},
            {},
            {"method__r": 64, "train__batch_size": 2, "train__optimizer": "paged_adamw8bit"},
        ),
        # 4-bit weights and checkpointing, a micro-batch between the anchors in an accumulation group
        (
            "qlora",
            None,
            {"gradient_checkpointing": True},
            {"RANKS": (16,), "OPTIMIZERS": ("adamw",), "CHECKPOINTING": (True,)},
            {"train__batch_size": 2},
        ),
        # a full fine-tune with chunked loss and an 8-bit optimizer: its own optimizer step
        (
            "full",
            None,
            {"loss_chunk": 32},
            {"LOSS_CHUNKS": (32,)},
            {"train__batch_size": 2, "train__optimizer": "adamw8bit"},
        ),
        # a CUDA target: allocator blocks and cuBLAS workspaces; another rank with adamw's state
        (
            "lora",
            "rtx-4090",
            {"batch_size": 1, "grad_accum": 1},
            {"RANKS": (8, 16)},
            {"method__r": 8, "train__optimizer": "adamw"},
        ),
    ],
)
def test_derived_equals_plan(narrow, kind, device, train, knobs, sample):
    """Derived peaks within 1% of a direct plan of the same configuration."""
    settings = {
        "PRECISIONS": ("bf16",),
        "CHECKPOINTING": (False,),
        "ATTENTIONS": ("sdpa",),
        "LOSS_CHUNKS": (0,),
    }
    narrow(**{**settings, **knobs})
    base = _base(**train)
    result = S.search(base, C.resolve_target(base, device, 64.0), methods=(kind,), top=1000)
    c = _find(result, method__kind=kind, **sample)
    assert c.status == "fits" and not c.traced
    assert c.peak_bytes == pytest.approx(_direct(result, c), rel=0.01), sample


def test_t4_rules_out_bf16_and_flash_attention(narrow):
    narrow(RANKS=(16,), CHECKPOINTING=(False,), LOSS_CHUNKS=(0,), OPTIMIZERS=("adamw",))
    base = _base()
    result = S.search(base, C.resolve_target(base, "t4"), methods=("lora",))
    assert result.ranked
    for c in result.ranked:
        assert c.settings["train.precision"] == "fp16" and c.settings["model.dtype"] == "fp16"
        assert c.settings["train.attention"] == "sdpa" and not c.twins
    reasons = {c.reason.split(":")[0] for c in result.candidates if c.status == "ruled_out"}
    assert {"bf16-on-pre-ampere", "fa2-on-pre-ampere"} <= reasons
    bf16 = _find(result, train__precision="bf16", train__attention="sdpa")
    assert bf16.status == "ruled_out" and "compute capability 7.5" in bf16.reason


def test_nothing_fits_names_a_shorter_sequence_qlora_and_a_gpu(narrow, memo_plan, monkeypatch):
    monkeypatch.setattr(S, "DEVICE_COUNTS", ())  # the suggestions alone (sharding: the test below)
    narrow(
        RANKS=(16,),
        PRECISIONS=("fp16",),
        CHECKPOINTING=(True,),
        ATTENTIONS=("sdpa",),
        LOSS_CHUNKS=("auto",),
        OPTIMIZERS=("adamw8bit",),
    )
    base = _base(seq_len=1024, batch_size=1, grad_accum=1, precision="fp16", gradient_checkpointing=True)
    smallest = base.updated(
        {
            "model.dtype": "fp16",
            "train.loss_chunk": "auto",
            "train.optimizer": "adamw8bit",
            "hardware.device": "t4",
        }
    )
    lora = memo_plan(smallest).peak_bytes
    shorter = memo_plan(smallest.updated({"train.seq_len": 512})).peak_bytes
    quantized = memo_plan(smallest.updated({"method.kind": "qlora"})).peak_bytes
    budget = max(shorter, quantized)  # LoRA fits at 512 tokens, QLoRA at 1024; LoRA at 1024 does not
    assert budget < lora
    result = S.search(base, C.resolve_target(base, "t4", budget / GIB), margin=0.0, methods=("lora",))
    assert not result.ranked
    text = "\n".join(result.suggestions)
    assert "train.seq_len: 512 (from 1024)" in text
    assert "QLoRA: method.kind: qlora fits" in text
    gpu = re.search(r"--gpu ([a-z0-9-]+)", text)
    assert gpu and get_gpu(gpu.group(1)).memory_bytes > budget


def test_cli_ranks_what_fits_under_the_margin_and_writes_json_recipe_and_report(tmp_path):
    base = _base()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(base.to_yaml())
    budget = fitune.plan(base).peak_bytes * 1.05  # the recipe itself fits only without the 10% margin
    best, page = tmp_path / "best.yaml", tmp_path / "plan.html"
    runner = CliRunner()
    args = ["plan", str(recipe), "--budget", f"{budget / GIB!r}", "--method", "lora", "--top", "100"]
    result = runner.invoke(app, [*args, "--json", "--write", str(best), "--report", str(page)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    usable = doc["usable_bytes"]
    assert usable == int(int(budget) * 0.9)
    assert doc["candidates"] and doc["ruled_out"]
    for c in doc["candidates"]:
        assert {"settings", "recipe", "peak_bytes", "tokens_per_s", "breakdown", "changes"} <= set(c)
        assert c["peak_bytes"] <= usable
        assert sum(c["breakdown"].values()) == c["peak_bytes"]
    scores = [c["score"] for c in doc["candidates"]]
    assert scores == sorted(scores, reverse=True)
    assert all(r["reason"] for r in doc["ruled_out"])
    assert {"pruned", "ruled_out", "too_big"} <= {r["status"] for r in doc["ruled_out"]}
    yours = [
        r for r in doc["ruled_out"] if r["status"] == "too_big" and usable < r.get("peak_bytes", 0) <= budget
    ]
    assert yours, "configurations under the budget but inside the margin are not ranked"
    # --write: a valid recipe, the chosen configuration
    assert runner.invoke(app, ["validate", str(best)]).exit_code == 0
    written = yaml.safe_load(best.read_text())
    for key, value in doc["candidates"][0]["settings"].items():
        section, name = key.split(".")
        assert written[section][name] == value, key
    # --report: one self-contained page with the two charts as PNG data
    html = page.read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)


def test_cli_keeps_the_single_plan_and_plans_catalog_models():
    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert (
        listed.exit_code == 0
        and "llama-3.1-8b" in listed.output
        and "meta-llama/Llama-3.1-8B" in listed.output
    )
    unknown = runner.invoke(app, ["plan", "llama-9"])
    assert unknown.exit_code != 0 and "llama-3.1-8b" in unknown.output
    from fitune.cli import _plan_base

    base, from_model = _plan_base("llama-3.1-8b", None)
    assert from_model and base.model.source == "llama-3.1-8b"
    assert base.train.batch_size * base.train.grad_accum == C.DEFAULT_EFFECTIVE_BATCH


def test_nothing_fits_one_gpu_so_the_search_shards_over_two(narrow):
    """A budget that no configuration fits on one GPU but one process of two does: the search goes on to 2 GPUs
    (FSDP2), plans each process as ``fitune plan --nproc 2`` does, halves each process's batch, and keeps what
    one GPU would need."""
    narrow(
        RANKS=(16,),
        PRECISIONS=("bf16",),
        CHECKPOINTING=(True,),
        ATTENTIONS=("sdpa",),
        LOSS_CHUNKS=(0,),
        OPTIMIZERS=("adamw", "adamw8bit"),
    )
    base = _base(layers=8, batch_size=1, grad_accum=2, gradient_checkpointing=True)
    on_gpu = base.updated({"hardware.device": "rtx-4090"})
    one = min(
        fitune.plan(on_gpu.updated(split)).peak_bytes
        for split in ({}, {"train.batch_size": 2, "train.grad_accum": 1})
    )
    two = fitune.plan(on_gpu.updated({"hardware.num_devices": 2, "train.grad_accum": 1})).peak_bytes
    assert two < one, "the test model is too small for sharding to save memory"
    budget = (one + two) / 2
    result = S.search(base, C.resolve_target(base, "rtx-4090", budget / GIB), margin=0.0, methods=("lora",))
    assert result.one_device is not None and not result.one_device.ranked
    assert result.ranks == 2 and result.ranked and result.effective_batch == 1
    for c in result.ranked:
        s = c.settings
        assert s["hardware.num_devices"] == 2 and s["train.optimizer"] == "adamw"
        assert (s["train.batch_size"], s["train.grad_accum"]) == (1, 1)
        assert c.peak_bytes == pytest.approx(_direct(result, c), rel=0.01)
        assert c.speed.communication_s > 0 and c.speed.tokens_per_s > 0
    eight_bit = [c for c in result.candidates if c.settings["train.optimizer"] == "adamw8bit"]
    assert eight_bit and all(c.reason.startswith("fsdp-8bit-optimizer") for c in eight_bit)
    assert "2 GPUs" in C.describe(result.ranked[0].settings)
    assert any("fitune train recipe.yaml --nproc 2" in n for n in result.notes)


def test_speed_model_adds_the_collectives_of_a_sharded_step():
    """Sharded over N GPUs, each micro-batch moves (N-1)/N of two gathers of the stored weights and one
    reduce-scatter of the fp32 gradients over the link; with a slow link that time is the micro-batch's."""
    shape = speed.model_shape(config_from_dict(WIDE, where="test"))
    gpu = get_gpu("rtx-4090")
    args = _speed_args(gpu, checkpointing=True)
    stored = 2 * shape.total_weights
    one = speed.estimate(shape, **args)
    assert one.communication_s is None
    four = speed.estimate(shape, **args, ranks=4, link_gbps=gpu.link_gbps, stored_bytes=stored)
    moved = 3 / 4 * (2 * stored + 4 * shape.lora_weights(16, "all-linear"))
    assert four.communication_s == pytest.approx(moved / (gpu.link_gbps * 1e9 * speed.LINK_EFFICIENCY))
    slow = speed.estimate(shape, **args, ranks=4, link_gbps=1e-3, stored_bytes=stored)
    assert slow.step_seconds == pytest.approx(2 * slow.communication_s, rel=1e-3)
    assert four.tokens_per_s <= 4 * one.tokens_per_s
    assert speed.estimate(shape, **args, ranks=4, link_gbps=None, stored_bytes=stored).tokens_per_s is None
