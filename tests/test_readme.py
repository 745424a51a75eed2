"""The README's recipe reference documents every recipe field, and nothing that does not exist."""

import re
import typing
from pathlib import Path

from fitune.recipe import Recipe

README = (Path(__file__).parent.parent / "README.md").read_text()


def _fields():
    for section, field in Recipe.model_fields.items():
        sub = next(
            a
            for a in (typing.get_args(field.annotation) or (field.annotation,))
            if hasattr(a, "model_fields")
        )
        for name in sub.model_fields:
            yield f"{section}.{name}"


def test_every_recipe_field_documented():
    missing = [f for f in _fields() if f"| `{f}` |" not in README]
    assert not missing


def test_no_documented_field_that_does_not_exist():
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", README, flags=re.M))
    assert documented == set(_fields())


def test_readme_has_exactly_the_two_setup_commands():
    block = README.split("## Set up on a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
