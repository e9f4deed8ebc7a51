"""Time one LM training step against nanoGPT on nanoGPT's own CPU configuration (issue #20).

nanoGPT's README trains Tiny Shakespeare (characters, vocabulary 65) on a CPU with
  python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
    --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
i.e. 4 layers, 4 heads, 128 wide, MLP 4 × 128, block 64, batch 12, pre-norm, learned positions,
tied embeddings, dropout 0, no biases (train.py's default bias=False), fp32 (train.py uses no
autocast on a CPU), AdamW (configure_optimizers: weight decay 0.1 on the matrices, lr 1e-3,
betas (0.9, 0.99)), gradient clipping at 1.0.

Systems, all in this process on the same random batches (12 × 64 tokens of a 65-token vocabulary):
  * nanogpt:     model.GPT from --nanogpt-dir (not part of this repository) and its
                 configure_optimizers; the step of its train.py: set the lr of the param
                 groups, forward with targets (its F.cross_entropy), backward, clip,
                 optimizer.step, zero_grad(set_to_none=True).
  * ours:        `transformer lm train`'s step itself: build_model with the matching ModelConfig
                 (arch decoder, norm_first, learned positions, d_ff 512, dropout 0, vocab 65),
                 the optimiser of TRAIN_DEFAULTS (transformer.training.optim), tasks.lm.lm_loss,
                 and Trainer.step_once (backward, divide by the predictions, clip, Adam step,
                 schedule step, zero_grad).
  * ours-bf16:   the same under --precision bf16 (autocast; native on CPUs with AVX-512-BF16/AMX).

Usage:
  python benchmarks/lm_step.py --nanogpt-dir /tmp/nanogpt [--steps 200] [--json]
  python benchmarks/lm_step.py --profile ours --steps 20      # torch.profiler table of our step

The systems run round-robin (one step each in turn) after warm-up steps; each gets the median
of its steps. Threads: torch's default unless --threads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from transformer.cli.lm import TRAIN_DEFAULTS
from transformer.config import preset
from transformer.model.models import build_model
from transformer.tasks.lm import lm_loss, train_tokenizer
from transformer.training.distributed import Dist
from transformer.training.loop import LoopConfig, Objective, Trainer
from transformer.training.optim import OptimConfig

VOCAB, BLOCK, BATCH, LAYERS, HEADS, WIDTH = 65, 64, 12, 4, 4, 128
NANOGPT_COMMIT = "04a1d697ddc57aadb2edbe95816bf86c6b8918b0"  # the stored version read (see BENCHMARKS.md)
NANOGPT_TRAIN = dict(learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0)

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def random_batches(n: int, seed: int = 0) -> Batches:
    """n (inputs, targets) pairs of (BATCH, BLOCK) token ids in [0, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(VOCAB, (BATCH, BLOCK + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def load_nanogpt(directory: Path):
    """nanoGPT's model.py from `directory` as a module, or None when it is not there."""
    path = directory / "model.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_step(module, batches: Batches) -> Callable[[], float]:
    """A closure running one step of nanoGPT's train.py loop (without its data loading); returns seconds."""
    torch.manual_seed(1337)
    config = module.GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                              dropout=0.0, bias=False)
    cfg = NANOGPT_TRAIN
    with contextlib.redirect_stdout(sys.stderr):  # its prints would spoil --json
        model = module.GPT(config).train()
        optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], cfg["betas"], "cpu")
    count = [0]

    def step() -> float:
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        t0 = time.perf_counter()
        for group in optimizer.param_groups:  # get_lr(iter_num); a constant here, the cost is the same
            group["lr"] = cfg["learning_rate"]
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def our_trainer(batches: Batches, precision: str, out: Path) -> Trainer:
    """The Trainer of `transformer lm train` with nanoGPT's shape, its optimiser defaults and these batches."""
    d = TRAIN_DEFAULTS
    cfg = preset(d["preset"], arch="decoder", vocab_size=VOCAB, d_model=WIDTH, n_heads=HEADS, d_ff=4 * WIDTH,
                 n_encoder_layers=0, n_decoder_layers=LAYERS, dropout=0.0, max_len=BLOCK, positions="learned",
                 norm_first=True)
    optim = OptimConfig(lr=d["lr"], schedule=d["schedule"], warmup=d["warmup"], beta2=d["beta2"], eps=d["adam_eps"],
                        weight_decay=d["weight_decay"], clip_norm=d["clip_norm"]).resolve(cfg.d_model, 2000)
    loop = LoopConfig(out=out, optim=optim, max_steps=2000, precision=precision, progress=False)
    torch.manual_seed(1337)
    model = build_model(cfg).train()
    tokenizer = train_tokenizer("".join(chr(c) for c in range(32, 32 + VOCAB - 5)), "char")  # only stored
    objective = Objective(batch=lambda i: batches[i % len(batches)], loss=lm_loss, validate=lambda m: {},
                          best_metric="loss", higher_is_better=False)
    return Trainer(loop, model, cfg, tokenizer, objective, Dist(), {}, say=lambda s: None)


