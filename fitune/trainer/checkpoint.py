"""Checkpoints: trainable weights, optimizer and schedule state, the step and the random generators'
states (torch CPU and CUDA, Python's ``random``, NumPy's when loaded), written so that a complete one is
always on disk. With them a resumed run draws the same dropout masks as the uninterrupted one and repeats its
losses bit for bit on the same machine; the data position follows from the step (the sampler has its own
seeded generator, replayed by the loop).

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
import random
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"
OLD = ".checkpoint-old"
RNG_FILE = "rng.safetensors"
SHARDED = "sharded"  # a checkpoint of several processes: torch.distributed.checkpoint's files


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


def rng_states() -> tuple[dict[str, torch.Tensor], dict]:
    """The random generators' states: torch's as tensors, Python's and NumPy's as JSON-able values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    plain: dict = {"python": [version, list(internal), gauss]}
    np = sys.modules.get("numpy")  # fitune draws nothing from NumPy; a library it drives might
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        plain["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, plain


def set_rng_states(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted(
        (k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in plain:
        version, internal, gauss = plain["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in plain:
        import numpy as np

        name, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(session, out: Path, step: int, micro_batches: int | None = None) -> Path:
    """The checkpoint of ``step``; ``micro_batches``: how many the run has taken (recorded when given)."""
    from safetensors.torch import save_file

    target = out / CHECKPOINT
    tmp = new_temporary(out)
    try:
        weights, optimizer, scheduler = checkpoint_state(session)
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer, "scheduler": scheduler}, tmp / "optimizer.pt")
        rng_tensors, rng_plain = rng_states()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE))
        state = {"step": step, "rng": rng_plain}
        if micro_batches is not None:
            state["micro_batches"] = micro_batches
        (tmp / "state.json").write_text(json.dumps(state))
        swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def new_temporary(out: Path) -> Path:
    """A fresh folder in ``out`` to write a checkpoint into; those left by a crash while writing go."""
    for stale in out.glob(".checkpoint-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-tmp-"))


def swap_in(tmp: Path, out: Path) -> None:
    """Make the written checkpoint in ``tmp`` (``state.json`` last) the one in ``out``: every file fsynced,
    the complete previous one kept as ``.checkpoint-old`` until the new one has its name."""
    for path in sorted(tmp.rglob("*"), key=lambda p: p.name == "state.json"):
        _fsync(path)
    _fsync(tmp)
    target, old = out / CHECKPOINT, out / OLD
    if _step_of(target) is not None:
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)  # the complete checkpoint stays on disk, as .checkpoint-old
    else:
        shutil.rmtree(target, ignore_errors=True)  # an incomplete one is worth nothing
    tmp.rename(target)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)


def micro_batches_seen(folder: Path, per_step: int) -> int:
    """Micro-batches the run had taken at the checkpoint in ``folder``: recorded since runs over several
    processes (a resume on another number of them takes another number per step); else step x per_step."""
    saved = json.loads((folder / "state.json").read_text())
    return int(saved.get("micro_batches", saved["step"] * per_step))


def load_checkpoint(session, out: Path) -> tuple[int, Callable[[], None]]:
    """Restore a session from the checkpoint in ``out`` (``find_checkpoint``). Returns its step and a
    function that sets the random generators to their saved states: call it just before the next step,
    after whatever draws from them at start-up (samples, the first eval)."""
    from safetensors.torch import load_file

    from fitune.errors import RunFolderError

    found = find_checkpoint(out)
    if found is None:
        raise RunFolderError(
            f"--resume: {out} has no complete checkpoint; fix: set output.save_every so runs keep checkpoints, "
            "or start again with --overwrite"
        )
    folder, step = found
    if (folder / SHARDED).is_dir():
        raise RunFolderError(  # the run reads these through fitune.trainer.sharded_checkpoint
            f"--resume: the checkpoint in {folder} was written by several processes; fix: resume it with "
            "`fitune train --resume` (any number of processes)"
        )
    if session.ranks > 1:
        raise RunFolderError(
            f"--resume: the checkpoint in {folder} was written by one process, and this run has "
            f"{session.ranks}; fix: resume it on one process (without --nproc), or start again with --overwrite"
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
    saved = json.loads((folder / "state.json").read_text())
    rng_tensors = load_file(str(folder / RNG_FILE)) if (folder / RNG_FILE).is_file() else None

    def restore_rng() -> None:
        if rng_tensors is not None:  # checkpoints of earlier versions have none
            set_rng_states(rng_tensors, saved.get("rng", {}))

    return step, restore_rng
