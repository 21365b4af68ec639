"""Data-parallel training under torchrun: who this process is, and the few collectives the recipe needs.

torchrun (finetune_trainer.launch) starts one process per GPU (one per pod on CPU) and sets RANK,
LOCAL_RANK and WORLD_SIZE; torch.distributed does the rest (DDP's gradient all-reduce, the NCCL or
gloo backend). Without torchrun, World() is the single process and every helper here is a no-op.

What the ranks share: each step's gradientAccumulationSteps micro-batches are dealt out round-robin
(rank r takes micro-batches r, r + W, ...), so the global batch, the data order and the step count
are those of one process. Rank 0 alone reports, checkpoints, exports and uploads; the others wait at
the end for it (a failure there fails the attempt on every pod, so the Job's retry restarts them all).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

log = logging.getLogger(__name__)
# Rank 0 prepares the dataset (maybe downloading a large base model) and later exports while the
# others wait in a barrier: the coordination group's timeout must outlast both.
COORDINATION_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports, checkpoints, exports and uploads."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The first process of its pod: the one that writes the pod's shared workdir."""
        return self.local_rank == 0

    def micro_batches(self, step: int, accum: int) -> list[int]:
        """This rank's share of the step's micro-batches (indices over the whole run)."""
        return [step * accum + k for k in range(self.rank, accum, self.size)]


_coordination = None  # a gloo group for barriers on CPU, whatever the training backend


def init(world: World) -> None:
    """Joins the process group (NCCL on CUDA, gloo on CPU) once per process."""
    global _coordination
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, timeout=COORDINATION_TIMEOUT)
    _coordination = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT) if backend != "gloo" else None
    log.info("rank %d of %d (local rank %d), backend %s", world.rank, world.size, world.local_rank, backend)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier(group=_coordination)


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum over all ranks (one small all-reduce)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def agree(value, pick=min):
    """The same value on every rank: `pick` over what each rank proposes (e.g. an auto batch size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_coordination)
    return pick(values)


def shutdown() -> None:
    global _coordination
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _coordination = None
