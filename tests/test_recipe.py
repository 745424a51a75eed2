from pathlib import Path

import pytest
from typer.testing import CliRunner

from fitune.cli import EXIT_INVALID_RECIPE, app
from fitune.errors import RecipeError
from fitune.recipe import Recipe

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def test_minimal_recipe_gets_defaults():
    r = Recipe.from_dict({"model": {"source": "smollm2-135m-instruct"}})
    assert r.method.kind == "lora"
    assert r.train.batch_size == 4
    assert r.train.attention == "auto"
    assert r.data is None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    assert Recipe.from_yaml(path).model is not None


def test_three_mistakes_reported_at_once_with_lines(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  source: smollm2-135m-instruct\n  colour: red\nmethod:\n  kind: lorra\ntrain:\n  batch_size: -4\n"
    )
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(bad)
    problems = info.value.problems
    assert len(problems) == 3
    assert f"{bad}:3: model.colour: unknown key" in problems[0]
    assert "method.kind: 'lorra' is not allowed" in problems[1] and "did you mean 'lora'" in problems[1]
    assert f"{bad}:7: train.batch_size: -4" in problems[2] and ">= 1" in problems[2]


def test_validate_cli_exits_nonzero_and_prints_all(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  source: x\n  extra: 1\nmethod:\n  kind: nope\ntrain:\n  batch_size: -1\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == EXIT_INVALID_RECIPE
    out = result.output
    for needle in ("model.extra", "method.kind", "train.batch_size"):
        assert needle in out


def test_validate_cli_accepts_example():
    result = CliRunner().invoke(app, ["validate", str(EXAMPLES[0])])
    assert result.exit_code == 0, result.output


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  source: a\ntrain: [1, 2\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: malformed YAML"):
        Recipe.from_yaml(bad)


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    bad = tmp_path / "twice.yaml"
    bad.write_text(
        "model:\n  source: smollm2-135m-instruct\ntrain:\n  lr: 1.0e-4\n  seq_len: 256\n  lr: 1.0e-2\n"
        "model:\n  dtype: fp32\n"
    )
    with pytest.raises(RecipeError) as info:
        Recipe.from_yaml(bad)
    assert info.value.problems == [
        f"{bad}:6: train.lr is given twice (first at line 4); YAML would keep this later value and silently "
        "drop the first; fix: keep one `lr:` in that section",
        f"{bad}:7: model is given twice (first at line 1); YAML would keep this later value and silently "
        "drop the first; fix: keep one `model:` in that section",
    ]
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == EXIT_INVALID_RECIPE and "train.lr is given twice" in result.output


def test_keys_a_merge_brings_in_may_be_overridden(tmp_path):
    ok = tmp_path / "merge.yaml"
    ok.write_text(
        "base: &base {seq_len: 256, lr: 1.0e-4}\n"
        "model:\n  source: smollm2-135m-instruct\ntrain:\n  <<: *base\n  lr: 1.0e-2\n"
    )
    with pytest.raises(RecipeError) as info:  # the anchor's own top-level key is unknown, nothing else
        Recipe.from_yaml(ok)
    assert len(info.value.problems) == 1 and "base: unknown key" in info.value.problems[0]
    ok.write_text(
        "model:\n  source: smollm2-135m-instruct\ntrain:\n  <<: {seq_len: 256, lr: 1.0e-4}\n  lr: 1.0e-2\n"
    )
    r = Recipe.from_yaml(ok)
    assert (r.train.lr, r.train.seq_len) == (1.0e-2, 256)


def test_model_needs_exactly_one_of_source_and_config():
    with pytest.raises(RecipeError, match="model needs `source`"):
        Recipe.from_dict({"model": {"dtype": "bf16"}})
    with pytest.raises(RecipeError, match="both `source` and `config`"):
        Recipe.from_dict({"model": {"source": "a", "config": {"model_type": "llama"}}})


def test_updated_applies_dotted_changes_and_revalidates():
    r = Recipe.from_dict({"model": {"source": "a"}})
    assert r.updated({"train.batch_size": 2, "method.kind": "qlora"}).method.kind == "qlora"
    with pytest.raises(RecipeError):
        r.updated({"train.batch_size": 0})


def test_recipe_round_trips_through_yaml(tmp_path):
    r = Recipe.from_dict({"model": {"source": "a"}, "train": {"lr": 1e-3, "loss_chunk": "auto"}})
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    assert Recipe.from_yaml(path).to_dict() == r.to_dict()


def test_recompute_mlp_without_lean_activations_names_the_fix():
    with pytest.raises(
        RecipeError, match=r"recompute_mlp.*lean_activations is false; fix: set lean_activations"
    ):
        Recipe.from_dict(
            {"model": {"source": "x"}, "train": {"recompute_mlp": "up", "lean_activations": False}}
        )
    assert (
        Recipe.from_dict({"model": {"source": "x"}, "train": {"recompute_mlp": "up"}}).train.recompute_mlp
        == "up"
    )
