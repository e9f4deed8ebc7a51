"""Where and in what precision to compute: the device, and bf16 only where it is native."""

from __future__ import annotations

import torch

from transformer.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; a clear error for 'cuda' without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively (a CUDA GPU with bf16, or a CPU with AVX-512-BF16/AMX).

    On CPUs without it, bf16 matmuls take a slow path: 40x slower than fp32 on an AVX2 CPU
    (BENCHMARKS.md).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """The precision to train in, and why: `auto` picks bf16 autocast on a GPU with native bf16, else fp32.

    CPUs get fp32 under `auto` even where bf16 is native (AVX-512-BF16/AMX): no such CPU was
    at hand to measure that bf16 pays there and trains as well, so it stays opt-in
    (`--precision bf16`); on CPUs without it, bf16 is about 40x slower (BENCHMARKS.md).
    """
    if name not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {name}: choose fp32, bf16 or auto")
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda" and native_bf16(device):
        return "bf16", "auto: the GPU has native bf16"
    if device.type == "cpu" and native_bf16(device):
        return "fp32", "auto: fp32 on CPUs; --precision bf16 uses this CPU's native bf16"
    return "fp32", f"auto: {device.type} has no native bf16"
