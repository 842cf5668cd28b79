"""torchrun awareness: who this process is, and the few collectives the stages need.

Both stages run unchanged under ``torchrun --nproc-per-node N``: the environment variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) decide the share of work, and a process
group (NCCL on GPUs, gloo on CPUs) carries barriers and sums. Without torchrun everything here is
a no-op, so single-process runs need no process group at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdcache.errors import KdcacheError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64 on ``device``; NCCL needs a GPU tensor)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def from_env() -> Dist:
    """The place torchrun gave this process (rank 0 of 1 without torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise KdcacheError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    return Dist(rank, world, local)


def setup(device_name: str) -> tuple[Dist, str]:
    """Join torchrun's process group when there is one -> (ranks, device name for this rank).

    Under torchrun with CUDA each rank uses ``cuda:LOCAL_RANK``; ``--device auto`` and
    ``--device cuda`` both mean that.
    """
    ranks = from_env()
    if not ranks.enabled:
        return ranks, device_name
    use_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available()
    )
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
        device_name = f"cuda:{ranks.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        log.info("rank %d of %d joined the process group", ranks.rank, ranks.world)
    return ranks, device_name


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
