"""Resident memory of `transformer train` against steps, and where it goes (issue 31).

Each configuration trains the Multi30k recipe (`train --recipe small-data`: token-bucketed
batches of up to 2,048 padded tokens, of every length the corpus has; validation every 250
steps) in a child process, from the command line as a user runs it. Every 0.5 s this process
reads the child's VmRSS and VmHWM (/proc/PID/status) and the step of its log, and reports:

- peak: VmHWM at the end, the whole process's peak resident set;
- RSS and peak at steps 10, 100, 500 and the last, and the peak's growth from step N/2 to N;
- steady: the median RSS over the second half of the steps.

`--side-by-side` trains en-de and de-en at once, one thread each, as scripts/multi30k.sh does,
and adds up the two processes' RSS at each moment.

Where it goes (`--breakdown`, a child of its own per preset): the resident set after
`import torch`; the model's parameters, their gradients and Adam's two moments (bytes, counted);
one step's working set on a full batch of 2,048 tokens (the peak during the step less the
resident set before it, the kernel's peak reset with /proc/self/clear_refs); and the number
of distinct matrix-product shapes a step makes (in bf16, each a oneDNN primitive on CPUs with
native bf16; `transformer` bounds oneDNN's cache of them, see its __init__).

Usage:
  python benchmarks/memory.py --preset small --precision fp32 --steps 1000
  python benchmarks/memory.py --preset small --steps 1000 --side-by-side
  python benchmarks/memory.py --breakdown small base
  python benchmarks/memory.py --shapes   # distinct batch shapes of Multi30k, lengths as they are or rounded to 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MULTI30K = Path(__file__).resolve().parents[1] / "src" / "transformer" / "corpora" / "multi30k"
MB = 2**20


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of process `pid` in MB ({} once it has ended)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(value.split()[0]) // 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def last_step(log: Path) -> int:
    """The step of the newest train record of a run's log.jsonl (0 before the first)."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            return record["step"]
    return 0


def train(runs: list[tuple[str, str]], args: argparse.Namespace, work: Path) -> list[tuple[int, int, int]]:
    """Train each (src, tgt) of `runs` at once; samples (step of the first run, total RSS, total peak) in MB."""
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if len(runs) > 1 else {})
    children = []
    for src, tgt in runs:
        out = work / f"{src}-{tgt}"
        command = ["transformer", "train", "--recipe", "small-data", "--data", str(args.data), "--src-lang", src,
                   "--tgt-lang", tgt, "--preset", args.preset, "--precision", args.precision, "--max-steps",
                   str(args.steps), "--log-every", "10", "--valid-bleu-lines", "300", "--no-progress", "--out", str(out)]
        log = open(work / f"{src}-{tgt}.txt", "w")
        children.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), out / "log.jsonl"))
    samples = []
    while any(child.poll() is None for child, _ in children):
        time.sleep(0.5)
        seen = [status(child.pid) for child, _ in children]
        if all(seen):
            samples.append((last_step(children[0][1]), sum(s["VmRSS"] for s in seen), sum(s["VmHWM"] for s in seen)))
    for child, _ in children:
        if child.returncode != 0:
            sys.exit(f"training failed; see {work}")
    return samples


