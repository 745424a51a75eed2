"""A training run, top to bottom: prepare the folder, resolve model and data, build the session, evaluate and
sample, step, evaluate and sample again, save, finish with a status.

Every optimizer step goes through ``fitune.step.train_step``, the same function planning simulates; eval,
samples, checkpoints and the final save go through ``fitune.phases``, which the planner traces too.
What records or shows the run listens to its events (``fitune/trainer/events.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from fitune.data.batching import MicroBatches, batches_per_epoch
from fitune.data.dataset import TokenizedData, data_files, load_dataset
from fitune.data.scan import byte_progress, length_advice
from fitune.distributed.world import any_rank, broadcast_from_main, launched
from fitune.distributed.world import current as world_current
from fitune.distributed.world import finish as world_finish
from fitune.distributed.world import start as world_start
from fitune.errors import FituneError, OtherRankFailed, RunInterrupted
from fitune.phases import eval_batches, evaluate, evaluate_share, generate, save_result
from fitune.recipe import Recipe
from fitune.session import Session, build_session, resolve_device
from fitune.step import train_step
from fitune.trainer.checkpoint import find_checkpoint, load_checkpoint, micro_batches_seen, save_checkpoint
from fitune.trainer.events import (
    CheckpointWritten,
    EvalDone,
    Listeners,
    RunEnded,
    RunStarted,
    SamplesDone,
    StepDone,
    TrainResult,
    tokens_per_second,
)
from fitune.trainer.listeners import LogLines, MetricsFile, ProgressBar
from fitune.trainer.oom import OutOfMemory, is_out_of_memory, oom_guard
from fitune.trainer.runfolder import PLAN, RECIPE, RunMarker, prepare_run_folder, resolve_dir, write_atomic
from fitune.trainer.sharded_checkpoint import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint
from fitune.trainer.signals import Signals
from fitune.trainer.trackers import trackers_for, where
from fitune.version import __version__


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def total_steps(recipe: Recipe, n_train: int, ranks: int = 1) -> int:
    """Optimizer steps of the run; a step takes ``train.grad_accum`` micro-batches on each of ``ranks``."""
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = math.ceil(batches_per_epoch(n_train, t.batch_size) / (t.grad_accum * ranks))
    return max(1, math.ceil(per_epoch * (t.epochs or 1.0)))


def train(
    recipe: Recipe,
    max_steps: int | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    echo=print,
    callbacks: list | None = None,
    plan=None,
) -> TrainResult:
    """Train ``recipe`` to completion (or ``max_steps``) and save the result in ``recipe.output.dir``.

    ``callbacks`` are listeners of the run's events (``fitune.Listener``), called after fitune's own.
    ``plan`` is the run's plan where the caller has made it (``fitune train`` does, for its preflight); else
    the run plans itself before loading weights. It is kept in the folder as ``plan.json``.
    ``fitune-run.json`` in the folder tells the run's state at every moment (``fitune/trainer/runfolder.py``).
    Ctrl-C or SIGTERM during the steps stops after the current step, writes a checkpoint and raises
    ``RunInterrupted``; elsewhere, or a second signal, stops at once.
    """
    if recipe.data is None:
        raise FituneError(
            "data: the recipe has no data section; fix: add data.path (a JSONL file) or data.hub (a Hub dataset) to train"
        )
    trackers = trackers_for(recipe.train.report_to)  # a missing library refused before anything is written
    world = launched()
    if world.distributed:  # started by torchrun: join the other processes
        world = world_start(resolve_device(recipe.hardware.device))
    if world.main:
        bar = ProgressBar(progress)
        mine = [MetricsFile(), bar, LogLines(echo, with_steps=not bar.enabled), *trackers]
        listeners = Listeners([*mine, *(callbacks or [])], echo)
    else:  # rank 0 alone records and shows the run
        listeners = Listeners([], echo)
    out = _folder(recipe, world, overwrite, resume)
    marker = RunMarker(out, resumed=resume, writes=world.main)
    if not resume and world.main:
        write_atomic(out / RECIPE, recipe.to_yaml())

    def end(status: str, phase: str, error=None, result: TrainResult | None = None, **fields) -> None:
        """The marker's last word, then ``run_ended`` to every listener."""
        found = find_checkpoint(out)
        ckpt = found[1] if found else None
        message = _message(error) if error is not None else None
        if status == "done":
            marker.write(status, **fields)
        elif status == "interrupted":
            marker.write(status, phase=phase, signal=fields["signal"], checkpoint_step=ckpt)
        else:
            marker.write(status, phase=phase, error=message, checkpoint_step=ckpt)
        listeners.end(RunEnded(status, phase, out, message, ckpt, result))

    with Signals(echo if world.main else (lambda line: None)) as signals:
        try:
            result, saved = _run(recipe, out, marker, listeners, signals, max_steps, resume, progress, plan)
        except OutOfMemory as exc:
            end("out_of_memory", exc.report.phase, exc)
            raise
        except RunInterrupted as exc:
            exc.phase = exc.phase or marker.phase
            end("interrupted", exc.phase, signal=exc.signal_name)
            raise _described(exc, out) from None
        except KeyboardInterrupt:  # raised by code other than fitune's handler (a notebook, a debugger)
            end("interrupted", marker.phase, signal="SIGINT")
            raise _described(RunInterrupted("SIGINT", marker.phase), out) from None
        except BaseException as exc:
            oom = is_out_of_memory(exc) or is_out_of_memory(exc.__cause__)
            end("out_of_memory" if oom else "failed", marker.phase, exc)
            raise
    end(
        "done",
        "done",
        steps=result.steps,
        final_loss=result.losses[-1] if result.losses else None,
        eval_losses=result.eval_losses,
        tokens_per_second=result.tokens_per_second,
        saved=str(saved.relative_to(out)),
        truncated_examples=result.truncated_examples,
        result=result,
    )
    if world.distributed:  # every rank leaves together: no process outlives the others' agents
        world_finish()
    return result


