"""Trackers: the run's figures sent to TensorBoard, MLflow, Weights & Biases or Trackio (``train.report_to``).

Each is a listener of the run (``fitune/trainer/events.py``) writing through the library's own writer, locally:

- tensorboard: event files in ``RUN/tensorboard/`` (``tensorboard --logdir runs`` shows every run).
- mlflow: ``$MLFLOW_TRACKING_URI`` where set, else a SQLite store beside the run folders
  (``runs/mlflow.db``); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``fitune``.
- wandb: offline files in ``RUN/wandb/`` (``wandb sync`` uploads them); ``WANDB_MODE=online`` sends them live.
- trackio: its local store (``$TRACKIO_DIR``, else its default); ``trackio show`` opens it.

Every tracker gets the same names: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
``train/step_s``, ``memory/gib`` (and ``memory/allocated_gib``, ``memory/reserved_gib`` on CUDA),
``eval/loss``, ``eval/perplexity``; the recipe as its configuration; the plan's peak and the run's status in
its summary. A resumed run continues the tracker's run where the library allows it (TensorBoard drops the
steps after the checkpoint; MLflow and W&B reuse the run id kept in ``RUN/trackers.json``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
from pathlib import Path

from fitune.errors import FituneError
from fitune.trainer.events import EvalDone, Listener, RunEnded, RunStarted, SamplesDone, StepDone
from fitune.trainer.runfolder import write_atomic

# tracker -> (module that must import, the extra that installs it)
NEEDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
}
IDS = "trackers.json"  # tracker -> its run id, for a resumed run
GIB = 2**30


def trackers_for(names: list[str]) -> list[Listener]:
    """The listeners for ``train.report_to``, each library checked for before anything is written."""
    missing = [n for n in names if importlib.util.find_spec(NEEDS[n][0]) is None]
    if missing:
        extras = ",".join(NEEDS[n][1] for n in missing)
        raise FituneError(
            f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; fix: "
            f'pip install "fitune[{extras}]", or remove {" and ".join(missing)} from train.report_to'
        )
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}
    return [kinds[n]() for n in names]


def where(name: str, out: Path) -> str:
    """Where a tracker writes, and how to look, in words for the run's start."""
    if name == "tensorboard":
        return f"tensorboard: {out / 'tensorboard'} (view: tensorboard --logdir {out.parent})"
    if name == "mlflow":
        uri = _mlflow_uri(out)
        return f"mlflow: {uri} (view: mlflow ui --backend-store-uri {uri})"
    if name == "wandb":
        mode = _wandb_mode()
        return f"wandb ({mode}): {out / 'wandb'}" + (" (upload: wandb sync)" if mode == "offline" else "")
    project = _trackio_project()
    return f"trackio: project {project} (view: trackio show --project {project})"


# where each tracker writes: said at start by ``where``, used by the tracker itself
def _mlflow_uri(out: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else fitune's own SQLite store beside the run folders."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out.resolve().parent / 'mlflow.db'}"


def _wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or "offline"


def _trackio_project() -> str:
    return os.environ.get("TRACKIO_PROJECT") or "fitune"


def step_figures(event: StepDone) -> dict[str, float]:
    """A step's figures under the names every tracker uses (non-finite ones left out)."""
    figures = {
        "train/loss": event.loss,
        "train/lr": event.lr,
        "train/grad_norm": event.grad_norm,
        "train/tokens_per_s": event.tokens_per_second,
        "train/step_s": event.seconds,
        "memory/gib": event.memory_bytes / GIB,
    }
    if event.allocated_bytes is not None:
        figures["memory/allocated_gib"] = event.allocated_bytes / GIB
        figures["memory/reserved_gib"] = event.reserved_bytes / GIB
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)}


def eval_figures(event: EvalDone) -> dict[str, float]:
    figures = {"eval/loss": event.loss, "eval/perplexity": event.perplexity}
    return {k: float(v) for k, v in figures.items() if math.isfinite(v)}


def summary(event: RunStarted) -> dict[str, float | str]:
    """What a tracker keeps beside the curves at start: the plan's peak, and where it falls."""
    plan = event.plan
    if plan is None:
        return {}
    return {
        "plan/peak_gib": plan["peak_bytes"] / GIB,
        "plan/peak_phase": plan["peak_phase"],
        "plan/device": plan.get("gpu") or plan["device"],
    }


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe as ``section.key -> value`` strings (for stores of flat parameters)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _saved_id(out: Path, tracker: str) -> str | None:
    try:
        return json.loads((out / IDS).read_text(encoding="utf-8")).get(tracker)
    except (OSError, ValueError, AttributeError):
        return None


