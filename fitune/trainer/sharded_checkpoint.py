"""Checkpoints of a run over several processes, through torch.distributed.checkpoint (DCP).

Every rank writes its shards of the trainable weights and of the optimizer state into ``checkpoint/sharded``
and its own random generators' states; rank 0 adds the schedule and, last, ``state.json`` (the step, the
processes, the micro-batches taken), then swaps the folder in as a one-process checkpoint is
(``fitune.trainer.checkpoint.swap_in``). The frozen base is never written: LoRA and QLoRA store their adapters
only, and a resumed QLoRA run quantizes its base from the source again (the same bytes). DCP reads the shards
into whatever layout the resuming run has, so a checkpoint of 2 processes resumes on 1, 2 or more.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from fitune.distributed.world import barrier, broadcast_from_main, current
from fitune.trainer.checkpoint import (
    CHECKPOINT,
    SHARDED,
    find_checkpoint,
    new_temporary,
    rng_states,
    set_rng_states,
    swap_in,
)


def _options(session, *, loading: bool = False):
    """The trainable weights only (LoRA, QLoRA: the adapters). Loading them leaves the frozen base as built
    (not strict); a trainable weight the checkpoint lacks already failed ``dcp.load``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=session.recipe.method.kind != "full", strict=not loading)


def _state(session) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(session.model, session.optimizer, options=_options(session))
    if session.recipe.method.kind != "full":
        # a tied head is the frozen embedding under a second name, which the option above lets through
        trainable = {name for name, _ in session.trainable_parameters}
        model = {k: v for k, v in model.items() if k in trainable}
    return {"model": model, "optim": optim}


def save_sharded_checkpoint(session, out: Path, step: int, micro_batches: int) -> Path:
    """The checkpoint of ``step``, every rank writing its part (a collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    world = current()
    tmp = Path(broadcast_from_main(str(new_temporary(out)) if world.main else None))
    try:
        dcp.save(_state(session), checkpoint_id=str(tmp / SHARDED))
        tensors, plain = rng_states()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng-{world.rank}.safetensors"))
        (tmp / f"rng-{world.rank}.json").write_text(json.dumps(plain))
        barrier()  # every rank's files are written
        if world.main:
            torch.save({"scheduler": session.scheduler.state_dict()}, tmp / "scheduler.pt")
            state = {"step": step, "processes": world.size, "micro_batches": micro_batches}
            (tmp / "state.json").write_text(json.dumps(state))
            swap_in(tmp, out)
        barrier()  # the new checkpoint has its name before any rank goes on
    finally:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / CHECKPOINT


def is_sharded(out: Path) -> bool:
    found = find_checkpoint(out)
    return found is not None and (found[0] / SHARDED).is_dir()


def load_sharded_checkpoint(session, out: Path) -> tuple[int, Callable[[], None]]:
    """Restore a session from the sharded checkpoint in ``out`` on any number of processes (one included);
    returns its step and the function that sets the random generators (``load_checkpoint``'s contract)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fitune.errors import RunFolderError

    folder, step = find_checkpoint(out)
    state = _state(session)
    try:
        with warnings.catch_warnings():  # on one process DCP warns that it reads without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder / SHARDED))
    except Exception as exc:  # DCP names the keys it could not find
        raise RunFolderError(
            f"--resume: the checkpoint in {folder} does not match this recipe ({str(exc).splitlines()[0][:300]}); "
            "fix: resume with the recipe the run started with, or use --overwrite"
        ) from None
    set_state_dict(
        session.model,
        session.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(session, loading=True),
    )
    saved = torch.load(folder / "scheduler.pt", weights_only=True)
    session.scheduler.load_state_dict(saved["scheduler"])
    rank = current().rank
    mine = rank if (folder / f"rng-{rank}.safetensors").is_file() else 0  # more ranks now than then
    tensors = load_file(str(folder / f"rng-{mine}.safetensors"))
    plain = json.loads((folder / f"rng-{mine}.json").read_text())

    def restore_rng() -> None:
        set_rng_states(tensors, plain)

    return step, restore_rng
