"""Several processes (and GPUs) with PyTorch's own engine: torch.distributed and DDP.

`torchrun --nproc_per_node N -m transformer train ...` starts N copies of the command with
WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in their environment;
`setup` sees them and joins the process group: backend nccl when the run is on CUDA
(device cuda:LOCAL_RANK), gloo otherwise. Without these variables (or with WORLD_SIZE 1)
nothing changes: one process, no process group.

A timeout (TRANSFORMER_DIST_TIMEOUT_MIN minutes, default 30) bounds every collective, so a
rank left waiting on a peer that hangs gives up with an error instead of waiting forever;
a rank that fails exits non-zero and torchrun then stops the others. Validation runs on
rank 0 while the others wait, so the timeout must exceed the longest validation.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

_OWNED = False  # whether `setup` started the process group (and `teardown` ends it)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank among world_size processes; local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world() -> Dist:
    """The job as torchrun's environment variables describe it (one process when they are absent)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Dist(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def bind_cuda_device() -> None:
    """Make cuda:LOCAL_RANK this process's current GPU, so that plain "cuda" means it."""
    info = env_world()
    if info.active and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())


def timeout() -> datetime.timedelta:
    return datetime.timedelta(minutes=float(os.environ.get("TRANSFORMER_DIST_TIMEOUT_MIN", "30")))


def setup(device: torch.device) -> Dist:
    """Join the process group of a torchrun job (idempotent); one process: does nothing."""
    global _OWNED
    info = env_world()
    if not info.active or dist.is_initialized():
        return info
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        bind_cuda_device()
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, timeout=timeout(), **kwargs)
    _OWNED = True
    return env_world()


def teardown() -> None:
    """Leave the process group if `setup` joined it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


@contextlib.contextmanager
def job(device: torch.device) -> Iterator[Dist]:
    """Join the job for the duration of a training run (see `setup`), and leave it at the end.

    A rank that fails says so on stderr and leaves the process group at once, so that its
    process exits non-zero and torchrun stops the others instead of leaving them waiting.
    """
    world = setup(device)
    try:
        yield world
    except BaseException as e:
        if world.active:
            print(f"rank {world.rank}: training failed: {type(e).__name__}: {e}; leaving the job",
                  file=sys.stderr, flush=True)
        raise
    finally:
        teardown()


def shard(step: int, update_freq: int, world_size: int, rank: int) -> list[int]:
    """Numbers of the batches that `rank` trains on in optimiser step `step` (0-based).

    Step s consumes batches s·update_freq·W .. (s+1)·update_freq·W - 1 of the run's batch
    sequence; rank r takes those ≡ r (mod W), update_freq of them. The ranks together see
    every batch once, and W processes × update_freq make the same step as one process
    with update_freq·W, up to float rounding.
    """
    first = step * update_freq * world_size
    return [first + k * world_size + rank for k in range(update_freq)]
