"""The ``fitune`` command: validate, train, plan, measure, doctor, models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fitune.errors import FituneError, OtherRankFailed, RecipeError, RunInterrupted
from fitune.memory import human_bytes

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
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM stopped training (after a checkpoint of the last finished step)


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
    force: bool = typer.Option(False, help="Train even when the preflight doctor reports errors."),
    resume: bool = typer.Option(False, help="Continue the run in output.dir from its last checkpoint."),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Plain log lines instead of a progress bar."
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        min=1,
        help="Processes to shard the model over with FSDP2 (GPUs, or CPU processes); default "
        "hardware.num_devices.",
    ),
) -> None:
    """Train a recipe and save the adapter (or model), metrics and the resolved recipe."""
    import os

    from fitune.distributed.launch import PREFLIGHT_DONE, launch, launched_plan
    from fitune.distributed.world import launched
    from fitune.libraries import prepare_libraries
    from fitune.trainer.oom import OutOfMemory

    prepare_libraries()
    world = launched()
    try:
        r = _load(recipe)
        from fitune.preflight import doctor as run_doctor
        from fitune.preflight import environment_for
        from fitune.preflight.run import plan_for
        from fitune.trainer.run import train as run_train

        ranks = world.size if world.distributed else (nproc or r.hardware.num_devices)
        if ranks != r.hardware.num_devices:
            r = r.updated({"hardware.num_devices": ranks})
        if ranks == 1 or (world.main and not os.environ.get(PREFLIGHT_DONE)):
            env = environment_for(r, training=True)
            the_plan, _ = plan_for(r, env)  # a sharded run's: one process's
            peak = the_plan.peak_bytes if the_plan is not None else None
            # CPU processes on one machine share its memory
            if peak is not None and env.device_type == "cpu":
                peak *= int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
            findings = run_doctor(r, env=env, planned_peak_bytes=peak, training=True)
            if findings:
                _print_findings(findings)
            if any(f.severity == "error" for f in findings) and not force:
                err_console.print(
                    "preflight found errors: fix the recipe (`fitune doctor --fix`) or pass --force"
                )
                raise typer.Exit(EXIT_DOCTOR)
        else:
            the_plan = launched_plan() if world.main else None
        if ranks > 1 and not world.distributed:
            from fitune.trainer.runfolder import prepare_run_folder

            # a folder the run cannot use is said before any process starts (rank 0 checks it again)
            prepare_run_folder(r, overwrite, resume)
            args = ["train", str(recipe), "--nproc", str(ranks)]
            args += ["--max-steps", str(max_steps)] if max_steps is not None else []
            args += ["--overwrite"] * overwrite + ["--resume"] * resume + ["--no-progress"] * no_progress
            raise typer.Exit(launch(ranks, args, the_plan))

        result = run_train(
            r,
            max_steps=max_steps,
            overwrite=overwrite,
            resume=resume,
            progress=not no_progress,
            echo=lambda line: console.print(line, markup=False, highlight=False),
            plan=the_plan,
        )
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except OutOfMemory as exc:
        _fail(exc, EXIT_OOM)
    except RunInterrupted as exc:
        if not world.main:  # every rank stopped after the same step; rank 0 says so
            raise typer.Exit(EXIT_INTERRUPTED) from None
        _fail(exc, EXIT_INTERRUPTED)
    except OtherRankFailed:
        raise typer.Exit(EXIT_ERROR) from None  # rank 0 said why
    except FituneError as exc:
        _fail(exc if world.main else FituneError(f"rank {world.rank}: {exc}"))
    if not world.main:
        return  # rank 0 reports the run
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


def _print_plan(p, recipe) -> None:
    from rich.table import Table

    target = p.gpu or p.device
    console.print(
        f"[bold]plan[/] {recipe.method.kind} of {recipe.model.source or 'inline config'} on {target}"
        + (f", sharded over {p.ranks} processes" if p.ranks > 1 else "")
        + f": peak [bold]{human_bytes(p.peak_bytes)}[/]"
        + (" per process" if p.ranks > 1 else "")
        + f" in {p.peak_phase} ({p.num_layers} layers; traced "
        f"{' and '.join(map(str, p.traced_layers))}; {p.seconds:.1f} s)",
        highlight=False,
    )
    phases = Table(title="peak by phase")
    phases.add_column("phase")
    phases.add_column("peak", justify="right")
    for name, b in p.phases.items():
        phases.add_row(name, human_bytes(b))
    for name, why in p.absent.items():
        phases.add_row(name, f"absent: {why}")
    console.print(phases)
    table = Table(title=f"at the peak: {p.peak_op} in {p.peak_module} ({p.peak_stage})")
    table.add_column("category")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for cat, b in sorted(p.breakdown.items(), key=lambda kv: -kv[1]):
        table.add_row(cat, human_bytes(b), f"{100 * b / max(1, p.peak_bytes):.1f}%")
    console.print(table)
    if p.cuda:
        console.print(
            f"CUDA: max_memory_allocated {human_bytes(p.cuda['allocated'])}, max_memory_reserved "
            f"{human_bytes(p.cuda['reserved'])}, with the CUDA context about {human_bytes(p.cuda['device_total'])} on the device",
            highlight=False,
        )
    for category, b in p.host.items():
        console.print(
            f"host memory: {category} peak at {human_bytes(b)} (held off the device, not part of the peak above)",
            highlight=False,
        )
    if p.attention:
        console.print(p.attention, markup=False, highlight=False)
    for note in p.notes:
        console.print(f"note: {note}", highlight=False)


def _plan_base(target: str, seq_len: Optional[int]):
    """The recipe a plan starts from: a recipe file, or fitune's defaults for a catalog model or a hub id
    (effective batch 8 as micro-batch 4 x accumulation 2); a hub id's config.json alone is fetched."""
    from fitune.models.catalog import get_model, model_names
    from fitune.planner.candidates import DEFAULT_EFFECTIVE_BATCH
    from fitune.recipe import Recipe

    path = Path(target)
    if path.is_file() or target.endswith((".yaml", ".yml")):
        r = _load(path)
        return (r.updated({"train.seq_len": seq_len}) if seq_len else r), False
    entry = get_model(target)
    hub_id = target.count("/") == 1 and not target.startswith((".", "/", "~")) and not path.exists()
    if entry is None and not hub_id:
        raise FituneError(
            f"{target!r} is neither a recipe file, a catalog model nor a hub id (owner/name); fix: give a recipe "
            f".yaml path, a hub id, or one of: {', '.join(model_names())} (`fitune models` lists them)"
        )
    train = {"batch_size": 4, "grad_accum": DEFAULT_EFFECTIVE_BATCH // 4}
    if seq_len:
        train["seq_len"] = seq_len
    return Recipe.from_dict({"model": {"source": entry.name if entry else target}, "train": train}), True


def _print_search(result, top: int, from_defaults: bool) -> None:
    from rich.table import Table

    from fitune.planner.candidates import describe
    from fitune.planner.report import change_text, twin_text

    t, base = result.target, result.base
    one = result.one_device
    if one is not None:
        console.print(
            f"[bold]nothing fits one {t.label}[/] ({len(one.candidates)} configurations searched); the least "
            "it would take:",
            highlight=False,
        )
        for s in one.suggestions:
            console.print(f"  - {s}", highlight=False, soft_wrap=True)
    each = " per GPU" if result.ranks > 1 else ""
    console.print(
        f"[bold]plan search[/] {base.model.source or 'inline config'} on {result.where}: usable "
        f"{human_bytes(result.usable_bytes)}{each} after a {result.margin:.0%} margin; seq_len "
        f"{result.seq_len}, effective batch {result.effective_batch}"
        + (f" per process ({result.effective_batch * result.ranks} per step)" if result.ranks > 1 else ""),
        highlight=False,
    )
    counts = result.counts()
    console.print(
        f"{len(result.candidates)} configurations: "
        + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items())
        + f"; {result.structures_traced} structure(s) traced ({result.fake_runs} fake runs) in "
        + f"{result.seconds:.1f} s",
        highlight=False,
    )
    if result.ranked:
        table = Table(
            title=f"fastest configurations that fit ({min(top, len(result.ranked))} of {len(result.ranked)})"
        )
        table.add_column("#", justify="right")
        table.add_column("configuration")
        table.add_column("peak GiB" + each, justify="right")
        table.add_column("free GiB", justify="right")
        table.add_column("tokens/s" + (" (all GPUs)" if result.ranks > 1 else ""), justify="right")
        table.add_column("changes from " + ("your recipe" if not from_defaults else "the defaults"))
        for i, c in enumerate(result.ranked[:top]):
            speed = f"{c.speed.tokens_per_s:,.0f}" if c.speed.tokens_per_s is not None else "-"
            twins = twin_text(c.twins)
            table.add_row(
                str(i + 1),
                describe(c.settings) + (f" ({twins})" if twins else ""),
                f"{c.peak_bytes / 2**30:,.2f}",
                f"{(t.memory_bytes - c.peak_bytes) / 2**30:,.2f}",
                speed,
                change_text(c, base),
            )
        console.print(table)
        best = result.ranked[0]
        largest = sorted(best.breakdown.items(), key=lambda kv: -kv[1])[:4]
        console.print(
            f"chosen: #1, peak {human_bytes(best.peak_bytes)} at the {best.peak_region} "
            f"({', '.join(f'{k} {v / 2**30:.2f}' for k, v in largest)} GiB)",
            highlight=False,
        )
    else:
        console.print("[bold red]nothing fits[/]; the least each method needs:")
        for kind in ("full", "lora", "qlora"):
            big = [
                c for c in result.candidates if c.status == "too_big" and c.settings["method.kind"] == kind
            ]
            if big:
                least = min(big, key=lambda c: c.peak_bytes)
                console.print(f"  {kind}: {least.reason}", markup=False, highlight=False, soft_wrap=True)
        console.print("what would fit:")
        for s in result.suggestions:
            console.print(f"  - {s}", highlight=False, soft_wrap=True)
    reasons: dict[str, int] = {}
    for c in result.candidates:
        if c.status in ("ruled_out", "pruned"):
            key = f"pruned: {c.reason}" if c.status == "pruned" else c.reason
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        console.print("ruled out:", highlight=False)
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
            console.print(f"  {n:>5} x {reason}", markup=False, highlight=False, soft_wrap=True)
    for line in (*result.notes, *result.assumptions):
        console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)


