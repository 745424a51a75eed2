"""Checkpoints: trainable weights, optimizer and schedule state, and the step, written so that a complete
one is always on disk.

A checkpoint is written into a temporary folder, every file fsynced, ``state.json`` last (a folder without it
is incomplete and never used). Then it is swapped in: the previous checkpoint is renamed to
``.checkpoint-old``, the new one to ``checkpoint``, and only then is the old one deleted. A crash between the
two renames leaves ``.checkpoint-old`` whole, and ``find_checkpoint`` takes it. Weights are safetensors;
optimizer state is saved with ``torch.save`` of tensors and plain numbers and loaded with
``weights_only=True`` (no arbitrary objects are unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"
OLD = ".checkpoint-old"


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk; platforms without folder handles skip folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The complete checkpoint in ``out`` and its step: ``checkpoint/``, else ``.checkpoint-old/``."""
    for name in (CHECKPOINT, OLD):
        step = _step_of(out / name)
        if step is not None:
            return out / name, step
    return None


def checkpoint_state(session) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """What a checkpoint writes, gathered: host copies of the trainable weights, the optimizer's and the
    scheduler's state dicts. The planner traces this (the file writing itself reads values)."""
    weights = {n: p.detach().contiguous().cpu() for n, p in session.trainable_parameters}
    return weights, session.optimizer.state_dict(), session.scheduler.state_dict()


def save_checkpoint(session, out: Path, step: int) -> Path:
    from safetensors.torch import save_file

    target = out / CHECKPOINT
    for stale in out.glob(".checkpoint-tmp-*"):  # left by a crash while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-tmp-"))
    try:
        weights, optimizer, scheduler = checkpoint_state(session)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        for name in ("trainable.safetensors", "optimizer.pt", "state.json", "."):
            _fsync(tmp / name)
        old = out / OLD
        if _step_of(target) is not None:
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)  # the complete checkpoint stays on disk, as .checkpoint-old
        else:
            shutil.rmtree(target, ignore_errors=True)  # an incomplete one is worth nothing
        tmp.rename(target)
        _fsync(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(session, out: Path) -> int:
    """Restore a session from the checkpoint in ``out`` (``find_checkpoint``); returns its step."""
    from safetensors.torch import load_file

    from fitune.errors import RunFolderError

    found = find_checkpoint(out)
    if found is None:
        raise RunFolderError(
            f"--resume: {out} has no complete checkpoint; fix: set output.save_every so runs keep checkpoints, "
            "or start again with --overwrite"
        )
    folder, step = found
    weights = load_file(str(folder / "trainable.safetensors"))
    params = dict(session.trainable_parameters)
    missing = set(params) - set(weights)
    if missing:
        raise RunFolderError(
            f"--resume: the checkpoint in {folder} does not match this recipe ({len(missing)} trainable "
            "parameters missing); fix: resume with the recipe the run started with, or use --overwrite"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    state = torch.load(folder / "optimizer.pt", map_location=session.device, weights_only=True)
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    return step