def report(samples: list[tuple[int, int, int]], steps: int) -> dict:
    """Peak, steady RSS, and RSS/peak at steps 10, 100, 500 and the last."""
    def at(step: int) -> tuple[int, int]:
        after = [(rss, hwm) for s, rss, hwm in samples if s >= step]
        return after[0] if after else samples[-1][1:]

    marks = sorted({m for m in (10, 100, 500, steps) if m <= steps})
    second_half = [rss for s, rss, _ in samples if s > steps // 2]
    peak_half, peak_end = at(steps // 2)[1], samples[-1][2]
    return {"peak_mb": peak_end, "steady_mb": int(statistics.median(second_half)) if second_half else None,
            "at_step": {m: {"rss_mb": at(m)[0], "peak_mb": at(m)[1]} for m in marks},
            "peak_growth_second_half": round(peak_end / peak_half - 1, 4)}


def breakdown(name: str) -> dict:
    """Where the memory of a `name` model's training goes (run in a child process of its own)."""
    def rss() -> int:
        return status(os.getpid())["VmRSS"]

    def hwm() -> int:
        return status(os.getpid())["VmHWM"]

    before = rss()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from transformer.config import preset
    from transformer.model.models import EncoderDecoder
    from transformer.training.losses import label_smoothed_cross_entropy

    torch_mb = rss() - before
    model = EncoderDecoder(preset(name, vocab_size=8000))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())
    batch, length = 64, 32  # 2,048 tokens a side: a full batch of the recipe
    src, tgt = (torch.randint(4, 8000, (batch, length)) for _ in range(2))

    def step() -> None:
        loss, _, _ = label_smoothed_cross_entropy(model(src, tgt), tgt, 0.1, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # Adam's moments exist from here on
    resting = rss()
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak RSS starts again from now
    step()
    working = hwm() - resting

    class Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mm" in func.__name__ or "attention" in func.__name__:
                self.seen.add((func.__name__, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with Shapes() as shapes:  # the same shapes in any precision
        loss, _, _ = label_smoothed_cross_entropy(model(src, tgt), tgt, 0.1, 0)
        loss.backward()
    return {"preset": name, "parameters": params, "torch_import_mb": torch_mb,
            "parameters_mb": round(params * 4 / MB), "gradients_mb": round(params * 4 / MB),
            "adam_mb": round(2 * params * 4 / MB), "step_working_set_mb": working,
            "resident_between_steps_mb": resting, "matmul_shapes_per_step": len(shapes.seen)}


def batch_shapes(data: Path, epochs: int = 3) -> list[dict]:
    """Distinct (B, S, T) batch shapes over `epochs` epochs of the recipe's batches, and one epoch's padded
    positions (B·S + B·T), with lengths as they are and rounded up to multiples of 8 (the same batches)."""
    import numpy as np

    from transformer.text.data import TokenBatchSampler, read_lines
    from transformer.text.tokenizer import Tokenizer

    src, tgt = read_lines(data / "train.en"), read_lines(data / "train.de")
    tokenizer = Tokenizer.train((s for pair in zip(src, tgt) for s in pair), 8000)
    sampler = TokenBatchSampler([len(x) for x in tokenizer.encode(src)], [len(y) for y in tokenizer.encode(tgt)],
                                2048, seed=1)
    rows = []
    for rounding in (1, 8):
        def padded(lengths: np.ndarray) -> int:  # the batch's longest + EOS/BOS, rounded up
            return -(-(int(lengths.max()) + 1) // rounding) * rounding

        shapes = {(len(b), padded(sampler.src_lens[b]), padded(sampler.tgt_lens[b]))
                  for epoch in range(epochs) for b in sampler.arrays(epoch)}
        positions = sum(batch * (s + t) for batch, s, t in
                        ((len(b), padded(sampler.src_lens[b]), padded(sampler.tgt_lens[b])) for b in sampler.arrays(0)))
        rows.append({"round_to": rounding, "distinct_shapes": len(shapes), "epochs": epochs,
                     "padded_positions_epoch_0": positions})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--data", type=Path, default=MULTI30K)
    p.add_argument("--side-by-side", action="store_true", help="en-de and de-en at once, one thread each")
    p.add_argument("--breakdown", nargs="*", help="presets whose memory to break down (instead of training)")
    p.add_argument("--shapes", action="store_true", help="count Multi30k's distinct batch shapes (instead of training)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.shapes:
        for row in batch_shapes(args.data):
            print(json.dumps(row))
        return
    if args.child:
        print(json.dumps(breakdown(args.child)))
        return
    if args.breakdown:
        for name in args.breakdown:
            out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True)
            print(out.stdout.strip(), flush=True)
        return
    runs = [("en", "de"), ("de", "en")] if args.side_by_side else [("en", "de")]
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        samples = train(runs, args, Path(work))
        result = report(samples, args.steps)
    print(json.dumps({"preset": args.preset, "precision": args.precision, "steps": args.steps,
                      "processes": len(runs), "minutes": round((time.perf_counter() - start) / 60, 1), **result}))


if __name__ == "__main__":
    main()
