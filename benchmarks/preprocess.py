"""A WMT14-sized corpus: `transformer preprocess` into binary shards, then `train --data-bin` from it.

Peers (issue 17):
  * preprocess: sentencepiece's own batch `encode` of the same corpus's lines (a sample of them) in this
    process on one thread, already in memory: the physical limit of one process; × workers for N workers.
  * train --data-bin: `transformer train` from text, on Multi30k (the step-rate reference) and on a
    smaller synthetic corpus (where reading it into lists still fits).

The corpus: `--pairs` pairs (WMT14 en-de has 4.5M), each made of the first half of a random Multi30k
training pair and the second half of another (on both sides), so that lines differ while lengths stay
Multi30k's; Multi30k's valid set for validation. It is built in a temporary folder, deleted at the end
(`--work DIR` keeps it, to run the two parts in two commands).

Every measured command runs in a child process of its own (`--child`), which reports its wall time, the
moment its first training step ended, its peak resident memory at step 100 and at the end (getrusage
ru_maxrss of the process; its encoding workers' separately) and the log's target tokens/s.

Usage:
  flock /tmp/cpu.lock python benchmarks/preprocess.py --pairs 4500000 --part preprocess --work /tmp/bench17
  flock /tmp/cpu.lock python benchmarks/preprocess.py --pairs 4500000 --part train --work /tmp/bench17
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MULTI30K = Path(__file__).resolve().parents[1] / "src" / "transformer" / "corpora" / "multi30k"
TRAIN = ["--preset", "small", "--max-tokens", "2048", "--max-steps", "100", "--log-every", "50", "--warmup", "400",
         "--valid-every", "1000", "--valid-bleu-lines", "50", "--precision", "fp32", "--no-progress", "--seed", "1"]


def _halves(path: Path) -> tuple[list[str], list[str]]:
    words = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    return [" ".join(w[: len(w) // 2]) for w in words], [" ".join(w[len(w) // 2 :]) for w in words]


def make_corpus(root: Path, pairs: int, seed: int = 0) -> None:
    """train.{en,de}: `pairs` recombined Multi30k pairs; valid.{en,de}: Multi30k's."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    halves = {lang: _halves(MULTI30K / f"train.{lang}") for lang in ("en", "de")}
    n = len(halves["en"][0])
    with open(root / "train.en", "w", encoding="utf-8") as en, open(root / "train.de", "w", encoding="utf-8") as de:
        for start in range(0, pairs, 100_000):
            size = min(100_000, pairs - start)
            first, second = rng.integers(0, n, size).tolist(), rng.integers(0, n, size).tolist()
            for f, lang in ((en, "en"), (de, "de")):
                head, tail = halves[lang]
                f.write("".join(f"{head[a]} {tail[b]}\n".lstrip() for a, b in zip(first, second)))
    for lang in ("en", "de"):
        shutil.copy(MULTI30K / f"valid.{lang}", root / f"valid.{lang}")


