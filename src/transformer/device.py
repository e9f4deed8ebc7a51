"""Where and in what precision to compute: the device, and bf16 only where it is native."""

from __future__ import annotations

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
