"""The Multi30k ablations of the README: each lever against its reference, run for run, scored on the
validation set (never on a test set).

Each variant is one `transformer train` of a fixed number of steps, then four models scored on the full
validation set with beam 4 (alpha 0.6): the best checkpoint by greedy validation BLEU, the average of the
last 5 checkpoints (250 steps apart), of every other one of the last 10 (500 apart), and of the last 10.
A variant that changes the cost of a step (shape, batch size) gets the steps that take the same time on
the 2-core CPU of the README's table, measured there (`STEP_COST`).

    python scripts/multi30k_ablations.py --out runs/ablations                     # all variants, one at a time
    python scripts/multi30k_ablations.py --out runs/ablations --jobs 14 --device cuda   # all at once on a GPU
    python scripts/multi30k_ablations.py --out runs/ablations --only base d0.3   # some
    python scripts/multi30k_ablations.py --out runs/ablations --table            # the table of what is done

A killed variant resumes (`--resume`); a finished one is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "transformer" / "corpora" / "multi30k"
STEPS = 5500  # about what one core of the README's CPU trains in the hour (0.56 s a step alone)
# The recipe of scripts/multi30k.sh before the ablations, at STEPS steps.
BASE = ["--preset", "small", "--vocab-size", "8000", "--dropout", "0.1", "--max-tokens", "2048", "--warmup", "800",
        "--lr-scale", "0.7", "--valid-every", "250", "--keep-last", "10", "--seed", "1"]
# name: (reference variant, flags added to BASE). Later flags override earlier ones.
VARIANTS: dict[str, tuple[str | None, list[str]]] = {
    "base": (None, []),
    "d0.2": ("base", ["--dropout", "0.2"]),
    "d0.3": ("base", ["--dropout", "0.3"]),
    "d0.3-seed2": ("d0.3", ["--dropout", "0.3", "--seed", "2"]),  # the spread between seeds
    "d0.3-ls0.2": ("d0.3", ["--dropout", "0.3", "--label-smoothing", "0.2"]),
    "d0.3-attn0.1-act0.1": ("d0.3", ["--dropout", "0.3", "--attn-dropout", "0.1", "--act-dropout", "0.1"]),
    "d0.3-wd0.1": ("d0.3", ["--dropout", "0.3", "--weight-decay", "0.1"]),
    "d0.3-v4k": ("d0.3", ["--dropout", "0.3", "--vocab-size", "4000"]),
    "d0.3-v10k": ("d0.3", ["--dropout", "0.3", "--vocab-size", "10000"]),
    "d0.3-bpedrop0.1": ("d0.3", ["--dropout", "0.3", "--bpe-dropout", "0.1"]),
    "d0.3-prenorm": ("d0.3", ["--dropout", "0.3", "--norm-first"]),
    "d0.3-e6d2": ("d0.3", ["--dropout", "0.3", "--encoder-layers", "6", "--decoder-layers", "2"]),
    "d0.3-wide": ("d0.3", ["--dropout", "0.3", "--d-model", "512", "--d-ff", "2048", "--n-heads", "8"]),
    "d0.3-lr1.4": ("d0.3", ["--dropout", "0.3", "--lr-scale", "1.4"]),
    "d0.3-tok4k": ("d0.3", ["--dropout", "0.3", "--max-tokens", "4096"]),
}
# A step's time relative to BASE's on one core of the README's CPU (bf16), for equal-time variants.
# Measured with 1 thread, 60 steps each (Intel Xeon with AMX, bf16): BASE 0.56 s a step.
STEP_COST = {"d0.3-e6d2": 1.15, "d0.3-wide": 2.17, "d0.3-tok4k": 1.84, "d0.3-v4k": 0.85, "d0.3-v10k": 1.04}
AVERAGES = {"avg5": (5, 1), "avg5x500": (10, 2), "avg10": (10, 1)}  # name: (last n checkpoints, every k-th)


def planned(name: str) -> int:
    """The steps of variant `name`: STEPS, or as many as take the same time on the CPU (`STEP_COST`)."""
    return round(STEPS / STEP_COST.get(name, 1.0))


def cli(*args: str, device: str, log: Path) -> None:
    """`transformer ARGS`, its output appended to `log`."""
    cmd = [sys.executable, "-m", "transformer", *args]
    if args[0] in ("train", "translate"):
        cmd += ["--device", device, "--no-progress"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def valid_bleu(model: Path, run: Path, name: str, device: str, log: Path) -> float:
    """sacreBLEU of `model` on the whole validation set, beam 4, alpha 0.6."""
    hyp = run / f"valid.{name}.beam4.de"
    cli("translate", "--model", str(model), "--input", str(DATA / "valid.en"), "--output", str(hyp),
        "--beam", "4", "--alpha", "0.6", device=device, log=log)
    out = subprocess.run([sys.executable, "-m", "transformer", "evaluate", "--hyp", str(hyp),
                          "--ref", str(DATA / "valid.de"), "--json"], check=True, capture_output=True, text=True)
    return round(json.loads(out.stdout)["bleu"], 2)


def run_variant(name: str, out: Path, device: str) -> dict:
    """Train variant `name` (or resume it), score its models on the validation set; its result.json."""
    run, done = out / name, out / name / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    steps = planned(name)
    cli("train", "--data", str(DATA), "--out", str(run), "--resume", *BASE, *VARIANTS[name][1],
        "--max-steps", str(steps), device=device, log=out / f"{name}.log")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    train_s = max(r["elapsed_s"] for r in records if r["kind"] == "train")
    best = max(valid, key=lambda r: r["bleu"])
    result = {"name": name, "reference": VARIANTS[name][0], "flags": VARIANTS[name][1], "steps": steps,
              "train_minutes": round(train_s / 60, 1), "best_step": best["step"],
              "greedy": {r["step"]: round(r["bleu"], 2) for r in valid}, "beam4": {}}
    log = out / f"{name}.log"
    result["beam4"]["best"] = valid_bleu(run, run, "best", device, log)
    checkpoints = sorted((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for label, (n, every) in AVERAGES.items():
        chosen = checkpoints[-n:][::-1][::every]
        cli("average", *map(str, chosen), "--out", str(run / label), device=device, log=out / f"{name}.log")
        result["beam4"][label] = valid_bleu(run / label, run, label, device, log)
    done.write_text(json.dumps(result, indent=1))
    return result


def attempt(name: str, out: Path, device: str) -> dict:
    """`run_variant`, a failure reported (its log named) instead of raised, so that the others go on."""
    try:
        return run_variant(name, out, device)
    except subprocess.CalledProcessError as e:
        return {"name": name, "failed": f"{e.cmd[3]} exited {e.returncode}; see {out / name}.log"}


def curve(run: Path) -> dict[int, float]:
    """Greedy validation BLEU at each validation of a run (its log.jsonl), by step."""
    records = (json.loads(line) for line in (run / "log.jsonl").read_text().splitlines())
    return {r["step"]: r["bleu"] for r in records if r["kind"] == "valid"}


def summary(c: dict[int, float], upto: float = float("inf")) -> tuple[float, float]:
    """The best BLEU of curve `c` and the mean of its last 5 validations, counting steps <= `upto`."""
    points = [b for step, b in sorted(c.items()) if step <= upto]
    return max(points), sum(points[-5:]) / len(points[-5:])


def table(out: Path) -> None:
    """Markdown: each variant's greedy validation BLEU (whole validation set, at each checkpoint) and its change
    against its reference: the best checkpoint, and the mean of the last 5 (steadier); beam 4 where scored.
    A variant stopped short is compared with its reference at the same point of the hour."""
    curves = {n: curve(out / n) for n in VARIANTS if (out / n / "log.jsonl").exists()}
    print("| variant | against | steps | best | Δ best | mean of last 5 | Δ mean | beam 4, avg 5 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, c in curves.items():
        last, ref = max(c), VARIANTS[name][0]
        best, mean = summary(c)
        steps = f"{last}" if last >= planned(name) else f"{last} of {planned(name)}"
        delta = ("", "")
        if ref in curves:
            ref_best, ref_mean = summary(curves[ref], upto=last * planned(ref) / max(last, planned(name)))
            delta = (f"{best - ref_best:+.2f}", f"{mean - ref_mean:+.2f}")
        result = out / name / "result.json"
        beam = f"{json.loads(result.read_text())['beam4']['avg5']:.2f}" if result.exists() else ""
        print(f"| {name} | {ref or ''} | {steps} | {best:.2f} | {delta[0]} | {mean:.2f} | {delta[1]} | {beam} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at the same time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", action="store_true", help="only print the table of the finished variants")
    args = p.parse_args()
    if not args.table:
        names = args.only or list(VARIANTS)
        with ThreadPoolExecutor(args.jobs) as pool:
            for result in pool.map(lambda n: attempt(n, args.out, args.device), names):
                print(json.dumps(result), flush=True)
    table(args.out)


if __name__ == "__main__":
    main()
