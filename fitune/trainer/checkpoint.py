"""Checkpoints: trainable weights, optimizer and schedule state, and the step, written atomically.

A checkpoint is written into a temporary folder and renamed over the previous one only when complete, so a
crash (or an out-of-memory error) at any moment leaves the last good checkpoint intact. Weights are
safetensors; optimizer state is saved with ``torch.save`` of tensors and plain numbers and loaded with
``weights_only=True`` (no arbitrary objects are unpickled).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"


def checkpoint_state(session) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """What a checkpoint writes, gathered: host copies of the trainable weights, the optimizer's and the
    scheduler's state dicts. The planner traces this (the file writing itself reads values)."""
    weights = {n: p.detach().contiguous().cpu() for n, p in session.trainable_parameters}
    return weights, session.optimizer.state_dict(), session.scheduler.state_dict()


def save_checkpoint(session, out: Path, step: int) -> Path:
    from safetensors.torch import save_file

    target = out / CHECKPOINT
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-"))
    try:
        weights, optimizer, scheduler = checkpoint_state(session)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        old = out / ".checkpoint-old"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(session, out: Path) -> int:
    """Restore a session from ``out/checkpoint``; returns the step it was saved at."""
    from safetensors.torch import load_file

    from fitune.errors import RunFolderError

    folder = out / CHECKPOINT
    if not (folder / "state.json").is_file():
        raise RunFolderError(
            f"--resume: {out} has no complete checkpoint; fix: set output.save_every so runs keep checkpoints, "
            "or start again with --overwrite"
        )
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
    return int(json.loads((folder / "state.json").read_text())["step"])
