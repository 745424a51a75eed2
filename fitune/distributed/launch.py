"""``fitune train --nproc N``: the same command again in N processes on this machine, started by torchrun's
agent, which ends the other processes when one fails.

Each process is ``python -m fitune train ...`` with torchrun's environment (RANK, WORLD_SIZE, the rendezvous
address); ``fitune.distributed.world`` reads it. Several machines start ``torchrun ... -m fitune train`` on
each (README: several machines). The preflight has run once, here, before the launch: the processes skip it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from fitune.errors import FituneError

PREFLIGHT_DONE = "FITUNE_PREFLIGHT_DONE"  # set for the launched processes: the launcher checked the recipe
PLAN_FILE = "FITUNE_PLAN_FILE"  # the launcher's plan of one process, which rank 0 keeps in the run folder


def launched_plan():
    """The plan the launcher made for this run (None when it made none, or outside a launch)."""
    path = os.environ.get(PLAN_FILE)
    if not path:
        return None
    import json

    from fitune.planner.plan import Plan

    try:
        with open(path) as f:
            return Plan(**json.load(f))
    except (OSError, ValueError, TypeError):  # the launcher's file is gone or foreign: plan.json says why
        return None


def threads_per_process(nproc: int) -> int:
    """CPU threads for each process: the machine's cores shared out (torch would give each all of them)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def ended(rank: int, nproc: int, exitcode: int) -> str:
    """How process ``rank`` ended, in words: its exit code, or the signal that killed it."""
    if exitcode >= 0:
        return f"process {rank} of {nproc} ended with exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    why = " (the system's out-of-memory killer, or a kill by hand)" if name == "SIGKILL" else ""
    return f"process {rank} of {nproc} was killed by {name}{why}"


def launch(nproc: int, args: list[str], plan=None) -> int:
    """Run ``python -m fitune *args`` in ``nproc`` processes; returns the exit code of the run (the first
    failing process's code, 0 when every process ended well). Why a process failed it printed itself.
    ``plan`` (one process's) is handed to the processes in a temporary file."""
    import json
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's own log lines repeat, as a report with tracebacks, what the processes already said
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.launcher.api":
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    os.environ[PREFLIGHT_DONE] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    plan_file = None
    if plan is not None:
        with tempfile.NamedTemporaryFile("w", prefix="fitune-plan-", suffix=".json", delete=False) as f:
            json.dump(plan.to_dict(), f)
        plan_file = os.environ[PLAN_FILE] = f.name
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "fitune", *args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"{ended(rank, nproc, failure.exitcode)}; the other processes were stopped", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException:  # Ctrl-C or SIGTERM: the processes stop after their step and say so
        return 130  # as one process interrupted exits
    except Exception as exc:  # the rendezvous itself (a port, the agent) failed
        raise FituneError(
            f"could not start {nproc} processes: {exc}; fix: check that this machine allows local TCP "
            "connections (torchrun's rendezvous uses one)"
        ) from None
    finally:
        os.environ.pop(PREFLIGHT_DONE, None)
        if plan_file is not None:
            os.environ.pop(PLAN_FILE, None)
            os.unlink(plan_file)
    return 0
