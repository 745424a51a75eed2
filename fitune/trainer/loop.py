"""The training loop: data, steps with gradient accumulation, eval, metrics, progress, saving.

Every optimizer step goes through ``fitune.step.train_step``, the same function planning simulates.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fitune import __version__
from fitune.data.batching import MicroBatches, batches_per_epoch
from fitune.data.dataset import TokenizedData, data_files, load_dataset
from fitune.data.scan import byte_progress, length_advice
from fitune.errors import FituneError, RunInterrupted
from fitune.recipe import Recipe
from fitune.session import Session, build_session
from fitune.step import train_step
from fitune.trainer.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fitune.trainer.oom import OutOfMemory, is_out_of_memory
from fitune.trainer.phases import eval_batches, evaluate, generate, oom_guard, save_result
from fitune.trainer.runfolder import RunMarker, prepare_run_folder, write_atomic


@dataclass
class TrainResult:
    losses: list[float]
    eval_losses: dict[int, float]  # step -> eval loss (step 0 = before training)
    tokens_per_second: float
    output_dir: Path
    steps: int
    samples_before: list[str] = field(default_factory=list)
    samples_after: list[str] = field(default_factory=list)
    truncated_examples: int = 0


def tokens_per_second(tokens: int, seconds: float) -> float:
    """The one throughput formula: non-padding tokens processed per wall-clock second."""
    return tokens / seconds if seconds > 0 else 0.0


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def total_steps(recipe: Recipe, n_train: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = math.ceil(batches_per_epoch(n_train, t.batch_size) / t.grad_accum)
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def _eval(session: Session, data: TokenizedData, pad_id: int, step: int) -> float | None:
    """Eval loss over the eval split in micro-batches of ``train.batch_size``; None without an eval split."""
    return evaluate(session, eval_batches(data.eval, session.recipe.train.batch_size, pad_id), step)


def train(
    recipe: Recipe,
    max_steps: int | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    echo=print,
) -> TrainResult:
    """Train ``recipe`` to completion (or ``max_steps``) and save the result in ``recipe.output.dir``.

    ``fitune-run.json`` in the folder tells the run's state at every moment (``fitune/trainer/runfolder.py``).
    Ctrl-C or SIGTERM during the steps stops after the current step, writes a checkpoint and raises
    ``RunInterrupted``; elsewhere, or a second signal, stops at once.
    """
    if recipe.data is None:
        raise FituneError(
            "data: the recipe has no data section; fix: add data.path (a JSONL file) or data.hub (a Hub dataset) to train"
        )
    out = prepare_run_folder(recipe, overwrite, resume)
    run = RunMarker(out, resumed=resume)
    if not resume:
        write_atomic(out / "recipe.resolved.yaml", recipe.to_yaml())
    with _Signals(echo) as signals:
        try:
            return _run(recipe, out, run, signals, max_steps, resume, progress, echo)
        except OutOfMemory as exc:
            run.write("out_of_memory", phase=exc.report.phase, error=_message(exc), **_last_checkpoint(out))
            raise
        except RunInterrupted as exc:
            exc.phase = exc.phase or run.phase
            run.write("interrupted", phase=exc.phase, signal=exc.signal_name, **_last_checkpoint(out))
            raise exc.described(out) from None
        except KeyboardInterrupt:  # raised by code other than fitune's handler (a notebook, a debugger)
            run.write("interrupted", phase=run.phase, signal="SIGINT", **_last_checkpoint(out))
            raise RunInterrupted("SIGINT", run.phase).described(out) from None
        except BaseException as exc:
            oom = is_out_of_memory(exc) or is_out_of_memory(exc.__cause__)
            status = "out_of_memory" if oom else "failed"
            run.write(status, phase=run.phase, error=_message(exc), **_last_checkpoint(out))
            raise


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def _last_checkpoint(out: Path) -> dict:
    found = find_checkpoint(out)
    return {"checkpoint_step": found[1] if found else None}


class _Signals:
    """SIGINT and SIGTERM while training: inside the steps, stop after the current one (``pending``);
    elsewhere, or at a second signal, at once. Installed from the main thread only (Python's rule)."""

    def __init__(self, echo):
        self.echo = echo
        self.pending: str | None = None
        self.deferring = False
        self.previous: dict = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.pending is None:
            self.pending = name
            self.echo(f"  {name}: stopping after this step with a checkpoint (send it again to stop at once)")
            return
        raise RunInterrupted(name, "")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the rows a stopped run wrote after its checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a crash
    write_atomic(path, "".join(kept))


def _run(recipe, out, run, signals, max_steps, resume, progress, echo) -> TrainResult:
    torch.manual_seed(recipe.train.seed)
    from fitune.models import sources
    from fitune.models.tokenizers import load_tokenizer

    run.phase = "model"  # resolving the source, which downloads a hub id's weights
    source = sources.resolve(recipe)
    run.phase = "data"
    if source.commit is not None:  # which weights a hub id meant, for the record
        run.base["model"] = {
            "hub_id": recipe.model.source,
            "revision": recipe.model.revision,
            "commit": source.commit,
        }
        run.write("running")
    files = data_files(recipe, show_progress=progress)  # a hub dataset: from the cache the preflight filled
    if files.hub is not None:  # which data a hub id meant, for the record
        run.base["data"] = files.hub.record()
        run.write("running")
    tokenizer = load_tokenizer(source, source.config)
    with byte_progress(files, "tokenizing", progress) as read:
        data = load_dataset(recipe, tokenizer, read, files)
    steps = max_steps or total_steps(recipe, len(data.train))
    run.phase = "load"
    try:
        session = build_session(recipe, total_steps=steps, source=source, with_tokenizer=False)
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise FituneError(
                f"out of memory while loading the model: {str(exc).splitlines()[0][:200]}; fix: run "
                "`fitune plan` on the recipe to see the load peak, and try method.kind: qlora or a smaller model"
            ) from exc
        raise
    session.tokenizer = tokenizer
    first_step, restore_rng = load_checkpoint(session, out) if resume else (0, lambda: None)
    first_step += 1
    if resume:
        _truncate_metrics(out / "metrics.jsonl", first_step - 1)
    pad_id = tokenizer.pad_token_id
    echo(
        f"fitune {__version__}: {source.description}, {recipe.method.kind}, {len(data.train)} train / "
        f"{len(data.eval)} eval examples ({data.format}), {steps} steps on {session.device}"
    )
    for note in session.notes:
        echo(f"  {note}")
    advice = length_advice(data.lengths) if data.lengths is not None else None
    if advice is not None:
        _, message, fix = advice
        echo(f"  {message}" + ("" if fix == "none needed" else f"; fix: {fix}"))
    for line in data.skipped_lines:
        echo(f"  skipped {line}")

    prompts = recipe.samples.prompts
    run.phase = "samples"
    samples_before = generate(session, prompts, recipe.samples.max_new_tokens) if prompts else []

    eval_losses: dict[int, float] = {}
    run.phase = "eval"
    first = _eval(session, data, pad_id, 0)
    if first is not None:
        eval_losses[0] = first
        echo(f"  eval loss before training: {first:.4f}")

    it = iter(MicroBatches(data.train, recipe.train.batch_size, pad_id, recipe.train.seed))
    for _ in range((first_step - 1) * recipe.train.grad_accum):  # the data a resumed run already saw
        next(it)
    if resume:
        echo(f"  resuming after step {first_step - 1}")
    losses: list[float] = []
    tokens = 0
    seconds = 0.0
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8")
    bar = _progress(progress)
    task = bar.add_task("training", total=steps, completed=first_step - 1) if bar else None
    try:
        if bar:
            bar.start()
        signals.deferring = True  # a signal now stops the run after the step it arrives in
        restore_rng()  # a resumed run draws on from where the checkpointed one stood
        for step in range(first_step, steps + 1):
            group = [next(it) for _ in range(recipe.train.grad_accum)]
            n_tok = sum(b.num_tokens for b in group)
            t0 = time.perf_counter()
            run.phase = step_phase = "first_step" if step == first_step else "steady_step"
            with oom_guard(session, run.phase, step):
                loss = float(train_step(session, group))
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FituneError(
                    f"step {step}: the loss became {loss}; fix: lower train.lr (now {recipe.train.lr}) or use "
                    "bf16/fp32 precision instead of fp16"
                )
            tokens += n_tok
            seconds += dt
            losses.append(loss)
            row = {
                "step": step,
                "loss": round(loss, 6),
                "lr": session.scheduler.get_last_lr()[0],
                "tokens": n_tok,
                "tokens_per_s": round(tokens_per_second(n_tok, dt), 2),
                "memory_bytes": memory_in_use(session.device),
            }
            if recipe.train.eval_every and step % recipe.train.eval_every == 0 and step != steps:
                run.phase = "eval"
                ev = _eval(session, data, pad_id, step)
                if ev is not None:
                    eval_losses[step] = row["eval_loss"] = ev
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            # one look per step: a signal arriving after it stops the run after the next step
            stop = signals.pending if step != steps else None
            every = recipe.output.save_every
            if (every and step % every == 0 or stop) and step != steps:
                run.phase = "checkpoint"
                with oom_guard(session, "checkpoint", step):
                    save_checkpoint(session, out, step)
            if bar:
                bar.update(
                    task,
                    advance=1,
                    description=f"loss {loss:.4f} | {tokens_per_second(tokens, seconds):,.0f} tok/s | "
                    f"{row['memory_bytes'] / 2**30:.2f} GiB",
                )
            elif step % recipe.train.log_every == 0:
                echo(f"  step {step}/{steps} loss {loss:.4f} {tokens_per_second(tokens, seconds):,.0f} tok/s")
            if stop:
                raise RunInterrupted(stop, step_phase, step)
    finally:
        signals.deferring = False
        if bar:
            bar.stop()
        metrics.close()

    run.phase = "eval"
    last = _eval(session, data, pad_id, steps)
    if last is not None:
        eval_losses[steps] = last
        echo(f"  eval loss after training: {last:.4f}")
    run.phase = "samples"
    samples_after = generate(session, prompts, recipe.samples.max_new_tokens) if prompts else []
    run.phase = "save"
    saved = save_result(session, out)
    result = TrainResult(
        losses=losses,
        eval_losses=eval_losses,
        tokens_per_second=tokens_per_second(tokens, seconds),
        output_dir=out,
        steps=steps,
        samples_before=samples_before,
        samples_after=samples_after,
        truncated_examples=data.truncated,
    )
    run.write(
        "done",
        steps=steps,
        final_loss=losses[-1] if losses else None,
        eval_losses=eval_losses,
        tokens_per_second=result.tokens_per_second,
        saved=str(saved.relative_to(out)),
        truncated_examples=data.truncated,
    )
    return result


def _progress(enabled: bool):
    from rich.console import Console

    if not enabled or not Console().is_terminal:  # logs and pipes get plain lines instead
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
