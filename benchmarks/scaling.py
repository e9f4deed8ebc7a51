"""Scaling: training step against batch and model size; generation against context length.

Part 1, training. One whole training step of the EncoderDecoder (forward, label-smoothed
loss, backward, Adam step; the step of benchmarks/train_step.py, system "ours", fp32,
dropout as the preset) for the presets tiny, small and base with vocabulary `--vocab`,
against the batch size (sentences of `--length` source and `--length` target tokens).
Each configuration: `--warmup` steps, then the median of `--steps` timed steps. Reported:
target tokens/s and the peak resident-set growth during a timed step (sampled every 2 ms,
the largest over the timed steps, as train_step.py does; glibc is told to return every
allocation over 64 KiB to the system on free, MALLOC_MMAP_THRESHOLD_, as attention_cost.py
does, so that memory freed by the warm-up is not counted as free room). A preset's larger
batches are skipped once a median step passes `--max-step-s`. Fitted (least squares,
log-log): time per step against batch for each preset, and time per step against the
parameter count across presets at the batch `--param-batch`.

Part 2, generation. A decoder-only LM (preset small with arch "decoder", no encoder,
vocabulary 1000, max_len 17000, sinusoidal positions) generates greedily from a 1-token
prompt with `transformer.inference.sampling.sample`, in ONE call of up to `--gen-tokens`
new tokens, so that the KV cache is never restarted. The model's forward is wrapped to
record a timestamp after every call; the rate over a window of steps [a, b) is
(b - a) / (time of call b - time of call a), i.e. everything a step does (forward, pick,
append); the rate of the median step over the window is given too (robust to a single
stall). Windows: around 1k (1000..1200) and around 16k (16000..16200); the windowed
model's generation is repeated `--gen-repeats` times and each rate is the median over the
repeats. Models:
attn_window 64 (the cache is a ring of 65 positions) and, with `--full`, attn_window None
(full attention, the cache grows); the latter stops at `--full-budget-s` seconds and
reports how far it got.

Usage:
  python benchmarks/scaling.py                       # both parts, markdown tables
  python benchmarks/scaling.py --no-gen              # training only
  python benchmarks/scaling.py --no-train --full     # generation, windowed and full
  python benchmarks/scaling.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import PeakRSS, make_step  # noqa: E402

from transformer.config import preset  # noqa: E402
from transformer.inference.sampling import sample  # noqa: E402
from transformer.model.models import build_model, count_parameters  # noqa: E402

GEN_WINDOWS = ((1000, 1200), (16000, 16200))


def fit_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def train_rows(args) -> tuple[list[dict], dict]:
    rows = []
    for name in args.presets:
        cfg = preset(name, vocab_size=args.vocab)
        params = count_parameters(build_model(cfg))["total"]
        for batch in args.batches:
            step = make_step("ours", cfg, "fp32", batch, args.length)
            for _ in range(args.warmup):
                step()
            times, peak = [], 0
            for _ in range(args.steps):
                with PeakRSS() as mem:
                    times.append(step())
                peak = max(peak, mem.peak)
            del step
            seconds = statistics.median(times)
            row = {"preset": name, "params": params, "batch": batch, "length": args.length,
                   "step_s": round(seconds, 4), "tgt_tokens_per_s": round(batch * args.length / seconds, 1),
                   "peak_mem_mib": round(peak / 2**20, 1)}
            rows.append(row)
            if not args.json:
                print(f"# {name:<5} batch {batch:>4}: step {seconds:.3f} s, {row['tgt_tokens_per_s']:.0f} tok/s, "
                      f"peak +{row['peak_mem_mib']:.0f} MiB", file=sys.stderr, flush=True)
            if seconds > args.max_step_s:
                break
    fits = {"time_vs_batch": {}, "time_vs_params": None}
    for name in args.presets:
        pr = [r for r in rows if r["preset"] == name]
        fits["time_vs_batch"][name] = fit_slope([r["batch"] for r in pr], [r["step_s"] for r in pr])
    at = [r for r in rows if r["batch"] == args.param_batch]
    fits["time_vs_params"] = fit_slope([r["params"] for r in at], [r["step_s"] for r in at])
    return rows, fits


def gen_run(window: int | None, n_tokens: int, budget_s: float | None) -> dict:
    cfg = preset("small", arch="decoder", n_encoder_layers=0, vocab_size=1000, max_len=17000,
                 attn_window=window, positions="sinusoidal")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    stamps: list[float] = []
    inner = model.forward

    class Budget(Exception):
        pass

    def timed_forward(*a, **k):
        out = inner(*a, **k)
        stamps.append(time.perf_counter())
        if budget_s is not None and stamps[-1] - t0 > budget_s:
            raise Budget
        return out

    model.forward = timed_forward
    prompt = torch.tensor([[cfg.bos_id]])
    t0 = time.perf_counter()
    stopped = False
    try:
        sample(model, prompt, n_tokens, temperature=0.0)
    except Budget:
        stopped = True
    total = time.perf_counter() - t0
    res = {"attn_window": window, "steps_done": len(stamps), "stopped_by_budget": stopped,
           "wall_s": round(total, 1), "rates": {}}
    # call i (0-based) processes the token at position i; stamps[i] is when it finished
    res["median_step_rates"] = {}
    for a, b in GEN_WINDOWS:
        if b < len(stamps):
            res["rates"][f"{a}-{b}"] = round((b - a) / (stamps[b] - stamps[a]), 1)
            steps = [stamps[i + 1] - stamps[i] for i in range(a, b)]
            res["median_step_rates"][f"{a}-{b}"] = round(1 / statistics.median(steps), 1)
    # coarser profile: rate over 200-step windows every 2k positions
    res["profile"] = {p: round(200 / (stamps[p + 200] - stamps[p]), 1)
                      for p in range(2000, len(stamps) - 200, 2000)}
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-step-s", type=float, default=5.0)
    parser.add_argument("--param-batch", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=16400)
    parser.add_argument("--gen-repeats", type=int, default=3, help="repeats of the windowed generation")
    parser.add_argument("--full", action="store_true", help="also full attention (attn_window None)")
    parser.add_argument("--full-budget-s", type=float, default=240.0)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-gen", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    t_start = time.perf_counter()
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.no_train:
        out["train"], out["fits"] = train_rows(args)
    if not args.no_gen:
        runs = [gen_run(64, args.gen_tokens, None) for _ in range(args.gen_repeats)]
        merged = dict(runs[0], wall_s=round(statistics.median(r["wall_s"] for r in runs), 1), repeats=runs)
        for key in ("rates", "median_step_rates", "profile"):
            merged[key] = {w: round(statistics.median(r[key][w] for r in runs), 1) for w in runs[0][key]}
        out["gen"] = [merged]
        if args.full:
            out["gen"].append(gen_run(None, args.gen_tokens, args.full_budget_s))
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if "train" in out:
        print("| preset | params | batch (sentences) | step s | target tokens/s | peak MiB |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in out["train"]:
            print(f"| {r['preset']} | {r['params'] / 1e6:.1f} M | {r['batch']} | {r['step_s']:.3f} | "
                  f"{r['tgt_tokens_per_s']:,.0f} | {r['peak_mem_mib']:,.1f} |")
        print()
        for name, s in out["fits"]["time_vs_batch"].items():
            print(f"time vs batch, {name}: slope {s:.2f}" if s is not None else f"{name}: no fit")
        s = out["fits"]["time_vs_params"]
        print(f"time vs parameters at batch {args.param_batch}: slope {s:.2f}" if s is not None else "no params fit")
        print()
    if "gen" in out:
        print("| attn_window | steps done | wall s | tok/s 1000-1200 | tok/s 16000-16200 | 16k / 1k "
              "| median-step tok/s 1k | 16k | 16k / 1k |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for g in out["gen"]:
            a, b = g["rates"].get("1000-1200"), g["rates"].get("16000-16200")
            ratio = f"{b / a:.2f}" if a and b else "-"
            ma, mb = g["median_step_rates"].get("1000-1200"), g["median_step_rates"].get("16000-16200")
            mratio = f"{mb / ma:.2f}" if ma and mb else "-"
            print(f"| {g['attn_window']} | {g['steps_done']:,}{' (budget)' if g['stopped_by_budget'] else ''} | "
                  f"{g['wall_s']} | {a if a else '-'} | {b if b else '-'} | {ratio} | {ma or '-'} | {mb or '-'} | {mratio} |")
        for g in out["gen"]:
            for i, r in enumerate(g.get("repeats", [])):
                print(f"window {g['attn_window']} repeat {i + 1}: tok/s {r['rates']}, median-step {r['median_step_rates']}")
        for g in out["gen"]:
            print(f"profile window {g['attn_window']}: " + ", ".join(f"{p}: {v}" for p, v in g["profile"].items()))
    print(f"\ntotal {out['total_s']} s")


if __name__ == "__main__":
    main()
