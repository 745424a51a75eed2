"""Which process of a run this is, and the few collectives the run itself makes.

A run is distributed when torchrun started it (``WORLD_SIZE`` > 1 in the environment). Rank 0 alone writes
the run folder and prints; every rank makes every collective, in the same order, or the run would hang.
Outside torchrun everything here is a no-op on one process, so the single-device run stays as it was.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from fitune.errors import FituneError

# how long a collective may wait for a rank before the run fails instead of hanging (torchrun also ends the
# other ranks when one exits)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("FITUNE_COLLECTIVE_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """The world torchrun describes in the environment (one process when it did not start this one)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(
        rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def _joined():
    """``torch.distributed`` once this process has joined a process group, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def current() -> World:
    """This process's place in the run: from the process group once it is up, else from the environment."""
    dist = _joined()
    if dist is not None:
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return launched()


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo on CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def start(device: torch.device) -> World:
    """Join the process group of a torchrun launch on ``device`` (a no-op on one process, or when joined)."""
    world = launched()
    if not world.distributed:
        return world
    import torch.distributed as dist

    if dist.is_initialized():
        return current()
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise FituneError(
                f"rank {world.rank} is local rank {world.local_rank}, and this node has "
                f"{torch.cuda.device_count()} visible CUDA device(s); fix: start at most that many processes "
                "per node (--nproc) or check CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    return current()


def barrier() -> None:
    """Wait until every rank is here (nothing on one process)."""
    dist = _joined()
    if dist is not None:
        dist.barrier()


def finish() -> None:
    """The end of a distributed run: wait for every rank, then leave the process group, so that the ranks
    exit together and torchrun's agents (one per machine, one of them holding the rendezvous) close in turn."""
    dist = _joined()
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (unchanged on one process)."""
    dist = _joined()
    if dist is not None and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank: every rank decides the same (a signal that reached one rank
    stops them all after the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_sum(t).item() > 0)


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object of fitune's own: a path, a status)."""
    dist = _joined()
    if dist is None or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
