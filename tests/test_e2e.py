"""End to end on the real SmolLM2-135M-Instruct (fetched from PyPI into the cache on first use)."""

from pathlib import Path

import pytest

import fitune

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2-135m-lora.yaml"

# The demo's recipe computes in bf16, which a CPU without AVX-512 runs through slow kernels: the first test's
# four steps took 500 s on an AVX2 machine (5 tokens/s). The limit guards the machine, not the speed.
LIMIT_S = 900


@pytest.mark.slow
@pytest.mark.limits(timeout_s=LIMIT_S)  # the first use fetches the model from PyPI and converts it
def test_a_few_lora_steps_on_smollm2(tmp_path):
    recipe = fitune.Recipe.from_yaml(EXAMPLE).updated(
        {"output.dir": str(tmp_path / "run"), "samples.prompts": [], "hardware.device": "cpu"}
    )
    result = fitune.train(recipe, max_steps=4, progress=False, echo=lambda *a: None)
    assert len(result.losses) == 4
    assert result.eval_losses[4] < result.eval_losses[0]
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.limits(timeout_s=LIMIT_S)
def test_plan_of_smollm2_matches_measurement_on_cpu():
    recipe = fitune.Recipe.from_yaml(EXAMPLE).updated({"hardware.device": "cpu", "train.batch_size": 2})
    predicted, measured = fitune.plan(recipe), fitune.measure(recipe)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)


@pytest.mark.slow
@pytest.mark.limits(timeout_s=LIMIT_S)
def test_smollm2_loaded_with_from_pretrained_keeps_every_technique_across_train_and_eval():
    from fitune.session import build_session

    recipe = fitune.Recipe.from_yaml(EXAMPLE).updated({"hardware.device": "cpu", "train.loss_chunk": "auto"})
    session = build_session(recipe, with_tokenizer=False)
    assert session.source.weights_dir is not None  # the real weights, through from_pretrained
    lean = [p.where for p in session.installed.patches if p.technique == "train.lean_activations"]
    # 30 decoder layers: two norms and a gated MLP each, and the final norm
    assert sum("RMSNorm" in w for w in lean) == 61 and sum("MLP" in w for w in lean) == 30
    techniques = {p.technique for p in session.installed.patches}
    assert {"train.attention", "train.precision", "train.loss_chunk"} <= techniques
    for mode in (False, True, False, True):
        session.set_training(mode)  # raises if anything was undone
    assert session.installed.lost() == []
