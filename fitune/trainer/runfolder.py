"""The run folder and its marker, ``fitune-run.json``: what state a run is in, told truthfully at every moment.

Statuses: ``running`` (with the process id, its start time and the host), ``done``, ``failed`` (the error and
the phase it struck in), ``interrupted`` (Ctrl-C or SIGTERM; the step of the checkpoint it left, if any) and
``out_of_memory``. A ``running`` marker whose process is gone (killed, machine rebooted) is read as a crashed
run. The marker is replaced atomically (written beside it, fsynced, renamed), so a crash never leaves half of
one.

What a new run may do with a folder:

- missing or empty: use it;
- a file, or a folder of files that are not a fitune run: refused, even with ``--overwrite`` (fitune deletes
  only what it wrote);
- a run still training on this host: refused;
- a failed, interrupted or crashed run without a checkpoint: reused by a plain re-run (nothing in it is
  worth keeping);
- a run with a checkpoint, or a finished run: ``--resume`` continues it, ``--overwrite`` replaces it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from pathlib import Path

from fitune.errors import RunFolderError
from fitune.trainer.checkpoint import find_checkpoint
from fitune.version import __version__

RUN_MARKER = "fitune-run.json"
PLAN = "plan.json"  # the plan of the run, written at start
RECIPE = "recipe.resolved.yaml"  # every field of the recipe, defaults included


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused process id is not taken for the run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new content, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(out: Path) -> dict | None:
    """The marker's content; an unreadable marker reads as a crashed run of unknown state."""
    path = out / RUN_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        return marker if isinstance(marker, dict) else {"status": "unknown"}
    except (OSError, ValueError):
        return {"status": "unknown"}


def alive_here(marker: dict) -> bool:
    """Whether the process a ``running`` marker names is still alive on this host."""
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = marker.get("pid_start")
    return started is None or _process_start(pid) in (None, started)


def _describe(marker: dict) -> str:
    status = marker.get("status", "unknown")
    if status == "running":
        return f"a run whose process ({marker.get('pid')} on {marker.get('host')}) is gone"
    if status == "done":
        return "a finished run"
    return {
        "failed": "a failed run",
        "interrupted": "an interrupted run",
        "out_of_memory": "a run that ran out of memory",
    }.get(status, "a run")


def resolve_dir(recipe) -> Path:
    out = Path(recipe.output.dir).expanduser()
    return out if out.is_absolute() else Path.cwd() / out


def prepare_run_folder(recipe, overwrite: bool, resume: bool = False) -> Path:
    """Check ``output.dir`` against what the user asked for; returns it, ready for this run."""
    out = resolve_dir(recipe)
    if out.exists() and not out.is_dir():
        raise RunFolderError(
            f"output.dir: {out} is a file, not a folder; fitune never replaces it; fix: set output.dir to a "
            "folder path (it is created if missing)"
        )
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and marker.get("status") == "running" and alive_here(marker):
        raise RunFolderError(
            f"output.dir: {out} holds a run that is still training (process {marker['pid']} on this host); "
            "fix: wait for it to finish or stop it, or choose another output.dir"
        )
    if resume:
        if marker is None:
            raise RunFolderError(
                f"--resume: {out} holds no fitune run; fix: check output.dir, or drop --resume"
            )
        if find_checkpoint(out) is None:
            raise RunFolderError(
                f"--resume: {out} has no complete checkpoint; fix: set output.save_every so runs keep "
                "checkpoints, or start again with --overwrite"
            )
        return out
    if out.is_dir() and any(out.iterdir()):
        if marker is None:
            raise RunFolderError(
                f"output.dir: {out} holds files that are not a fitune run, and fitune deletes only what it "
                "wrote; fix: choose another output.dir, or empty that folder yourself"
            )
        checkpoint = find_checkpoint(out)
        reusable = marker.get("status") != "done" and checkpoint is None
        if not (overwrite or reusable):
            what = _describe(marker)
            options = (
                "--resume to continue it from its checkpoint (step "
                f"{checkpoint[1]}), or --overwrite to replace it"
                if checkpoint is not None
                else "--overwrite to replace it"
            )
            raise RunFolderError(
                f"output.dir: {out} already holds {what}; fix: choose another output.dir, pass {options}"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class RunMarker:
    """The live marker of this run: ``running`` from the start; done, failed, interrupted or out_of_memory at
    the end."""

    def __init__(self, out: Path, resumed: bool, writes: bool = True):
        self.out = out
        self.phase = "data"
        self.writes = writes  # False on the ranks of a distributed run other than rank 0
        pid = os.getpid()
        self.base = {
            "fitune_version": __version__,
            "pid": pid,
            "pid_start": _process_start(pid),
            "host": socket.gethostname(),
            "started": _now(),
        }
        if resumed and writes:
            previous = read_marker(out) or {}
            self.base["resumed_from"] = previous.get("status")
        self.write("running")

    def write(self, status: str, **fields) -> None:
        if not self.writes:
            return
        body = {**self.base, "status": status, **fields}
        if status != "running":
            body["ended"] = _now()
        write_atomic(self.out / RUN_MARKER, json.dumps(body, indent=2))