def child(args: list[str]) -> None:
    """Run the command `args` in this process; print what it measured as JSON on the last line of stdout."""
    start = time.perf_counter()
    from transformer.cli import main
    from transformer.training import loop

    marks: dict = {}
    step_once = loop.Trainer.step_once

    def timed_step(self):
        result = step_once(self)
        if self.step == 1:
            marks["first_step_s"] = time.perf_counter() - start
        if self.step == 100:
            marks["peak_mb_at_step_100"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    loop.Trainer.step_once = timed_step
    code = main(args)
    marks |= {"code": code, "wall_s": time.perf_counter() - start,
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    print(json.dumps(marks))


def measure(args: list[str]) -> dict:
    """The child's report, with its stderr's last lines; fails loudly if the command failed."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        sys.exit(f"{' '.join(args)}: exit {report['code']}:\n{done.stderr[-3000:]}")
    report["stderr"] = done.stderr
    return report


def raw_encode_rate(folder: Path, corpus: Path, sentences: int, threads: int = 1) -> float:
    """Sentences/s of sentencepiece's batch encode on `threads` threads, in this process, on the corpus's first
    `sentences` // 2 pairs (both sides), already in memory, in batches of 10,000 lines as the workers get them."""
    from transformer.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(folder / "tokenizer.model")
    lines = []
    for lang in ("en", "de"):
        with open(corpus / f"train.{lang}", encoding="utf-8") as f:
            lines += [next(f).strip() for _ in range(sentences // 2)]
    start = time.perf_counter()
    for k in range(0, len(lines), 10_000):
        tokenizer.encode_arrays(lines[k : k + 10_000], threads=threads)
    return len(lines) / (time.perf_counter() - start)


def _split_rate(stderr: str) -> tuple[float, float]:
    """(seconds, pairs/s) of the train split, from preprocess's "train: ... (S s, R pairs/s)" line."""
    found = re.search(r"^train: .*\(([\d.]+) s, ([\d,]+) pairs/s\)", stderr, re.MULTILINE)
    return float(found.group(1)), float(found.group(2).replace(",", ""))


def part_preprocess(work: Path, pairs: int, sample: int) -> None:
    corpus, folder = work / "corpus", work / "bin"
    if not (corpus / "train.de").exists():
        t = time.perf_counter()
        make_corpus(corpus, pairs)
        print(f"corpus: {pairs:,} pairs, {sum(f.stat().st_size for f in corpus.iterdir()) / 1e6:.0f} MB "
              f"({time.perf_counter() - t:.0f} s)")
    base = ["preprocess", "--data", str(corpus), "--out", str(folder)]
    model = work / "tokenizer.model"
    if not model.exists():  # (kept by an earlier run with the same --work)
        first = measure([*base, "--workers", "2"])  # trains the vocabulary: 2M-sentence sample, 8000 pieces
        shutil.copy(folder / "tokenizer.model", model)
        print(f"with vocabulary training, 2 workers: {first['wall_s']:.1f} s wall; "
              + next(x for x in first["stderr"].splitlines() if x.startswith("tokenizer.model")))
    print("| workers | preprocess wall (s) | train split (s) | sentences/s | raw encode 1 thread × workers | ratio "
          "| raw encode, `workers` threads | ratio | peak MB (main / largest worker) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers in (1, 2):
        # Before and after, averaged: the machine is shared.
        raw = [raw_encode_rate(folder, corpus, sample), raw_encode_rate(folder, corpus, sample, workers)]
        run = measure([*base, "--tokenizer-model", str(model), "--workers", str(workers)])
        raw = [(r + raw_encode_rate(folder, corpus, sample, t)) / 2 for r, t in zip(raw, (1, workers))]
        seconds, pair_rate = _split_rate(run["stderr"])
        rate = 2 * pair_rate
        print(f"| {workers} | {run['wall_s']:.1f} | {seconds:.1f} | {rate:,.0f} | {raw[0] * workers:,.0f} | "
              f"{rate / (raw[0] * workers):.2f} | {raw[1]:,.0f} | {rate / raw[1]:.2f} | "
              f"{run['peak_mb']:.0f} / {run['workers_peak_mb']:.0f} |", flush=True)
    print(f"folder: {sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.0f} MB")


def part_train(work: Path, small_pairs: int, repeats: int) -> None:
    corpus, folder = work / "corpus", work / "bin"
    small = work / "small"
    if small_pairs and not (small / "train.de").exists():
        small.mkdir(exist_ok=True)
        for lang in ("en", "de"):
            with open(corpus / f"train.{lang}", encoding="utf-8") as f, open(small / f"train.{lang}", "w") as g:
                g.writelines(next(f) for _ in range(small_pairs))
            shutil.copy(corpus / f"valid.{lang}", small / f"valid.{lang}")
    pairs = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["pairs"]
    from transformer.text.shards import DataFolder

    start = time.perf_counter()
    DataFolder.open(folder)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"opening the folder ({size / 1e6:.0f} MB), every size and sha256 checked: "
          f"{time.perf_counter() - start:.2f} s", flush=True)
    runs = [(f"--data-bin, {pairs:,} pairs", ["--data-bin", str(folder)]),
            ("text, Multi30k (29,000 pairs)", ["--data", str(MULTI30K)])] * repeats  # in turn: the machine is shared
    runs += [(f"text, {small_pairs:,} synthetic pairs", ["--data", str(small)])] if small_pairs else []
    print("| training from | first step after (s) | peak MB at step 100 | target tok/s (steps 51-100) |")
    print("|---|---:|---:|---:|")
    for name, data in runs:
        out = Path(tempfile.mkdtemp(dir=work))
        run = measure(["train", *data, "--out", str(out / "run"), *TRAIN])
        log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
        rate = next(r["tokens_per_s"] for r in log if r.get("step") == 100 and r["kind"] == "train")
        print(f"| {name} | {run['first_step_s']:.1f} | {run['peak_mb_at_step_100']:.0f} | {rate:,.0f} |", flush=True)
        shutil.rmtree(out)


def part_fetch(work: Path, batches: int = 300) -> None:
    """Making a training batch (ids to padded tensors, `tasks.translation._to_device`): from the folder's memory
    maps against from Multi30k's lists of ids, in this process, in turn, `batches` of each."""
    import statistics

    import torch

    from transformer.tasks.translation import EpochBatches, TranslationConfig, _load_bin, _load_corpus, _to_device
    from transformer.text.shards import DataFolder
    from transformer.text.tokenizer import Tokenizer
    from transformer.training.loop import LoopConfig

    cfg = TranslationConfig(None, None, None, None, LoopConfig(out=work / "unused"), max_tokens=2048)
    folder = DataFolder.open(work / "bin")
    quiet = lambda _: None  # noqa: E731
    tokenizer = Tokenizer.load(folder.tokenizer_paths()[0])
    peers = {"--data-bin (memory maps)": _load_bin(folder, "train", 1024, cfg, True, quiet),
             "text Multi30k (lists)": _load_corpus(MULTI30K / "train.en", MULTI30K / "train.de", tokenizer, 1024, cfg,
                                                   True, quiet)}
    order = {name: EpochBatches(corpus.sampler) for name, corpus in peers.items()}
    times: dict = {name: [] for name in peers}
    tokens: dict = {name: [] for name in peers}
    for i in range(batches):
        for name, corpus in peers.items():
            start = time.perf_counter()
            _, _, tgt_out = _to_device(corpus, order[name][i], torch.device("cpu"))
            times[name].append(time.perf_counter() - start)
            tokens[name].append(int((tgt_out != 0).sum()))
    print("| batches from | median ms per batch | target tokens per batch (mean) |")
    print("|---|---:|---:|")
    for name in peers:
        print(f"| {name} | {1e3 * statistics.median(times[name]):.2f} | {statistics.mean(tokens[name]):.0f} |")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4_500_000, help="pairs of the synthetic corpus")
    p.add_argument("--part", choices=["preprocess", "train", "fetch", "all"], default="all")
    p.add_argument("--work", help="keep the corpus and the data folder here (default: a temporary folder)")
    p.add_argument("--sample", type=int, default=1_000_000, help="sentences of the raw encode measurement")
    p.add_argument("--small-pairs", type=int, default=290_000,
                   help="pairs of the text-training comparison on synthetic data (0: leave it out)")
    p.add_argument("--repeats", type=int, default=1, help="runs of --data-bin and of text Multi30k, in turn")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        if args.part in ("preprocess", "all"):
            part_preprocess(work, args.pairs, args.sample)
        if args.part in ("train", "all"):
            part_train(work, args.small_pairs, args.repeats)
        if args.part in ("fetch", "all"):
            part_fetch(work)
    finally:
        if not args.work:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
