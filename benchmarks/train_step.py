"""Time one full training step (forward, label-smoothed loss, backward, Adam step).

Systems, all in this process on the same machine, all with label smoothing 0.1, pad ignored:
  * ours:           transformer.models.EncoderDecoder with transformer.losses
  * nn.Transformer: torch.nn.Transformer given the same tied embeddings (×√d_model),
                    sinusoidal positions and tied output projection; PyTorch's own
                    F.cross_entropy(label_smoothing=0.1, ignore_index=pad)
  * ours+compile:   ours under torch.compile (optional: --systems ours ours+compile)
  * hf-marian:      transformers.MarianMTModel of the same sizes (post-norm, ReLU,
                    sinusoidal positions, shared embeddings), random init, the same
                    F.cross_entropy

Usage:
  python benchmarks/train_step.py --presets small base --precisions fp32 bf16 [--json]
  python benchmarks/train_step.py --presets small --precisions bf16 --profile ours   # where a step's time goes

The systems are timed round-robin, one step each in turn, after warm-up steps; each gets
the median of its steps. Prints target tokens/s, the ratio of ours to each peer, peak
memory (resident-set growth during one step, sampled every 2 ms, the largest over the
timed steps), and model FLOPs utilisation against a GEMM peak measured on the spot with
transformer-shaped matrices.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from transformer.config import ModelConfig, preset
from transformer.model.layers import sinusoid_table
from transformer.training.losses import label_smoothed_cross_entropy
from transformer.model.models import build_model
from transformer.training.optim import OptimConfig, make_optimizer

VOCAB = {"small": 8000, "base": 37000}


class TorchReference(nn.Module):
    """nn.Transformer with the paper's embeddings, positions and tied projection around it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)
        self.register_buffer("pe", sinusoid_table(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = math.sqrt(cfg.d_model)
        self.core = nn.Transformer(
            cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_ff,
            cfg.dropout, batch_first=True,
        )
        self.causal = nn.Transformer.generate_square_subsequent_mask(cfg.max_len)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(ids) * self.scale + self.pe[: ids.size(1)])

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        t = tgt.size(1)
        h = self.core(self._embed(src), self._embed(tgt), tgt_mask=self.causal[:t, :t], tgt_is_causal=True)
        return h @ self.embed.weight.T


class Marian(nn.Module):
    """Hugging Face MarianMTModel returning logits, so that every system uses the same loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import MarianConfig, MarianMTModel

        self.model = MarianMTModel(MarianConfig(
            vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
            encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
            encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
            encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_len,
            activation_function="relu", dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
            scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=3, decoder_start_token_id=2, forced_eos_token_id=3,
        ))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=src, decoder_input_ids=tgt, use_cache=False).logits


def build(system: str, cfg: ModelConfig) -> nn.Module:
    if system == "ours":
        return build_model(cfg)
    if system == "ours+compile":
        return torch.compile(build_model(cfg))
    if system == "nn.Transformer":
        return TorchReference(cfg)
    return Marian(cfg)


class PeakRSS:
    """Peak resident-set growth (bytes) while the block runs, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def step_flops(cfg: ModelConfig, batch: int, s: int, t: int) -> float:
    """Matmul FLOPs of one training step (forward ×3 for forward + backward)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    enc = cfg.n_encoder_layers * (batch * s * (4 * d * d + 2 * d * f) * 2 + 4 * batch * s * s * d)
    dec = cfg.n_decoder_layers * (
        batch * t * (6 * d * d + 2 * d * f) * 2 + batch * s * 2 * d * d * 2  # self qkvo, cross q o; cross k v
        + 4 * batch * t * t * d + 4 * batch * t * s * d
    )
    out = 2 * batch * t * d * v
    return 3.0 * (enc + dec + out)


def gemm_peak(dtype: torch.dtype, d: int) -> float:
    """FLOP/s of transformer-shaped GEMMs: (4000, d) @ (d, 4d) and (4000, 4d) @ (4d, d)."""
    a, w1, w2 = torch.randn(4000, d), torch.randn(d, 4 * d), torch.randn(4 * d, d)
    a, w1, w2 = a.to(dtype), w1.to(dtype), w2.to(dtype)
    h = a @ w1
    for _ in range(2):
        (a @ w1) @ w2
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        (a @ w1) @ w2
        times.append(time.perf_counter() - t0)
    del h
    return 2 * 2 * 4000 * d * 4 * d / min(times)


def make_step(system: str, cfg: ModelConfig, precision: str, batch: int, length: int):
    """A closure that runs one training step of `system` and returns its seconds."""
    torch.manual_seed(0)
    model = build(system, cfg).train()
    optimizer, _ = make_optimizer(model, OptimConfig(lr=1e-4, schedule="constant", warmup=0).resolve(cfg.d_model, None))
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)
    tgt = torch.randint(4, cfg.vocab_size, (batch, length + 1), generator=g)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        if system.startswith("ours"):
            loss, _, n = label_smoothed_cross_entropy(logits, tgt_out, 0.1, 0)
            return loss / n
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=0, label_smoothing=0.1)

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            logits = model(src, tgt_in)
        loss_fn(logits).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def run_group(systems: list[str], preset_name: str, precision: str, batch: int, length: int,
              warmup: int, steps: int) -> list[dict]:
    """Time the systems round-robin (one step each in turn), so that drifts hit all alike."""
    cfg = preset(preset_name, vocab_size=VOCAB[preset_name])
    step_fns = {s: make_step(s, cfg, precision, batch, length) for s in systems}
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    times: dict[str, list[float]] = {s: [] for s in systems}
    peaks = dict.fromkeys(systems, 0)
    for _ in range(steps):
        for s, fn in step_fns.items():
            with PeakRSS() as mem:
                times[s].append(fn())
            peaks[s] = max(peaks[s], mem.peak)
    flops = step_flops(cfg, batch, length, length)
    rows = []
    for s in systems:
        seconds = statistics.median(times[s])
        rows.append({
            "system": s, "preset": preset_name, "precision": precision, "batch": f"{batch}x{length}",
            "step_s": round(seconds, 4), "tgt_tokens_per_s": round(batch * length / seconds, 1),
            "peak_mem_mb": round(peaks[s] / 2**20, 1), "model_gflops_per_s": round(flops / seconds / 1e9, 1),
        })
    return rows


def profile(system: str, preset_name: str, precision: str, batch: int, length: int, steps: int, rows: int) -> None:
    """Print torch.profiler's table of `steps` steps of `system` (after two warm-up steps), by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = make_step(system, preset(preset_name, vocab_size=VOCAB[preset_name]), precision, batch, length)
    step(), step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = sum(step() for _ in range(steps))
    print(f"{system} {preset_name} {precision} {batch}x{length}: {seconds / steps:.3f} s a step ({steps} profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "base"], choices=list(VOCAB))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--systems", nargs="+", default=["ours", "nn.Transformer", "hf-marian"],
                        choices=["ours", "ours+compile", "nn.Transformer", "hf-marian"])
    parser.add_argument("--batch", type=int, default=160, help="sentences per batch")
    parser.add_argument("--length", type=int, default=25, help="source and target length")
    parser.add_argument("--bf16-batch", type=int, default=None, help="smaller batch for bf16 (slow on CPUs without native bf16)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", choices=["ours", "ours+compile", "nn.Transformer", "hf-marian"],
                        help="instead of timing: profile --steps steps of this system per preset and precision")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()

    if args.profile:
        for preset_name in args.presets:
            for precision in args.precisions:
                profile(args.profile, preset_name, precision, args.batch, args.length, args.steps, args.profile_rows)
        return

    peaks = {p: gemm_peak(torch.float32 if p == "fp32" else torch.bfloat16, 256) for p in args.precisions}
    rows = []
    for preset_name in args.presets:
        for precision in args.precisions:
            batch = args.bf16_batch if precision == "bf16" and args.bf16_batch else args.batch
            group = run_group(args.systems, preset_name, precision, batch, args.length, args.warmup, args.steps)
            ours = next(r for r in group if r["system"] == "ours")
            for r in group:
                r["ours_speedup"] = round(ours["tgt_tokens_per_s"] / r["tgt_tokens_per_s"], 2)
                r["mfu"] = round(r["model_gflops_per_s"] * 1e9 / peaks[precision], 3)
            rows += group
            if not args.json:
                for r in group:
                    print(
                        f"{r['preset']:<6} {r['precision']:<5} {r['batch']:<7} {r['system']:<15} "
                        f"{r['tgt_tokens_per_s']:>9.0f} tok/s  step {r['step_s']:.3f}s  "
                        f"ours x{r['ours_speedup']:.2f}  peak {r['peak_mem_mb']:.0f} MB  MFU {r['mfu']:.2f}",
                        flush=True,
                    )
    if args.json:
        print(json.dumps({"gemm_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    else:
        print("GEMM peak (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()))


if __name__ == "__main__":
    main()
