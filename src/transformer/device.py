"""Where and in what precision to compute: the device, and bf16 only where it is native."""

from __future__ import annotations

import ctypes
import os

import torch

from transformer.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for 'cuda' without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"`device` {name}: no CUDA GPU is available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"`device` {name}: choose auto, cpu or cuda")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (a CUDA GPU with bf16, or a CPU with AVX-512-BF16 or AMX).

    On CPUs without it, bf16 matmuls take a slow path: 40x slower than fp32 on an AVX2 CPU
    (BENCHMARKS.md). oneDNN's own check (`_is_mkldnn_bf16_supported`) is also true on
    AVX-512 CPUs that only emulate bf16, so the CPU's flags are read (through cpuinfo).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    """The instruction sets this CPU has, as cpuinfo (through torch) names them: {"avx2", "avx512_vnni", ...}."""
    return {name for name, present in torch._C._cpu._get_cpu_capability().items() if present}


def resolve_precision(name: str, device: torch.device, training: bool = True) -> tuple[str, str]:
    """The precision to compute in, and why: `auto` picks bf16 autocast where bf16 is native, else fp32.

    Native means a CUDA GPU with bf16, or, for training, a CPU with AVX-512-BF16 or AMX: there
    a controlled Multi30k run (README, "bf16 training on a CPU with AMX") trained to fp32's validation BLEU in the
    same steps. Decoding on a CPU stays fp32 under `auto`, so that translations equal those of
    the exports and of earlier runs; `--precision bf16` asks for bf16 weights. On CPUs without
    native bf16, bf16 is about 40x slower (BENCHMARKS.md).
    """
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"`precision` {name}: choose fp32, bf16 or auto")
    if name != "auto":
        return name, "as asked"
    if not native_bf16(device):
        return "fp32", f"auto: {device.type} has no native bf16"
    if device.type == "cuda":
        return "bf16", "auto: the GPU has native bf16"
    if training:
        return "bf16", "auto: this CPU has native bf16 (AVX-512-BF16/AMX)"
    return "fp32", "auto: decoding on a CPU"


def cpu_contention(threads: int) -> str | None:
    """Why this CPU is oversubscribed, or None: the 1-minute load average against the cores.

    The load counts the runnable threads of every process, `threads` of them this one's
    compute threads. Where the others bring the total past 1.5x the cores, each thread gets
    a fraction of a core, and a step of PyTorch's (whose threads wait for one another) is
    several times slower than alone: a 10-minute quick start then makes 65 updates
    instead of 454 (2-core AMD EPYC, issue 31). None where the load cannot be read.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        return None
    cores = os.cpu_count() or 1
    if load < 1.5 * cores:
        return None
    return (f"this machine is busy: load average {load:.1f} on {cores} cores ({threads} of it this run's threads); "
            f"other processes take the CPU, and steps run several times slower than alone")


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`); nothing without glibc.

    PyTorch's CPU tensors come from malloc, and glibc keeps what they free for later: between
    steps, a small model's training process held about 300 MB more than its live tensors
    (2-core AMD EPYC, fp32), and a validation's decoding leaves tensors of many more shapes.
    Trimming costs a pass over the heap, so it is for the moments between phases, not every
    step (after each step it made training 29% slower in a one-off run; BENCHMARKS.md, "Training memory").
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
