"""fitune's own listeners of a run: the metrics file, the progress bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fitune.trainer.events import (
    EvalDone,
    Listener,
    RunEnded,
    RunStarted,
    SamplesDone,
    StepDone,
    perplexity,
)
from fitune.trainer.runfolder import write_atomic

METRICS = "metrics.jsonl"  # one row a step
EVALS = "evals.jsonl"  # one row an eval pass: before training, every train.eval_every steps, after
SAMPLES = "samples.jsonl"  # one row a prompt's answer, before and after training


class MetricsFile(Listener):
    """``metrics.jsonl`` (a row a step), ``evals.jsonl`` (a row an eval pass) and ``samples.jsonl`` (a row a
    prompt's answer, before and after training), flushed as written, so a
    crash loses at most the step it struck in. A resumed run first drops the rows written after its
    checkpoint, then writes them again."""

    def __init__(self):
        self.steps = self.evals = self.samples = None
        self.first_step = self.total_steps = 0

    def run_started(self, event: RunStarted) -> None:
        paths = event.out / METRICS, event.out / EVALS, event.out / SAMPLES
        if event.resumed:
            for path in paths:
                _keep_rows_up_to(path, event.first_step - 1)
        self.steps, self.evals, self.samples = (open(path, "a", encoding="utf-8") for path in paths)
        self.first_step, self.total_steps = event.first_step, event.total_steps

    def samples_done(self, event: SamplesDone) -> None:
        step = self.first_step - 1 if event.when == "before" else self.total_steps
        for prompt, answer in zip(event.prompts, event.answers, strict=True):
            _append(self.samples, {"step": step, "when": event.when, "prompt": prompt, "answer": answer})

    def step_done(self, event: StepDone) -> None:
        row = {
            "step": event.step,
            "loss": round(event.loss, 6),
            "lr": event.lr,
            "grad_norm": _rounded(event.grad_norm),
            "tokens": event.tokens,
            "step_s": round(event.seconds, 4),
            "tokens_per_s": round(event.tokens_per_second, 2),
            "memory_bytes": event.memory_bytes,
        }
        if event.allocated_bytes is not None:
            row["allocated_bytes"] = event.allocated_bytes
            row["reserved_bytes"] = event.reserved_bytes
        if event.eval_loss is not None:
            row["eval_loss"] = event.eval_loss
            row["eval_perplexity"] = _rounded(perplexity(event.eval_loss))
        _append(self.steps, row)

    def eval_done(self, event: EvalDone) -> None:
        row = {
            "step": event.step,
            "when": event.when,
            "loss": event.loss,
            "perplexity": _rounded(event.perplexity),
        }
        _append(self.evals, row)

    def run_ended(self, event: RunEnded) -> None:
        for file in (self.steps, self.evals, self.samples):
            if file is not None:
                file.close()
        self.steps = self.evals = self.samples = None


def _rounded(x: float | None) -> float | None:
    """Six significant digits for the file; JSON has no inf or nan, so those are written as null."""
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


def _append(file, row: dict) -> None:
    file.write(json.dumps(row) + "\n")
    file.flush()


def _keep_rows_up_to(path: Path, last_step: int) -> None:
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


class LogLines(Listener):
    """What a run says in words: its start, evals before and after, and, without a progress bar, a line
    every ``train.log_every`` steps."""

    def __init__(self, echo, with_steps: bool):
        self.echo = echo
        self.with_steps = with_steps
        self.log_every = 1

    def run_started(self, event: RunStarted) -> None:
        from fitune.version import __version__

        self.log_every = event.recipe.train.log_every
        self.echo(
            f"fitune {__version__}: {event.model}, {event.recipe.method.kind}, {event.n_train} train / "
            f"{event.n_eval} eval examples ({event.data_format}), {event.total_steps} steps on {event.device}"
        )
        for note in event.notes:
            self.echo(f"  {note}")
        if event.resumed:
            self.echo(f"  resuming after step {event.first_step - 1}")

    def eval_done(self, event: EvalDone) -> None:
        if event.when == "resumed":
            self.echo(f"  eval loss at step {event.step}, resumed: {event.loss:.4f}")
        elif event.when != "during":
            self.echo(f"  eval loss {event.when} training: {event.loss:.4f}")

    def step_done(self, event: StepDone) -> None:
        if self.with_steps and event.step % self.log_every == 0:
            rate = event.average_tokens_per_second
            self.echo(f"  step {event.step}/{event.total_steps} loss {event.loss:.4f} {rate:,.0f} tok/s")


class ProgressBar(Listener):
    """A rich progress bar over the steps, on a terminal only (``enabled`` says whether one is shown)."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.enabled = enabled and Console().is_terminal  # logs and pipes get plain lines instead
        self.bar = None
        self.task = None

    def run_started(self, event: RunStarted) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("training", total=event.total_steps, completed=event.first_step - 1)
        self.bar.start()

    def step_done(self, event: StepDone) -> None:
        if self.bar is None:
            return
        rate = event.average_tokens_per_second
        self.bar.update(
            self.task,
            advance=1,
            description=f"loss {event.loss:.4f} | {rate:,.0f} tok/s | {event.memory_bytes / 2**30:.2f} GiB",
        )
        if event.step == event.total_steps:
            self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def run_ended(self, event: RunEnded) -> None:
        self.stop()
