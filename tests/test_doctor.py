"""The preflight doctor: every rule fires on one case and stays quiet on a close one, fixes resolve what
they claim to, and `apply_fixes` turns a recipe into one the doctor accepts.

Every rule needs an entry in CASES; `test_rule_has_a_case` fails for a rule added without one.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from fitune.preflight import DoctorContext, Finding, apply_fixes, list_rules, run_rules
from fitune.recipe import Recipe

GIB = 2**30

LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
GEMMA2 = {
    **LLAMA,
    "model_type": "gemma2",
    "head_dim": 64,
    "vocab_size": 256000,
    "attn_logit_softcapping": 50.0,
}
GEMMA3_CAPPED = {**GEMMA2, "model_type": "gemma3_text", "attn_logit_softcapping": 30.0}  # has an SDPA path
ROPE_LINEAR = {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 128,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 1024,
    "vocab_size": 50257,
}

BASE = {
    "model": {"config": LLAMA},
    "train": {"precision": "bf16", "attention": "sdpa", "seq_len": 512, "batch_size": 4},
    "hardware": {"device": "auto"},
}


def recipe(changes: dict | None = None) -> Recipe:
    return Recipe.from_dict(BASE).updated(changes or {})


# --- environments, built directly (fitune.hardware is imported lazily) ----------------------------------------


def _gpu(name: str, cc: tuple[int, int], memory_gb: int):
    from fitune.hardware.catalog import GPU

    ampere = cc >= (8, 0)
    return GPU(
        name=name.lower(),
        display_name=f"NVIDIA {name}",
        memory_bytes=memory_gb * GIB,
        compute_capability=cc,
        bf16=ampere,
        flash_attention_2=ampere,
        bf16_tflops=100.0 if ampere else None,
        fp16_tflops=100.0,
        bandwidth_gbps=1000.0,
        source="test",
    )


def _cuda(name: str, cc: tuple[int, int], memory_gb: int, **overrides):
    from fitune.hardware.detect import Environment

    gpu = _gpu(name, cc, memory_gb)
    fields = {
        "device_type": "cuda",
        "device_name": gpu.display_name,
        "gpu": gpu,
        "total_memory_bytes": gpu.memory_bytes,
        "free_memory_bytes": gpu.memory_bytes,
        "num_devices": 1,
        "torch_version": "2.13.0+cu128",
        "cuda_version": "12.8",
        "bitsandbytes_version": "0.50.2",
        "bitsandbytes_cuda": True,
        "flash_attn_version": "2.8.3" if gpu.flash_attention_2 else None,
        "simulated": False,
    }
    return Environment(**{**fields, **overrides})


def T4(**kw):
    return _cuda("T4", (7, 5), 16, **kw)


def V100(**kw):
    return _cuda("V100", (7, 0), 32, **kw)


def RTX3090(**kw):
    return _cuda("RTX 3090", (8, 6), 24, **kw)


def A100(**kw):
    return _cuda("A100", (8, 0), 80, **kw)


def H100(**kw):
    return _cuda("H100", (9, 0), 80, **kw)


def RTX5090(**kw):
    return _cuda("RTX 5090", (12, 0), 32, **kw)


def CPU(**kw):
    from fitune.hardware.detect import Environment

    fields = {
        "device_type": "cpu",
        "device_name": "cpu",
        "gpu": None,
        "total_memory_bytes": 64 * GIB,
        "free_memory_bytes": 48 * GIB,
        "num_devices": 1,
        "torch_version": "2.13.0+cpu",
        "cuda_version": None,
        "bitsandbytes_version": "0.50.2",
        "bitsandbytes_cuda": False,
        "flash_attn_version": None,
        "simulated": False,
    }
    return Environment(**{**fields, **kw})


def ctx(changes: dict | None = None, env=None, **kw) -> DoctorContext:
    return DoctorContext(recipe(changes), env, **kw)


def data_file(tmp_path, lines: int) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"text": "example {i}"}}\n' for i in range(lines)))
    return str(path)


FA2 = {"train.attention": "flash_attention_2"}
QLORA = {"method.kind": "qlora"}
FP16 = {"train.precision": "fp16"}

# rule id -> tmp_path -> (a context that triggers the rule, a close one that does not)
CASES = {
    "bf16-on-pre-ampere": lambda t: (ctx({}, T4()), ctx({}, A100())),
    "bf16-weights-on-pre-ampere": lambda t: (ctx(FP16, V100()), ctx({**FP16, "model.dtype": "fp16"}, V100())),
    "fa2-on-pre-ampere": lambda t: (ctx(FA2, T4()), ctx(FA2, RTX3090())),
    "fa2-large-head-backward": lambda t: (
        ctx({**FA2, "model.config": {**LLAMA, "head_dim": 256}}, RTX3090()),
        ctx({**FA2, "model.config": {**LLAMA, "head_dim": 256}}, A100()),
    ),
    "fa2-without-cuda": lambda t: (ctx(FA2, CPU()), ctx(FA2, H100())),
    "fa2-not-installed": lambda t: (ctx(FA2, A100(flash_attn_version=None)), ctx(FA2, A100())),
    "flash-attn-1x": lambda t: (ctx(FA2, A100(flash_attn_version="1.0.9")), ctx(FA2, A100())),
    "fa2-fp32-compute": lambda t: (ctx({**FA2, "train.precision": "fp32"}, A100()), ctx(FA2, A100())),
    "sdpa-not-in-architecture": lambda t: (
        ctx({"model.config": GEMMA2}, A100()),
        ctx({"model.config": GEMMA2, "train.attention": "auto"}, A100()),
    ),
    "softcap-model-with-sdpa": lambda t: (
        ctx({"model.config": GEMMA3_CAPPED}, A100()),
        ctx({"model.config": GEMMA3_CAPPED, "train.attention": "eager"}, A100()),
    ),
    "softcap-model-old-flash-attn": lambda t: (
        ctx({**FA2, "model.config": GEMMA2}, A100(flash_attn_version="2.5.8")),
        ctx({**FA2, "model.config": GEMMA2}, A100(flash_attn_version="2.8.3")),
    ),
    "blackwell-needs-cuda-12-8": lambda t: (
        ctx({}, RTX5090(cuda_version="12.4", torch_version="2.5.1+cu124")),
        ctx({}, RTX5090()),
    ),
    "fp16-on-cpu": lambda t: (ctx(FP16, CPU()), ctx({"train.precision": "fp32"}, CPU())),
    "bf16-on-cpu-without-avx512": lambda t: (
        ctx({}, CPU(cpu_capability="AVX2")),
        ctx({}, CPU(cpu_capability="AVX512")),
    ),
    "fp16-weights-on-cpu": lambda t: (
        ctx({"train.precision": "fp32", "model.dtype": "fp16"}, CPU()),
        ctx({"train.precision": "fp32", "model.dtype": "fp32"}, CPU()),
    ),
    "cuda-requested-without-gpu": lambda t: (
        ctx({"hardware.device": "cuda"}, CPU()),
        ctx({"hardware.device": "cpu"}, CPU()),
    ),
    "more-devices-than-visible": lambda t: (
        ctx({"hardware.num_devices": 4}, A100(num_devices=2)),
        ctx({"hardware.num_devices": 4}, A100(simulated=True)),
    ),
    "fp16-where-bf16-works": lambda t: (ctx(FP16, RTX3090()), ctx(FP16, T4())),
    "fp16-on-bf16-pretrained-model": lambda t: (
        ctx({**FP16, "model.dtype": "fp16", "model.config": {**LLAMA, "torch_dtype": "bfloat16"}}, T4()),
        ctx({**FP16, "model.dtype": "fp16", "model.config": {**LLAMA, "torch_dtype": "float16"}}, T4()),
    ),
    "precision-weights-mismatch": lambda t: (ctx({"model.dtype": "fp16"}, A100()), ctx({}, A100())),
    "bitsandbytes-missing": lambda t: (
        ctx(QLORA, A100(bitsandbytes_version=None, bitsandbytes_cuda=False)),
        ctx({}, A100(bitsandbytes_version=None, bitsandbytes_cuda=False)),
    ),
    "bitsandbytes-without-cuda": lambda t: (
        ctx({"train.optimizer": "adamw8bit"}, A100(bitsandbytes_cuda=False)),
        ctx({"train.optimizer": "adamw8bit"}, A100()),
    ),
    "bitsandbytes-too-old": lambda t: (
        ctx(QLORA, A100(bitsandbytes_version="0.41.1")),
        ctx(QLORA, A100(bitsandbytes_version="0.48.0")),
    ),
    "8bit-optimizer-on-cpu-old-bitsandbytes": lambda t: (
        ctx({"train.optimizer": "adamw8bit"}, CPU(bitsandbytes_version="0.49.2")),
        ctx({"train.optimizer": "adamw8bit"}, CPU(bitsandbytes_version="0.50.0")),
    ),
    "paged-optimizer-without-cuda": lambda t: (
        ctx({"train.optimizer": "paged_adamw8bit"}, CPU()),
        ctx({"train.optimizer": "paged_adamw8bit"}, A100()),
    ),
    "qlora-fp32-compute": lambda t: (ctx({**QLORA, "train.precision": "fp32"}, A100()), ctx(QLORA, A100())),
    "qlora-fp32-weights": lambda t: (ctx({**QLORA, "model.dtype": "fp32"}, A100()), ctx(QLORA, A100())),
    "fsdp-torch-too-old": lambda t: (
        ctx({"hardware.num_devices": 2}, A100(num_devices=2, torch_version="2.8.0+cu128")),
        ctx({"hardware.num_devices": 2}, A100(num_devices=2)),
    ),
    "fsdp-8bit-optimizer": lambda t: (
        ctx({"hardware.num_devices": 2, "train.optimizer": "adamw8bit"}, A100(num_devices=2)),
        ctx({"hardware.num_devices": 1, "train.optimizer": "adamw8bit"}, A100(num_devices=2)),
    ),
    "qlora-fsdp-storage-dtype": lambda t: (
        ctx({**QLORA, "hardware.num_devices": 2}, A100(num_devices=2, torch_version="2.11.0+cu128")),
        ctx({**QLORA, "hardware.num_devices": 2}, A100(num_devices=2)),
    ),
    "lora-empty-targets": lambda t: (ctx({"method.targets": []}), ctx({"method.targets": ["q_proj"]})),
    "lora-targets-not-found": lambda t: (
        ctx({"method.targets": ["query_key_value"]}),
        ctx({"method.targets": ["q_proj", "v_proj"]}),
    ),
    "lora-targets-partly-unknown": lambda t: (
        ctx({"method.targets": ["q_proj", "W_pack"]}),
        ctx({"method.targets": ["q_proj", "self_attn.v_proj"]}),
    ),
    "lora-scale-tiny": lambda t: (
        ctx({"method.r": 64, "method.alpha": 8}),
        ctx({"method.r": 64, "method.alpha": 16}),
    ),
    "lora-scale-huge": lambda t: (
        ctx({"method.r": 2, "method.alpha": 32}),
        ctx({"method.r": 8, "method.alpha": 32}),
    ),
    "lora-rank-exceeds-width": lambda t: (
        ctx({"method.r": 128, "method.alpha": 256}),
        ctx({"method.r": 64, "method.alpha": 128}),
    ),
    "lr-high-for-full-finetune": lambda t: (
        ctx({"method.kind": "full"}),
        ctx({"method.kind": "full", "train.lr": 2e-5}),
    ),
    "lr-high-for-lora": lambda t: (ctx({"train.lr": 3e-3}), ctx({"train.lr": 1e-3})),
    "seq-len-beyond-learned-positions": lambda t: (
        ctx({"model.config": GPT2, "train.seq_len": 2048}),
        ctx({"model.config": GPT2, "train.seq_len": 1024}),
    ),
    "seq-len-beyond-max-positions": lambda t: (ctx({"train.seq_len": 4096}), ctx({"train.seq_len": 2048})),
    "seq-len-beyond-context": lambda t: (
        ctx({"train.seq_len": 4096, "model.config": ROPE_LINEAR}),
        ctx({"train.seq_len": 2048, "model.config": ROPE_LINEAR}),
    ),
    "chunked-loss-small-vocab": lambda t: (
        ctx({"train.loss_chunk": 256, "model.config": {**LLAMA, "vocab_size": 256}}),
        ctx({"train.loss_chunk": 256}),
    ),
    "loss-chunk-covers-batch": lambda t: (ctx({"train.loss_chunk": 4096}), ctx({"train.loss_chunk": 1024})),
    "no-eval-on-small-data": lambda t: (
        ctx({"data.path": data_file(t, 50), "data.eval_fraction": 0.0}),
        ctx({"data.path": data_file(t, 50), "data.eval_fraction": 0.1}),
    ),
    "eval-split-tiny": lambda t: (
        ctx({"data.path": data_file(t, 40), "data.eval_fraction": 0.05}),
        ctx({"data.path": data_file(t, 40), "data.eval_fraction": 0.2}),
    ),
    "checkpointing-remote-code-adapters": lambda t: (
        ctx({"train.gradient_checkpointing": True, "model.trust_remote_code": True}),
        ctx({"train.gradient_checkpointing": True}),
    ),
    "memory-exceeds-free": lambda t: (
        ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=30 * GIB),
        ctx({}, A100(free_memory_bytes=20 * GIB)),
    ),
    "memory-within-margin": lambda t: (
        ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=19 * GIB),
        ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=10 * GIB),
    ),
    "expandable-segments-off": lambda t: (
        ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=17 * GIB),
        ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=10 * GIB),
    ),
}

RULES = list_rules()


@pytest.fixture(autouse=True)
def _no_allocator_config(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)


def _ids(findings: list[Finding]) -> list[str]:
    return [f.rule_id for f in findings]


# --- every rule: a case that triggers it, one that does not, and a fix that resolves it -----------------------


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_has_a_case(rule):
    assert rule.id in CASES, f"rule {rule.id!r} has no test case: add a (trigger, clear) pair to CASES"


def test_every_case_names_a_rule():
    assert set(CASES) <= {r.id for r in RULES}, set(CASES) - {r.id for r in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_triggers_and_clears(rule, tmp_path):
    trigger, clear = CASES[rule.id](tmp_path)
    found = [f for f in run_rules(trigger) if f.rule_id == rule.id]
    assert len(found) == 1, f"{rule.id} did not fire on its trigger case"
    finding = found[0]
    assert finding.severity == rule.severity
    assert finding.source == rule.source
    for text in (finding.message, finding.fix_text):
        assert text and "{" not in text and "}" not in text, text
    assert rule.id not in _ids(run_rules(clear)), f"{rule.id} fired on its clear case"


@pytest.mark.parametrize("rule", [r for r in RULES if r.fix is not None], ids=lambda r: r.id)
def test_fix_resolves_its_finding(rule, tmp_path):
    trigger, _ = CASES[rule.id](tmp_path)
    fix = rule.fix_for(trigger)
    assert fix, f"{rule.id} has a fix but returned none for its trigger case"
    fixed = replace(trigger, recipe=trigger.recipe.updated(fix))
    assert not rule.applies(fixed), f"{rule.id} still applies after its fix {fix}"


# --- the rule list as data -------------------------------------------------------------------------------------


def test_rule_ids_are_unique_kebab_case():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids), ids


def test_rules_carry_severity_source_and_fix():
    assert len(RULES) >= 40
    for rule in RULES:
        assert rule.severity in ("error", "warning"), rule.id
        assert rule.title and rule.fix_text, rule.id
        assert rule.source, rule.id
        assert all(re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+/issues/\d+", u) for u in rule.source), (
            rule.id
        )


# --- specific behaviour -----------------------------------------------------------------------------------------


def test_message_names_the_gpu_and_the_offending_value():
    finding = next(f for f in run_rules(ctx({}, T4())) if f.rule_id == "bf16-on-pre-ampere")
    assert "NVIDIA T4" in finding.message and "7.5" in finding.message and "bf16" in finding.message
    assert finding.fix == {"train.precision": "fp16"}


def test_errors_come_first():
    findings = run_rules(ctx({**FA2, "train.seq_len": 4096}, T4()))
    severities = [f.severity for f in findings]
    assert "error" in severities and "warning" in severities
    assert severities == sorted(severities, key=["error", "warning"].index)


def test_recipe_only_checks_without_environment():
    findings = run_rules(ctx({"train.seq_len": 4096, **FA2}, None))
    assert _ids(findings) == ["seq-len-beyond-max-positions"]


def test_given_model_config_overrides_the_inline_one():
    context = ctx({"train.seq_len": 2048}, None, model_config=GPT2)
    assert "seq-len-beyond-learned-positions" in _ids(run_rules(context))


def test_memory_rules_skipped_without_a_plan():
    context = ctx({}, A100(free_memory_bytes=1 * GIB))
    assert not [f for f in run_rules(context) if f.rule_id.startswith("memory-")]


def test_expandable_segments_setting_clears_the_warning(monkeypatch):
    context = ctx({}, A100(free_memory_bytes=20 * GIB), planned_peak_bytes=17 * GIB)
    assert "expandable-segments-off" in _ids(run_rules(context))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert "expandable-segments-off" not in _ids(run_rules(context))


def test_unreadable_data_file_is_not_guessed(tmp_path):
    context = ctx({"data.path": str(tmp_path / "missing.jsonl"), "data.eval_fraction": 0.0})
    assert "no-eval-on-small-data" not in _ids(run_rules(context))


# --- apply_fixes ------------------------------------------------------------------------------------------------


def test_apply_fixes_makes_a_t4_recipe_pass():
    context = ctx({**FA2, "train.precision": "bf16"}, T4())
    findings = run_rules(context)
    assert {"bf16-on-pre-ampere", "fa2-on-pre-ampere"} <= set(_ids(findings))
    fixed, diff = apply_fixes(context.recipe, findings)
    assert fixed.train.precision == "fp16" and fixed.train.attention == "sdpa"
    assert fixed.model.dtype == "fp16"
    assert not [f for f in run_rules(replace(context, recipe=fixed)) if f.severity == "error"]
    assert "-  precision: bf16" in diff and "+  precision: fp16" in diff
    assert diff[0].startswith("--- ") and diff[1].startswith("+++ ")


def test_apply_fixes_first_fix_wins_a_conflict():
    def finding(rule_id, severity, fix):
        return Finding(rule_id, severity, "m", fix, "t", ())

    findings = [
        finding("w", "warning", {"train.optimizer": "adamw8bit", "train.lr": 1e-5}),
        finding("e1", "error", {"train.optimizer": "adamw"}),
        finding("e2", "error", {"train.optimizer": "sgd"}),
        finding("none", "error", None),
    ]
    fixed, _ = apply_fixes(recipe(), findings)
    assert fixed.train.optimizer == "adamw"  # errors first, then the first of them
    assert fixed.train.lr == 2e-4  # the warning's fix conflicted, so none of it was applied


def test_apply_fixes_without_fixes_returns_the_recipe_and_no_diff():
    original = recipe()
    fixed, diff = apply_fixes(original, [Finding("x", "error", "m", None, "t", ())])
    assert fixed is original and diff == []


ENVS = {"t4": T4, "v100": V100, "rtx3090": RTX3090, "a100": A100, "h100": H100, "cpu": CPU}


@pytest.mark.parametrize("env_name", list(ENVS))
def test_one_pass_of_fixes_leaves_nothing_fixable(env_name):
    """Fixes agree with each other: after one pass no rule with a fix fires again."""
    env = ENVS[env_name](num_devices=2) if env_name != "cpu" else CPU()
    grid = itertools.product(
        ("fp32", "bf16", "fp16", "bf16-pure"),
        ("fp32", "bf16", "fp16"),
        ("full", "lora", "qlora"),
        ("sdpa", "flash_attention_2"),
        ("adamw", "paged_adamw8bit"),
        (1, 2),
    )
    for precision, dtype, kind, attention, optimizer, devices in grid:
        changes = {
            "train.precision": precision,
            "model.dtype": dtype,
            "method.kind": kind,
            "train.attention": attention,
            "train.optimizer": optimizer,
            "hardware.num_devices": devices,
        }
        context = ctx(changes, env)
        fixed, _ = apply_fixes(context.recipe, run_rules(context))
        left = [f.rule_id for f in run_rules(replace(context, recipe=fixed)) if f.fix]
        assert not left, (changes, left)


def test_import_does_not_load_torch():
    code = "import sys, fitune.preflight; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
