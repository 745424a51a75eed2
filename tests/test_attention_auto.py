"""train.attention: auto (the default) picks one kernel for the session, the plan and the doctor, says which
and why; an explicit kernel the architecture lacks is a doctor error with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import fitune
from fitune.cli import EXIT_DOCTOR, app
from fitune.errors import FituneError
from fitune.recipe import Recipe
from fitune.techniques.attention import Where, choose

from .conftest import TINY_LLAMA, tiny_recipe

TINY_GEMMA2 = {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 16}
CPU = Where("cpu", None, None)
A100_FA = Where("cuda", (8, 0), "2.8.3")


def _recipe(config: dict, precision: str = "bf16", attention: str = "auto") -> Recipe:
    return Recipe.from_dict(
        {"model": {"config": config}, "train": {"precision": precision, "attention": attention}}
    )


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("config", "where", "precision", "kernel", "why"),
    [
        (TINY_LLAMA, CPU, "bf16", "sdpa", "the run is on cpu, and FlashAttention-2 runs on CUDA GPUs only"),
        (TINY_LLAMA, Where("cuda", (8, 0), None), "bf16", "sdpa", "flash-attn is not installed"),
        (
            TINY_LLAMA,
            Where("cuda", (7, 5), "2.8.3"),
            "fp16",
            "sdpa",
            "FlashAttention-2 needs an Ampere-or-newer GPU, and this one's compute capability is 7.5",
        ),
        (TINY_LLAMA, A100_FA, "fp32", "sdpa", "train.precision fp32 gives FlashAttention-2 fp32 inputs"),
        (TINY_LLAMA, A100_FA, "bf16", "flash_attention_2", "flash-attn on an Ampere-or-newer GPU"),
        ({**TINY_LLAMA, "head_dim": 256}, Where("cuda", (8, 6), "2.8.3"), "bf16", "sdpa", "head_dim 256"),
        (TINY_GEMMA2, CPU, "bf16", "eager", "gemma2 has no SDPA path in transformers"),
        (TINY_GEMMA2, A100_FA, "bf16", "flash_attention_2", "flash-attn on an Ampere-or-newer GPU"),
        (TINY_GEMMA2, Where("cuda", (8, 0), "2.5.8"), "bf16", "eager", "cannot cap attention logits"),
        (
            {**TINY_LLAMA, "model_type": "gemma3_text", "attn_logit_softcapping": 30.0},
            CPU,
            "bf16",
            "eager",
            "SDPA cannot cap attention logits as gemma3_text does",
        ),
    ],
)
def test_auto_picks_the_fastest_kernel_the_model_and_machine_have(config, where, precision, kernel, why):
    choice = choose(_recipe(config, precision), config, where)
    assert choice.kernel == kernel
    assert choice.reason.startswith("auto: ") and why in choice.reason
    assert choice.line().startswith(f"attention: {kernel} (auto: ")


def test_an_explicit_kernel_is_kept_and_custom_code_lets_transformers_pick():
    assert choose(_recipe(TINY_LLAMA, attention="eager"), TINY_LLAMA, A100_FA).kernel == "eager"
    custom = {**TINY_LLAMA, "model_type": "my_own_lm"}
    choice = choose(_recipe(TINY_LLAMA), custom, CPU)
    assert choice.kernel is None and choice.line().startswith("attention: transformers' default (auto: ")


def test_gemma2_trains_with_the_default_and_explicit_sdpa_is_refused_with_the_fix(tmp_path):
    recipe = tiny_recipe(tmp_path, model={"config": dict(TINY_GEMMA2), "dtype": "fp32"})
    result = fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None)
    assert result.steps == 1
    recipe["train"]["attention"] = "sdpa"
    recipe["output"]["dir"] = str(tmp_path / "explicit")
    with pytest.raises(FituneError) as raised:
        fitune.train(recipe, max_steps=1, progress=False, echo=lambda *a: None)
    assert str(raised.value) == (
        "train.attention: 'sdpa', but transformers has no SDPA attention for gemma2; fix: set "
        "train.attention: auto (fitune picks a kernel this model has) or eager"
    )


def test_a_plan_traces_what_auto_runs(tmp_path):
    recipe = Recipe.from_dict(tiny_recipe(tmp_path, model={"config": dict(TINY_GEMMA2)}))
    auto = fitune.plan(recipe)
    eager = fitune.plan(recipe.updated({"train.attention": "eager"}))
    assert auto.peak_bytes == eager.peak_bytes and auto.phases == eager.phases
    assert auto.attention == (
        "attention: eager (auto: the run is on cpu, and FlashAttention-2 runs on CUDA GPUs only; gemma2 has no "
        "SDPA path in transformers)"
    )
    on_4090 = fitune.plan(recipe.updated({"hardware.device": "rtx-4090", "train.precision": "bf16"}))
    assert on_4090.attention == (
        "attention: flash_attention_2 (auto: flash-attn on an Ampere-or-newer GPU); the plan traces eager "
        "(it keeps more, so the plan is an upper bound)"
    )


def test_doctor_names_sdpa_on_gemma2_and_the_fixed_recipe_passes(tmp_path):
    recipe = tiny_recipe(
        tmp_path, model={"config": dict(TINY_GEMMA2)}, train={"attention": "sdpa", "lr": 1e-4}
    )
    bad = tmp_path / "recipe.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    out = CliRunner().invoke(app, ["doctor", str(bad)])
    assert out.exit_code == EXIT_DOCTOR, out.output
    assert "error [sdpa-not-in-architecture] train.attention is sdpa, but transformers" in _flat(out.output)
    assert "has no SDPA attention for gemma2, so the model cannot be built with it" in _flat(out.output)
    assert "recipe change: train.attention: auto" in out.output
    fixed = CliRunner().invoke(app, ["doctor", str(bad), "--fix"])
    assert "0 error(s) remain" in fixed.output
    path = Path(str(bad).replace(".yaml", ".fixed.yaml"))
    assert Recipe.from_yaml(path).train.attention == "auto"
    passed = CliRunner().invoke(app, ["doctor", str(path)])
    assert passed.exit_code == 0, passed.output
    assert "attention: eager (auto: the run is on cpu" in _flat(passed.output)
