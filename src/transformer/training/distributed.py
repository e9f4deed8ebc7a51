"""Several processes (and GPUs) with PyTorch's own engine: torch.distributed and DDP.

`torchrun --nproc_per_node N -m transformer train ...` starts N copies of the command with
WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in their environment;
`setup` sees them and joins the process group: backend nccl when the run is on CUDA
(device cuda:LOCAL_RANK), gloo otherwise. Without these variables (or with WORLD_SIZE 1)
nothing changes: one process, no process group.

A timeout (TRANSFORMER_DIST_TIMEOUT_MIN minutes, default 30) bounds every collective, so a
rank left waiting on a peer that hangs gives up with an error instead of waiting forever;
a rank that fails exits at once, non-zero, and torchrun then stops the others. Validation runs on
rank 0 while the others wait, so the timeout must exceed the longest validation.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Iterator, NoReturn

import torch
import torch.distributed as dist

from transformer.errors import UserError

_OWNED = False  # whether `setup` started the process group (and `finish` ends it)
_FINISHED: list = []  # the last barrier of each finished job, kept until exit (see `finish`)


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


def finish() -> None:
    """End a job that went well: every rank passes a last barrier, then leaves the process group.

    Why the barrier's work object is kept until the process exits. The process group is
    freed when its last owner lets go (DistributedDataParallel's reducer or torch's group
    registry); gloo's destructor then joins its worker threads while the caller holds the
    GIL. A worker that is still dropping a finished collective needs the GIL to free the
    Python-owned tensors it holds (all_gather_object's, the allreduces'): each thread waits
    for the other, forever. That deadlock hung one CI run in four.

    A gloo barrier takes a (weak) reference to every collective that a worker still holds
    when it is issued, and such a collective, tensors included, is freed only when the last
    reference to it goes (ProcessGroupGloo::barrier, c10::intrusive_ptr). Kept alive here,
    the barrier guarantees that no worker thread frees a Python tensor after this point:
    those collectives are freed by the main thread, at exit, with the GIL.
    """
    global _OWNED
    if not dist.is_initialized():
        return
    work = dist.barrier(async_op=True)
    work.wait()
    _FINISHED.append(work)
    if _OWNED:
        dist.destroy_process_group()
    _OWNED = False


def abandon(world: Dist, error: BaseException) -> NoReturn:
    """End this process of a job that failed: say why on stderr and exit now (1; 2 for a UserError; 130 on ^C).

    The process group is not torn down: its worker threads may be blocked in a collective
    with a peer that will never answer, and joining them would hang this process until the
    timeout. Exiting at once lets torchrun see the failure and stop the other processes.
    """
    if isinstance(error, UserError):
        message, code = f"rank {world.rank}: error: {error}", 2
    elif isinstance(error, KeyboardInterrupt):
        message, code = f"rank {world.rank}: interrupted", 130
    else:
        message, code = f"rank {world.rank}: training failed: {type(error).__name__}: {error}; leaving the job", 1
        traceback.print_exception(error, file=sys.stderr)
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


@contextlib.contextmanager
def job(device: torch.device) -> Iterator[Dist]:
    """Join the job for the duration of a training run (see `setup`), and leave it at the end.

    The end is deterministic: on success every rank waits for the others and leaves the
    process group (`finish`); a rank that fails says so on stderr and exits at once
    (`abandon`), so that torchrun stops the others instead of leaving them waiting.
    Callers release their DistributedDataParallel wrapper before the block ends.
    One process (no torchrun) only runs the block.
    """
    world = setup(device)
    if not world.active:
        yield world
        return
    try:
        yield world
    except BaseException as e:  # noqa: B036 - every failure of a rank ends its process
        abandon(world, e)
    finish()


def shard(step: int, update_freq: int, world_size: int, rank: int) -> list[int]:
    """Numbers of the batches that `rank` trains on in optimiser step `step` (0-based).

    Step s consumes batches s·update_freq·W .. (s+1)·update_freq·W - 1 of the run's batch
    sequence; rank r takes those ≡ r (mod W), update_freq of them. The ranks together see
    every batch once, and W processes × update_freq make the same step as one process
    with update_freq·W, up to float rounding.
    """
    first = step * update_freq * world_size
    return [first + k * world_size + rank for k in range(update_freq)]
