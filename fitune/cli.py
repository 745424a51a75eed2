"""The ``fitune`` command: validate, train, plan, measure, doctor, models."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fitune.errors import FituneError, RecipeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fine-tune open LLMs on the hardware you have."
)
console = Console()
err_console = Console(stderr=True)

# exit codes (documented in the README)
EXIT_ERROR = 1  # bad input or environment: the message says what to fix
EXIT_INVALID_RECIPE = 2
EXIT_DOCTOR = 3  # preflight found errors (use --force to train anyway)
EXIT_OOM = 4  # out of memory during training; the guard explained it


def _load(recipe_path: Path):
    from fitune.recipe import Recipe

    return Recipe.from_yaml(recipe_path)


def _fail(exc: Exception, code: int = EXIT_ERROR) -> None:
    err_console.print("[bold red]error:[/]", end=" ")
    err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")) -> None:
    """Check a recipe: every problem is listed at once; exits non-zero when any is found."""
    try:
        r = _load(recipe)
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    console.print(
        f"[green]ok[/]: {recipe} is a valid recipe ({r.method.kind}, model {r.model.source or 'inline config'})"
    )


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    overwrite: bool = typer.Option(False, help="Replace a previous run in output.dir."),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Plain log lines instead of a progress bar."
    ),
) -> None:
    """Train a recipe and save the adapter (or model), metrics and the resolved recipe."""
    from fitune.logs import quiet_libraries

    quiet_libraries()
    try:
        r = _load(recipe)
        from fitune.trainer.loop import train as run_train

        result = run_train(
            r, max_steps=max_steps, overwrite=overwrite, progress=not no_progress, echo=console.print
        )
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except FituneError as exc:
        _fail(exc)
    if r.samples.prompts:
        from rich.table import Table

        table = Table(title="held-out prompts, before and after training", show_lines=True)
        table.add_column("prompt")
        table.add_column("before")
        table.add_column("after")
        for p, b, a in zip(r.samples.prompts, result.samples_before, result.samples_after, strict=True):
            table.add_row(p, b, a)
        console.print(table)
    ev = result.eval_losses
    if ev:
        first, last = ev[min(ev)], ev[max(ev)]
        console.print(f"eval loss {first:.4f} -> {last:.4f}")
    console.print(
        f"done: {result.steps} steps, {result.tokens_per_second:,.0f} tokens/s; saved in {result.output_dir}"
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