def _folder(recipe, world, overwrite: bool, resume: bool) -> Path:
    """The run folder, checked and prepared by rank 0; the other ranks learn whether it could be."""
    if not world.distributed:
        return prepare_run_folder(recipe, overwrite, resume)
    failure = None
    if world.main:
        try:
            out = prepare_run_folder(recipe, overwrite, resume)
        except FituneError as exc:
            failure = exc
    said = broadcast_from_main(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if said is not None:
        raise OtherRankFailed(said)
    return out if world.main else resolve_dir(recipe)


def _described(exc: RunInterrupted, out: Path) -> RunInterrupted:
    """The same interruption with a message saying what is on disk and how to go on."""
    found = find_checkpoint(out)
    where = f"after step {exc.step}" if exc.step is not None else f"during {exc.phase or 'start-up'}"
    if found is not None:
        then = (
            f"the checkpoint of step {found[1]} is in {found[0]}; continue with the same command and "
            "--resume, or start again with --overwrite"
        )
    else:
        then = "no checkpoint was written, so running the same command again starts the run afresh"
    return RunInterrupted(
        exc.signal_name, exc.phase, exc.step, f"interrupted by {exc.signal_name} {where}: {then}"
    )


def _message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def _run(
    recipe, out, marker, listeners, signals, max_steps, resume, progress, plan
) -> tuple[TrainResult, Path]:
    """The run's sequence; returns its result and the folder the final save wrote."""
    torch.manual_seed(recipe.train.seed)
    source, tokenizer, data = _model_and_data(recipe, marker, progress)
    steps = max_steps or total_steps(recipe, len(data.train), world_current().size)
    marker.base["total_steps"] = steps  # for a view of the run while it trains
    marker.phase = "plan"
    if world_current().distributed:  # planning needs a process group of its own: the caller planned it
        if plan is not None and world_current().main:
            planned, why = _plan_file(recipe, out, plan)
        else:
            planned, why = None, "a run over several processes is planned before it starts (`fitune train`)"
    else:
        planned, why = _plan_file(recipe, out, plan)
    marker.phase = "load"
    session = _build(recipe, steps, source, tokenizer)
    first_step, restore_rng = (0, lambda: None)
    if resume:
        load = load_sharded_checkpoint if is_sharded(out) else load_checkpoint
        first_step, restore_rng = load(session, out)
    first_step += 1
    started = _started(recipe, out, steps, first_step, source, session, data, planned, why)
    listeners.send("run_started", started)

    samples_before = _samples(session, listeners, marker, "before")
    eval_losses: dict[int, float] = {}
    if first_step == 1:
        _eval(session, data, listeners, marker, 0, "before", eval_losses)
    else:  # the weights the checkpoint holds
        _eval(session, data, listeners, marker, first_step - 1, "resumed", eval_losses)

    losses, tokens, seconds = _steps(
        session, data, listeners, marker, signals, first_step, steps, restore_rng, eval_losses
    )

    _eval(session, data, listeners, marker, steps, "after", eval_losses)
    samples_after = _samples(session, listeners, marker, "after")
    marker.phase = "save"
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
    with oom_guard(session, "save"):
        return result, save_result(session, out)


def _model_and_data(recipe, marker, show_progress: bool):
    """The model's source (downloading a hub id's weights), the tokenizer and the tokenized data."""
    from fitune.models import sources
    from fitune.models.tokenizers import load_tokenizer

    marker.phase = "model"
    source = sources.resolve(recipe)
    marker.phase = "data"
    if source.commit is not None:  # which weights a hub id meant, for the record
        marker.base["model"] = {
            "hub_id": recipe.model.source,
            "revision": recipe.model.revision,
            "commit": source.commit,
        }
        marker.write("running")
    files = data_files(recipe, show_progress=show_progress)  # a hub dataset: from the preflight's cache
    if files.hub is not None:  # which data a hub id meant, for the record
        marker.base["data"] = files.hub.record()
        marker.write("running")
    tokenizer = load_tokenizer(source, source.config)
    with byte_progress(files, "tokenizing", show_progress) as read:
        data = load_dataset(recipe, tokenizer, read, files)
    return source, tokenizer, data


def _plan_file(recipe, out: Path, plan) -> tuple[dict | None, str | None]:
    """``plan.json``: the run's plan (peak per phase and category, the steady step's timeline) where the
    memory of the run can be set against it; (its content, None) or (None, why the run has none)."""
    if plan is None:
        from fitune.preflight.run import environment_for, plan_for

        with torch.random.fork_rng(devices=[]):  # the run draws the same numbers with or without planning
            plan, why = plan_for(recipe, environment_for(recipe, training=True))
        if plan is None:
            return None, why.partition("; fix: ")[0]
    body = {"fitune_version": __version__, **plan.to_dict()}
    write_atomic(out / PLAN, json.dumps(body))
    return body, None


def _build(recipe, steps: int, source, tokenizer) -> Session:
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
    return session


def _started(
    recipe, out, steps, first_step, source, session, data: TokenizedData, plan, no_plan
) -> RunStarted:
    notes = list(session.notes)
    advice = length_advice(data.lengths) if data.lengths is not None else None
    if advice is not None:
        _, message, fix = advice
        notes.append(message + ("" if fix == "none needed" else f"; fix: {fix}"))
    notes += [f"skipped {line}" for line in data.skipped_lines]
    if no_plan is not None:
        notes.append(f"no plan.json: {no_plan}")
    notes += [where(name, out) for name in recipe.train.report_to]
    ranks = world_current().size
    if recipe.hardware.num_devices != ranks:
        notes.append(
            f"hardware.num_devices is {recipe.hardware.num_devices}, and this run has {ranks} process(es): "
            "`fitune train --nproc N` (or torchrun) starts a process per device"
        )
    elif ranks > 1:
        notes.append(f"sharded over {ranks} processes with FSDP2; rank 0 writes the run folder")
    return RunStarted(
        recipe=recipe,
        out=out,
        total_steps=steps,
        first_step=first_step,
        model=source.description,
        device=str(session.device),
        n_train=len(data.train),
        n_eval=len(data.eval),
        data_format=data.format,
        notes=notes,
        plan=plan,
    )


def _samples(session, listeners, marker, when: str) -> list[str]:
    prompts = session.recipe.samples.prompts
    if not prompts:
        return []
    marker.phase = "samples"
    with oom_guard(session, "samples"):
        answers = generate(session, prompts, session.recipe.samples.max_new_tokens)
    listeners.send("samples_done", SamplesDone(when, list(prompts), answers))
    return answers


def _eval(session, data, listeners, marker, step: int, when: str, losses: dict[int, float]) -> float | None:
    """Eval loss over the eval split in micro-batches of ``train.batch_size``; None without an eval split."""
    marker.phase = "eval"
    pad_id = session.tokenizer.pad_token_id
    size = session.recipe.train.batch_size
    with oom_guard(session, "eval", step):
        if session.ranks > 1:  # the eval split dealt out over the processes
            loss = evaluate_share(session, data.eval, size, pad_id, world_current().rank)
        else:
            loss = evaluate(session, eval_batches(data.eval, size, pad_id))
    if loss is not None:
        losses[step] = loss
        listeners.send("eval_done", EvalDone(step, loss, when))
    return loss


def _figures(session, step, steps, loss, lr, tokens, seconds, average) -> StepDone:
    """A step's figures, read after it: gradient norm, memory (allocated and reserved on CUDA)."""
    cuda = session.device.type == "cuda"
    return StepDone(
        step=step,
        total_steps=steps,
        loss=loss,
        lr=lr,
        tokens=tokens,
        seconds=seconds,
        memory_bytes=memory_in_use(session.device),
        average_tokens_per_second=average,
        grad_norm=float(session.grad_norm),
        allocated_bytes=torch.cuda.memory_allocated(session.device) if cuda else None,
        reserved_bytes=torch.cuda.memory_reserved(session.device) if cuda else None,
    )


def _steps(session, data, listeners, marker, signals, first_step, steps, restore_rng, eval_losses):
    """The optimizer steps ``first_step``..``steps``; returns their losses, tokens and seconds."""
    t = session.recipe.train
    every = session.recipe.output.save_every
    it = iter(MicroBatches(data.train, t.batch_size, session.tokenizer.pad_token_id, t.seed))
    # several ranks: a step's micro-batches are dealt out, rank r taking every ranks-th from r on
    ranks, rank = session.ranks, world_current().rank
    per_step = t.grad_accum * ranks
    found = find_checkpoint(marker.out) if first_step > 1 else None
    taken = micro_batches_seen(found[0], per_step) if found is not None else 0
    for _ in range(taken):  # the data a resumed run already saw
        next(it)
    losses: list[float] = []
    tokens, seconds = 0, 0.0
    signals.deferring = True  # a signal now stops the run after the step it arrives in
    try:
        restore_rng()  # a resumed run draws on from where the checkpointed one stood
        for step in range(first_step, steps + 1):
            dealt = [next(it) for _ in range(per_step)]
            taken += per_step
            n_tok = sum(b.num_tokens for b in dealt)  # over every rank: the run's throughput
            group = dealt[rank::ranks]
            lr = session.scheduler.get_last_lr()[0]  # the rate this step applies
            t0 = time.perf_counter()
            marker.phase = step_phase = "first_step" if step == first_step else "steady_step"
            with oom_guard(session, step_phase, step):
                loss = float(train_step(session, group))
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FituneError(
                    f"step {step}: the loss became {loss}; fix: lower train.lr (now {t.lr}) or use "
                    "bf16/fp32 precision instead of fp16"
                )
            tokens += n_tok
            seconds += dt
            losses.append(loss)
            figures = _figures(session, step, steps, loss, lr, n_tok, dt, tokens_per_second(tokens, seconds))
            if t.eval_every and step % t.eval_every == 0 and step != steps:
                ev = _eval(session, data, listeners, marker, step, "during", eval_losses)
                figures = dataclasses.replace(figures, eval_loss=ev)
            listeners.send("step_done", figures)
            # one look per step: a signal arriving after it stops the run after the next step
            stop = signals.pending if step != steps else None
            if ranks > 1 and step != steps:  # every rank stops after the same step
                stop = stop or ("SIGTERM" if any_rank(stop is not None, session.device) else None)
            if (every and step % every == 0 or stop) and step != steps:
                marker.phase = "checkpoint"
                with oom_guard(session, "checkpoint", step):
                    if ranks > 1:
                        path = save_sharded_checkpoint(session, marker.out, step, taken)
                    else:
                        path = save_checkpoint(session, out=marker.out, step=step, micro_batches=taken)
                listeners.send("checkpoint_written", CheckpointWritten(step, path))
            if stop:
                raise RunInterrupted(stop, step_phase, step)
    finally:
        signals.deferring = False
    return losses, tokens, seconds