def _save_id(out: Path, tracker: str, run_id: str) -> None:
    try:
        ids = json.loads((out / IDS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    write_atomic(out / IDS, json.dumps({**ids, tracker: run_id}, indent=1))


def _recipe(event: RunStarted) -> dict:
    return event.recipe.model_dump(mode="json")


class TensorBoard(Listener):
    def __init__(self):
        self.writer = None

    def run_started(self, event: RunStarted) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run: the events after its checkpoint's step are dropped, then written again
        purge = event.first_step if event.resumed else None
        self.writer = SummaryWriter(log_dir=str(event.out / "tensorboard"), purge_step=purge)
        if not event.resumed:
            self.writer.add_text("recipe", _code_block(event.recipe.to_yaml()), 0)
            for key, value in summary(event).items():
                if isinstance(value, float):
                    self.writer.add_scalar(key, value, 0)
                else:
                    self.writer.add_text(key, value, 0)

    def step_done(self, event: StepDone) -> None:
        for key, value in step_figures(event).items():
            self.writer.add_scalar(key, value, event.step)

    def eval_done(self, event: EvalDone) -> None:
        for key, value in eval_figures(event).items():
            self.writer.add_scalar(key, value, event.step)

    def samples_done(self, event: SamplesDone) -> None:
        text = "\n\n".join(
            f"**{p}**\n\n{_code_block(a)}" for p, a in zip(event.prompts, event.answers, strict=True)
        )
        self.writer.add_text(f"samples/{event.when}", text, 0)

    def run_ended(self, event: RunEnded) -> None:
        if self.writer is None:
            return
        self.writer.add_text("status", f"{event.status} ({event.phase})" + _error(event), 0)
        self.writer.close()
        self.writer = None


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown: kept as typed


def _error(event: RunEnded) -> str:
    return f": {event.error}" if event.error else ""


class MLflow(Listener):
    """Through ``MlflowClient`` with an explicit store: no process-wide active run is left behind."""

    def __init__(self):
        self.client = self.run_id = None

    def run_started(self, event: RunStarted) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        # MLflow logs its table creation at INFO on every run
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        given = os.environ.get("MLFLOW_TRACKING_URI")  # a store of the user's keeps its own artifact root
        self.client = MlflowClient(tracking_uri=_mlflow_uri(event.out))
        self.run_id = _saved_id(event.out, "mlflow") if event.resumed else None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fitune"
            found = self.client.get_experiment_by_name(name)
            # fitune's own store keeps its artifacts beside it (MLflow's default is ./mlruns, wherever one stands)
            where = None if given else (event.out.resolve().parent / "mlruns").as_uri()
            experiment = found.experiment_id if found else self.client.create_experiment(name, where)
            run = self.client.create_run(
                experiment, run_name=event.out.name, tags={"fitune.dir": str(event.out)}
            )
            self.run_id = run.info.run_id
            _save_id(event.out, "mlflow", self.run_id)
            params = {k: v[:6000] for k, v in flat(_recipe(event)).items()}  # MLflow's longest parameter
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
            for key, value in summary(event).items():
                self.client.set_tag(self.run_id, key, str(value))
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _metrics(self, figures: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def step_done(self, event: StepDone) -> None:
        self._metrics(step_figures(event), event.step)

    def eval_done(self, event: EvalDone) -> None:
        self._metrics(eval_figures(event), event.step)

    def samples_done(self, event: SamplesDone) -> None:
        rows = [{"prompt": p, "answer": a} for p, a in zip(event.prompts, event.answers, strict=True)]
        self.client.log_text(self.run_id, json.dumps(rows, indent=1), f"samples_{event.when}.json")

    def run_ended(self, event: RunEnded) -> None:
        if self.run_id is None:
            return
        self.client.set_tag(self.run_id, "fitune.status", event.status)
        self.client.set_tag(self.run_id, "fitune.phase", event.phase)
        if event.error:
            self.client.set_tag(self.run_id, "fitune.error", event.error[:5000])
        status = {"done": "FINISHED", "interrupted": "KILLED"}.get(event.status, "FAILED")
        self.client.set_terminated(self.run_id, status=status)
        self.run_id = None


class WandB(Listener):
    def __init__(self):
        self.run = None

    def run_started(self, event: RunStarted) -> None:
        import wandb

        run_id = _saved_id(event.out, "wandb") if event.resumed else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "fitune",
            name=event.out.name,
            dir=str(event.out),
            mode=_wandb_mode(),
            config=_recipe(event),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        _save_id(event.out, "wandb", self.run.id)
        for key, value in summary(event).items():
            self.run.summary[key] = value

    def step_done(self, event: StepDone) -> None:
        self.run.log(step_figures(event), step=event.step)

    def eval_done(self, event: EvalDone) -> None:
        self.run.log(eval_figures(event), step=event.step)

    def samples_done(self, event: SamplesDone) -> None:
        import wandb

        table = wandb.Table(
            columns=["prompt", "answer"], data=list(zip(event.prompts, event.answers, strict=True))
        )
        self.run.summary[f"samples/{event.when}"] = table

    def run_ended(self, event: RunEnded) -> None:
        if self.run is None:
            return
        self.run.summary["status"] = event.status
        self.run.summary["phase"] = event.phase
        if event.error:
            self.run.summary["error"] = event.error
        self.run.finish(exit_code=0 if event.status == "done" else 1)
        self.run = None


class Trackio(Listener):
    """Trackio prints how to open its dashboard; fitune says it once at start instead (``where``)."""

    def __init__(self):
        self.run = None

    def run_started(self, event: RunStarted) -> None:
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            self.run = trackio.init(
                project=_trackio_project(),
                name=event.out.name,
                config={**_recipe(event), **summary(event)},
                resume="allow" if event.resumed else "never",
                embed=False,
                auto_log_cpu=False,  # fitune logs the run's memory itself
                auto_log_gpu=False,
            )

    def step_done(self, event: StepDone) -> None:
        self.run.log(step_figures(event), step=event.step)

    def eval_done(self, event: EvalDone) -> None:
        self.run.log(eval_figures(event), step=event.step)

    def run_ended(self, event: RunEnded) -> None:
        if self.run is None:
            return
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            trackio.finish()  # the current run, which init made ours; clearing it leaves trackio nothing at exit
        self.run = None
