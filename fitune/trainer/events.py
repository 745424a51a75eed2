"""The events of a run, and the listeners that hang off them.

The run (``fitune/trainer/run.py``) is one sequence; everything beside it that records or shows the run (the
metrics file, the progress bar or log lines, trackers, the report's records, a user's own code) is a
``Listener``: an object with any of the methods below, each taking one event. Events in a run's order:

- ``run_started``: model, data and session are ready; the recipe, the step count and where the run stands.
- ``samples_done``: greedy answers to the recipe's prompts, before and after training.
- ``eval_done``: an eval pass (before training, every ``train.eval_every`` steps, after training).
- ``step_done``: an optimizer step with its figures (and the eval loss when an eval came at that step).
- ``checkpoint_written``: a checkpoint is complete on disk.
- ``run_ended``: always, once: the status (done, failed, interrupted, out_of_memory), the phase and the
  error; a run that fails before its session is built sends this event alone.

A listener that raises fails the run (status ``failed``), except in ``run_ended``, where every listener is
called and a failing one is reported without hiding the run's own outcome. Listeners observe: what a run does
on the device (steps, eval, checkpoints) stays in the sequence, where the planner traces the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fitune.recipe import Recipe

EVENTS = ("run_started", "samples_done", "eval_done", "step_done", "checkpoint_written", "run_ended")


@dataclass(frozen=True)
class RunStarted:
    recipe: Recipe
    out: Path
    total_steps: int
    first_step: int  # 1, or the step after the checkpoint a resumed run continues from
    model: str  # the resolved source, in words
    device: str
    n_train: int
    n_eval: int
    data_format: str
    notes: list[str] = field(default_factory=list)  # what the run wants said before it trains
    plan: dict | None = None  # plan.json's content: the plan of the run (fitune.planner.plan.Plan fields)

    @property
    def resumed(self) -> bool:
        return self.first_step > 1


@dataclass(frozen=True)
class SamplesDone:
    when: str  # "before" | "after" training
    prompts: list[str]
    answers: list[str]


@dataclass(frozen=True)
class EvalDone:
    step: int  # 0 before training; a resumed run's first eval is at its checkpoint's step
    loss: float
    when: str  # "before" | "resumed" (before a resumed run's steps) | "during" | "after" training

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int  # non-padding tokens of the step's micro-batches
    seconds: float  # wall time of the step
    memory_bytes: int  # CUDA: the allocator's peak so far; CPU: the process's resident memory
    average_tokens_per_second: float  # over this process's steps so far (a resumed run: since it resumed)
    grad_norm: float | None = None  # total gradient norm before clipping
    allocated_bytes: int | None = None  # CUDA: allocated after the step (None on CPU)
    reserved_bytes: int | None = None  # CUDA: reserved by the caching allocator after the step
    eval_loss: float | None = None  # an eval pass that came at this step

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.tokens, self.seconds)


@dataclass(frozen=True)
class CheckpointWritten:
    step: int
    path: Path


@dataclass
class TrainResult:
    """What ``fitune.train`` returns: the run's figures and where it saved them."""

    losses: list[float]
    eval_losses: dict[int, float]  # step -> eval loss (step 0 = before training)
    tokens_per_second: float
    output_dir: Path
    steps: int
    samples_before: list[str] = field(default_factory=list)
    samples_after: list[str] = field(default_factory=list)
    truncated_examples: int = 0


@dataclass(frozen=True)
class RunEnded:
    status: str  # done | failed | interrupted | out_of_memory
    phase: str  # the phase the run ended in ("done" when it finished)
    out: Path
    error: str | None = None
    checkpoint_step: int | None = None
    result: TrainResult | None = None


def perplexity(loss: float) -> float:
    """exp(mean token loss); inf where it overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def tokens_per_second(tokens: int, seconds: float) -> float:
    """The one throughput formula: non-padding tokens processed per wall-clock second."""
    return tokens / seconds if seconds > 0 else 0.0


class Listener:
    """A base with every event as a no-op; subclass it and override the events you need (or pass any object
    with some of these methods)."""

    def run_started(self, event: RunStarted) -> None: ...
    def samples_done(self, event: SamplesDone) -> None: ...
    def eval_done(self, event: EvalDone) -> None: ...
    def step_done(self, event: StepDone) -> None: ...
    def checkpoint_written(self, event: CheckpointWritten) -> None: ...
    def run_ended(self, event: RunEnded) -> None: ...


class Listeners:
    """Sends each event to every listener that has a method of its name, in order."""

    def __init__(self, listeners: list[Any], echo):
        for listener in listeners:
            if not any(callable(getattr(listener, name, None)) for name in EVENTS):
                raise TypeError(
                    f"callbacks: {listener!r} has none of the event methods ({', '.join(EVENTS)}); fix: "
                    "subclass fitune.Listener and override the events you need"
                )
        self.listeners = list(listeners)
        self.echo = echo

    def send(self, name: str, event) -> None:
        assert name in EVENTS, name
        for listener in self.listeners:
            method = getattr(listener, name, None)
            if method is not None:
                method(event)

    def end(self, event: RunEnded) -> None:
        """``run_ended`` to every listener even when one raises; a failure is said, not raised."""
        for listener in self.listeners:
            method = getattr(listener, "run_ended", None)
            if method is None:
                continue
            try:
                method(event)
            except Exception as exc:  # the run's own outcome is what the caller must see
                self.echo(f"  warning: {type(listener).__name__}.run_ended failed: {exc}")
