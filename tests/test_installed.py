"""Hub kernels stay off, and what fitune installs on a model stays installed (or the run stops, saying so)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import fitune
from fitune.recipe import Recipe
from fitune.session import build_session
from fitune.techniques.installed import TechniqueLostError

from .conftest import TINY_LLAMA, save_tiny_model, tiny_recipe


def _recipe(**train) -> Recipe:
    return Recipe.from_dict(
        {
            "model": {"config": dict(TINY_LLAMA), "dtype": "bf16"},
            "method": {"kind": "lora", "r": 4},
            "train": {"seq_len": 16, "batch_size": 2, "precision": "bf16", "max_steps": 2, **train},
            "hardware": {"device": "cpu"},
        }
    )


def _lean_modules(session) -> list[str]:
    return [p.where for p in session.installed.patches if p.technique == "train.lean_activations"]


def test_a_loaded_model_keeps_its_lean_norms_across_train_and_eval_with_hub_kernels_on_by_default(
    tmp_path, monkeypatch
):
    # transformers >= 5.25 kernelizes what from_pretrained loads unless told not to, and again at every
    # train()/eval(); where the Hub has no kernel it deletes the instance's forward (the lean norm)
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    folder = save_tiny_model(tmp_path / "model")
    recipe = _recipe().updated({"model.source": str(folder), "model.config": None})
    session = build_session(recipe, with_tokenizer=False)
    assert session.causal_lm.use_kernels is False
    # 2 layers: two norms and an MLP each, and the final norm
    assert len(_lean_modules(session)) == 7
    for mode in (False, True, False, True):
        session.set_training(mode)
    assert session.installed.lost() == []
    norm = session.causal_lm.model.layers[1].post_attention_layernorm
    assert "forward" in norm.__dict__


def test_a_lost_lean_norm_stops_the_run_naming_the_module_and_the_library_versions():
    session = build_session(_recipe(), with_tokenizer=False)
    session.set_training(False)  # all in place: no error
    del session.causal_lm.model.layers[0].input_layernorm.forward  # what kernelize's fallback did
    with pytest.raises(TechniqueLostError) as err:
        session.set_training(True)
    message = str(err.value)
    assert message.startswith("train.lean_activations: the lean forward of model.layers.0.input_layernorm ")
    assert "(LlamaRMSNorm)" in message and "after model.train()" in message
    assert "transformers 5." in message and "torch 2." in message
    assert "set train.lean_activations: false and plan again" in message.split("fix: ")[1]


@pytest.mark.parametrize(
    ("technique", "undo"),
    [
        ("train.attention", lambda s: setattr(s.causal_lm.config, "_attn_implementation", "sdpa")),
        (
            "train.gradient_checkpointing",
            lambda s: setattr(s.causal_lm.model.layers[1], "gradient_checkpointing", False),
        ),
        ("train.loss_chunk", lambda s: s.causal_lm.set_output_embeddings(type(s.causal_lm.lm_head)(64, 260))),
        (
            "train.precision",
            lambda s: setattr(s.causal_lm.model.layers[0].self_attn.q_proj, "cast_input_dtype_enabled", True),
        ),
    ],
)
def test_every_installed_technique_is_checked(technique, undo):
    recipe = _recipe(gradient_checkpointing=True, loss_chunk=8)
    session = build_session(recipe, with_tokenizer=False)
    assert technique in {p.technique for p in session.installed.patches}
    undo(session)
    with pytest.raises(TechniqueLostError, match=f"^{technique}: "):
        session.set_training(False)


def test_no_command_prints_the_bitsandbytes_hub_kernel_line(tmp_path):
    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"config": dict(TINY_LLAMA)},
                "method": {"kind": "qlora", "r": 4},
                "train": {"seq_len": 16, "batch_size": 2},
                "hardware": {"device": "cpu"},
            }
        )
    )
    for command in (["doctor", str(recipe)], ["plan", str(recipe), "--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "fitune.cli", *command], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert "kernels-community" not in done.stderr + done.stdout
        assert "gemm_4bit_forward" not in done.stderr + done.stdout
    assert json.loads(done.stdout)["peak_bytes"] > 0


def test_bitsandbytes_never_asks_the_hub_for_a_kernel():
    code = """
import kernels
calls = []
original = kernels.get_kernel
kernels.get_kernel = lambda *a, **k: calls.append(a) or original(*a, **k)
from fitune.libraries import prepare_libraries
prepare_libraries()
import peft, bitsandbytes
assert kernels.get_kernel is not original  # ours again, unchanged by fitune
print(len(calls))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
    assert "kernels-community" not in done.stderr


def test_measure_and_train_print_nothing_of_the_libraries_they_drive(tmp_path):
    """kineto's USDT lines (torch.profiler starting and stopping), bitsandbytes' and transformers' chatter:
    none reaches the user's stderr, through a whole QLoRA measure and training run."""
    recipe = tiny_recipe(tmp_path, method={"kind": "qlora", "r": 4, "alpha": 8})
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for command in (["measure", str(path)], ["train", str(path), "--max-steps", "1", "--no-progress"]):
        done = subprocess.run(
            [sys.executable, "-m", "fitune.cli", *command], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stderr == "", done.stderr


def test_a_checkpoint_that_does_not_match_its_architecture_is_told_in_fitunes_words(tmp_path):
    """transformers logs missing and unused checkpoint tensors at a level fitune keeps quiet; the run says it."""
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model(tmp_path / "model", dtype="fp32", tie_word_embeddings=False)
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    weights["vision_tower.proj.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = {"source": str(folder), "dtype": "fp32"}
    lines = []
    fitune.train(recipe, max_steps=1, progress=False, echo=lines.append)
    assert (
        f"  warning: 1 weight(s) of LlamaForCausalLM are not in {folder} and start from random values: "
        "lm_head.weight; fix: check that model.source is a checkpoint of this architecture (a head trained from "
        "scratch needs far more steps than an adapter)"
    ) in lines
    assert (
        f"  note: 1 tensor(s) of {folder} are not part of LlamaForCausalLM and are not loaded: "
        "vision_tower.proj.weight"
    ) in lines