def _portable(recipe):
    """The recipe with its relative data and model paths made absolute, so it can be written elsewhere."""
    changes = {}
    if recipe.data is not None and recipe.data.path is not None and not Path(recipe.data.path).is_absolute():
        changes["data.path"] = str(recipe.resolve_path(recipe.data.path).resolve())
    src = recipe.model.source
    if src and not Path(src).is_absolute() and recipe.resolve_path(src).exists():
        changes["model.source"] = str(recipe.resolve_path(src).resolve())
    return recipe.updated(changes) if changes else recipe


@app.command()
def plan(
    recipe: str = typer.Argument(
        ...,
        help="Recipe YAML file, a catalog model name (see `fitune models`), or a hub id (owner/name: its "
        "config.json is fetched, no weights).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan (or the search) as JSON."),
    gpu: Optional[str] = typer.Option(
        None, help="Search the configurations that fit this catalog GPU (or cpu)."
    ),
    budget: Optional[float] = typer.Option(None, help="Search the configurations that fit this many GiB."),
    search: Optional[bool] = typer.Option(
        None,
        "--search/--no-search",
        help="Search configurations (default with --gpu, --budget or a model name); --no-search plans the "
        "recipe alone on --gpu.",
    ),
    margin: float = typer.Option(0.10, help="Share of the memory kept free for what the plan cannot see."),
    top: int = typer.Option(10, help="Rows of the ranked table."),
    method: Optional[list[str]] = typer.Option(None, help="Search only this method (repeat for several)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Plan this sequence length."),
    write: Optional[Path] = typer.Option(None, help="Write the chosen configuration as a recipe here."),
    report: Optional[Path] = typer.Option(None, help="Write an HTML report with memory charts here."),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        min=1,
        help="Plan the run sharded over this many processes (FSDP2, as `fitune train --nproc`): the figures "
        "are one process's (default: hardware.num_devices).",
    ),
) -> None:
    """Predict peak memory before loading a weight; with --gpu/--budget, find the fastest configuration
    that fits."""
    import time

    from fitune.libraries import prepare_libraries

    start = time.perf_counter()
    prepare_libraries()
    try:
        r, from_model = _plan_base(recipe, seq_len)
        if nproc is not None:
            r = r.updated({"hardware.num_devices": nproc})
        searching = search if search is not None else bool(gpu or budget is not None or from_model)
        if not searching:
            if gpu:
                r = r.updated({"hardware.device": gpu})
            from fitune.planner import plan as make_plan

            p = make_plan(r)
        else:
            _plan_search(r, gpu, budget, margin, top, method, as_json, write, report, start, from_model)
            return
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except FituneError as exc:
        _fail(exc)
    if as_json:
        data = p.to_dict()
        data["wall_seconds"] = time.perf_counter() - start
        print(json.dumps(data, indent=2))
        return
    _print_plan(p, r)
    console.print(f"wall time {time.perf_counter() - start:.1f} s (imports included)", highlight=False)