def our_step(trainer: Trainer) -> Callable[[], float]:
    def step() -> float:
        t0 = time.perf_counter()
        trainer.step_once()
        return time.perf_counter() - t0

    return step


def build_steps(systems: list[str], nanogpt, batches: Batches, out: Path) -> dict[str, Callable[[], float]]:
    steps = {}
    for system in systems:
        if system == "nanogpt":
            steps[system] = nanogpt_step(nanogpt, batches)
        else:
            precision = "bf16" if system == "ours-bf16" else "fp32"
            steps[system] = our_step(our_trainer(batches, precision, out / system))
    return steps


def run(steps: dict[str, Callable[[], float]], warmup: int, n: int) -> dict[str, float]:
    """Median seconds per step of each system, timed round-robin (one step each in turn)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {s: [] for s in steps}
    for _ in range(n):
        for s, fn in steps.items():
            times[s].append(fn())
    return {s: statistics.median(t) for s, t in times.items()}


def profile(step: Callable[[], float], n: int, rows: int) -> None:
    """torch.profiler's table of n steps (after 10 warm-up steps), by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(10):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = sum(step() for _ in range(n))
    print(f"{seconds / n * 1000:.2f} ms a step ({n} profiled, profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt-dir", type=Path, default=Path("/tmp/nanogpt"),
                        help="a directory holding nanoGPT's model.py (not part of this repository)")
    parser.add_argument("--systems", nargs="+", default=["nanogpt", "ours"], choices=["nanogpt", "ours", "ours-bf16"])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--profile", choices=["nanogpt", "ours", "ours-bf16"], help="profile this system instead")
    parser.add_argument("--rows", type=int, default=30, help="rows of the profile table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    systems = [args.profile] if args.profile else list(args.systems)
    nanogpt = load_nanogpt(args.nanogpt_dir) if "nanogpt" in systems else None
    if "nanogpt" in systems and nanogpt is None:
        print(f"nanoGPT skipped: no model.py in {args.nanogpt_dir} (give --nanogpt-dir)", file=sys.stderr)
        systems.remove("nanogpt")
    if not systems:
        return
    batches = random_batches(16)
    with tempfile.TemporaryDirectory() as tmp:
        steps = build_steps(systems, nanogpt, batches, Path(tmp))
        if args.profile:
            profile(steps[args.profile], args.steps, args.rows)
            return
        medians = run(steps, args.warmup, args.steps)
    base = medians.get("nanogpt")
    rows = [{"system": s, "ms_per_step": round(t * 1000, 2), "tokens_per_s": round(BATCH * BLOCK / t),
             "speedup_over_nanogpt": round(base / t, 2) if base else None} for s, t in medians.items()]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
            "warmup": args.warmup, "nanogpt_commit": NANOGPT_COMMIT if base else None, "rows": rows}
    if args.json:
        print(json.dumps(meta, indent=2))
        return
    print(f"torch {meta['torch']}, {meta['threads']} threads, median of {args.steps} steps after {args.warmup}"
          + (f"; nanoGPT model.py of commit {NANOGPT_COMMIT[:7]}" if base else ""))
    for r in rows:
        ratio = f"  ×{r['speedup_over_nanogpt']:.2f} nanoGPT's speed" if base else ""
        print(f"{r['system']:<10} {r['ms_per_step']:7.2f} ms/step  {r['tokens_per_s']:>7,} tok/s{ratio}")


if __name__ == "__main__":
    main()