def _plan_search(r, gpu, budget, margin, top, methods, as_json, write, report, start, from_defaults) -> None:
    import time

    from fitune.planner import plan as make_plan
    from fitune.planner.candidates import METHODS, resolve_target
    from fitune.planner.report import html_report, search_json
    from fitune.planner.search import search as run_search

    target = resolve_target(r, gpu, budget)
    progress = None if as_json else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    result = run_search(
        r, target, margin=margin, top=top, methods=tuple(methods or METHODS), progress=progress
    )
    chosen_plan = None
    if result.ranked and (write or report):
        chosen = result.recipe_of(result.ranked[0])
        # flash-attn cannot be traced without CUDA; its memory is planned as sdpa's (see planner/anchors.py)
        chosen_plan = make_plan(chosen.updated({"train.attention": "sdpa"}))
    if write:
        if not result.ranked:
            raise FituneError(f"--write {write}: nothing fits, so there is no configuration to write")
        write.write_text(_portable(result.recipe_of(result.ranked[0])).to_yaml())
    if report:
        report.write_text(html_report(result, chosen_plan=chosen_plan, top=top), encoding="utf-8")
    if as_json:
        doc = search_json(result, chosen_plan=chosen_plan)
        doc["wall_seconds"] = time.perf_counter() - start
        print(json.dumps(doc, indent=2))
        return
    _print_search(result, top, from_defaults)
    if chosen_plan is not None:
        console.print(
            f"direct plan of the chosen configuration: peak {human_bytes(chosen_plan.peak_bytes)} "
            f"(search: {human_bytes(result.ranked[0].peak_bytes)})",
            highlight=False,
        )
    if write:
        console.print(f"wrote {write} (check it with `fitune validate {write}`)")
    if report:
        console.print(f"wrote {report}")
    console.print(f"wall time {time.perf_counter() - start:.1f} s (imports included)", highlight=False)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder (the recipe's output.dir)."),
    no_png: bool = typer.Option(False, "--no-png", help="Only the HTML page, no PNG charts."),
    serve: bool = typer.Option(False, "--serve", help="Serve the page live instead (as fitune ui does)."),
    host: str = typer.Option("127.0.0.1", help="With --serve: the address to listen on."),
    port: int = typer.Option(8765, help="With --serve: the port."),
) -> None:
    """Write the run's report: report.html (self-contained, opens offline), report/*.png, and the plan as a
    PyTorch memory snapshot."""
    if serve:
        _serve(run_dir.resolve().parent, host, port, open_run=run_dir.resolve().name, must_be_run=run_dir)
        return
    try:
        from fitune.report import make_report

        files = make_report(run_dir, pngs=not no_png)
    except FituneError as exc:
        _fail(exc)
    console.print(f"report: {files.page.resolve().as_uri()}", markup=False, highlight=False, soft_wrap=True)
    if files.pngs:
        names = ", ".join(p.name for p in files.pngs)
        console.print(f"charts: {files.pngs[0].parent}/ ({names})", markup=False, soft_wrap=True)
    if files.snapshot is not None:
        console.print(
            f"plan snapshot: {files.snapshot} (open it on pytorch.org/memory_viz)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def ui(
    runs: Path = typer.Argument(Path("runs"), help="The folder whose run folders are listed."),
    host: str = typer.Option(
        "127.0.0.1", help="The address to listen on (loopback unless you say otherwise)."
    ),
    port: int = typer.Option(8765, help="The port."),
    recipe: Optional[list[Path]] = typer.Option(
        None, help="A recipe whose plan gets a page (repeat for several)."
    ),
) -> None:
    """Serve the runs under a folder on this machine: the list, and each run's report, updated as it trains."""
    _serve(runs, host, port, recipes=recipe or [])


def _serve(
    root: Path,
    host: str,
    port: int,
    open_run: str | None = None,
    must_be_run: Path | None = None,
    recipes: list[Path] | None = None,
):
    from fitune.report.records import read_run
    from fitune.report.serve import serve

    def echo(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        if must_be_run is not None:
            read_run(must_be_run)  # a folder that is no run is refused before anything listens
        elif not root.is_dir():
            raise FituneError(
                f"{root}: no such folder; fix: give the folder your runs are in (runs/ by default)"
            )
        for path in recipes or []:
            _load(path)  # a recipe that does not load is refused before anything listens
        serve(root, host, port, echo, open_run, recipes=recipes)
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except FituneError as exc:
        _fail(exc)


@app.command()
def models() -> None:
    """List the architecture catalog: short name, Hugging Face id, parameters."""
    from rich.table import Table

    from fitune.errors import ModelSourceError
    from fitune.models.catalog import models as catalog_models

    table = Table(
        title="model catalog (architectures only: plan them by name, e.g. `fitune plan NAME --gpu t4`)"
    )
    table.add_column("name")
    table.add_column("hf id")
    table.add_column("params", justify="right")
    for m in catalog_models():
        try:
            params = f"{m.param_count() / 1e9:,.2f} B"
        except ModelSourceError:
            params = "-"
        table.add_row(m.name, m.hf_id, params)
    console.print(table)
    console.print(
        "Any Hugging Face hub id (owner/name) works too when the machine is online: `fitune plan owner/name "
        "--gpu t4` fetches its config.json alone."
    )


@app.command()
def measure(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Run the load, two real steps and the run's other phases (eval, samples, checkpoint, save), and print
    measured memory beside the plan, per phase."""
    from fitune.libraries import prepare_libraries

    prepare_libraries()
    try:
        r = _load(recipe)
        from fitune.memory.measure import measure as run_measure
        from fitune.planner import plan as make_plan

        predicted = make_plan(r.updated({"hardware.device": "cpu"}) if r.hardware.device == "cpu" else r)
        measured = run_measure(r)
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except FituneError as exc:
        _fail(exc)
    rows = {
        name: {
            "predicted": predicted.phases[name],
            "measured": measured.phases[name],
            "error": predicted.phases[name] / measured.phases[name] - 1 if measured.phases[name] else None,
        }
        for name in measured.phases
    }
    if as_json:
        print(
            json.dumps(
                {
                    "device": measured.device,
                    "phases": rows,
                    "peak": {"predicted": predicted.peak_bytes, "measured": measured.peak_bytes},
                },
                indent=2,
            )
        )
        return
    from rich.table import Table

    table = Table(title=f"predicted vs measured on {measured.device}")
    for col in ("phase", "predicted", "measured", "error"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for name, row in rows.items():
        err = f"{100 * row['error']:+.2f}%" if row["error"] is not None else "-"
        table.add_row(name, human_bytes(row["predicted"]), human_bytes(row["measured"]), err)
    err = predicted.peak_bytes / measured.peak_bytes - 1
    table.add_row(
        "peak", human_bytes(predicted.peak_bytes), human_bytes(measured.peak_bytes), f"{100 * err:+.2f}%"
    )
    console.print(table)


def _print_findings(findings) -> None:
    from rich.markup import escape

    if not any(f.severity != "note" for f in findings):
        console.print("[green]no problems found[/]")
    for f in findings:
        color = {"error": "red", "warning": "yellow"}.get(f.severity, "blue")
        console.print(f"[bold {color}]{f.severity}[/] {escape(f'[{f.rule_id}]')}", end=" ", highlight=False)
        console.print(f.message, markup=False, highlight=False, soft_wrap=True)
        if f.fix_text != "none needed":
            console.print(f"    fix: {f.fix_text}", markup=False, highlight=False)
        if f.fix:
            change = ", ".join(f"{k}: {v}" for k, v in f.fix.items())
            console.print(f"    recipe change: {change}", markup=False, highlight=False)
        console.print(f"    source: {' '.join(f.source)}", markup=False, highlight=False)


@app.command()
def doctor(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML file."),
    fix: bool = typer.Option(False, "--fix", help="Write a corrected recipe where the fix is unambiguous."),
    out: Optional[Path] = typer.Option(None, help="Where --fix writes (default: RECIPE.fixed.yaml)."),
    list_rules: bool = typer.Option(False, "--list", help="List every rule: id, severity, source."),
) -> None:
    """Check a recipe and this machine (or the catalog GPU it names) for known failures before launch."""
    from fitune.preflight import apply_fixes
    from fitune.preflight import doctor as run_doctor
    from fitune.preflight import list_rules as all_rules

    if list_rules:
        rules = all_rules()
        console.print(f"{len(rules)} rules ({sum(r.severity == 'error' for r in rules)} errors)")
        for r in rules:
            console.print(
                f"{r.id}  {r.severity}  {' '.join(r.source)}", markup=False, highlight=False, soft_wrap=True
            )
            console.print(f"    {r.title}", markup=False, highlight=False)
        return
    if recipe is None:
        _fail(FituneError("give a recipe file (or --list)"), EXIT_ERROR)
    try:
        r = _load(recipe)
        from fitune.preflight import environment_for
        from fitune.preflight.run import resolved_source
        from fitune.techniques.attention import plan_line

        env = environment_for(r)
        source, _ = resolved_source(r)
        findings = run_doctor(r, env=env, source=source)
        attention = plan_line(r, source.config, env) if source is not None else None
    except RecipeError as exc:
        _fail(exc, EXIT_INVALID_RECIPE)
    except FituneError as exc:
        _fail(exc)
    if attention:
        console.print(attention, markup=False, highlight=False)
    _print_findings(findings)
    errors = [f for f in findings if f.severity == "error"]
    if fix:
        fixed, diff = apply_fixes(r, findings)
        target = out or recipe.with_name(recipe.stem + ".fixed.yaml")
        if not diff:
            console.print("nothing to fix automatically")
        else:
            console.print("\n".join(line.rstrip("\n") for line in diff), markup=False, highlight=False)
            target.write_text(fixed.to_yaml())
            console.print(f"wrote {target}")
            remaining = [f for f in run_doctor(fixed) if f.severity == "error"]
            console.print(f"{len(remaining)} error(s) remain in the corrected recipe")
        return
    if errors:
        raise typer.Exit(EXIT_DOCTOR)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
