"""The choices and the results table of `scripts/multi30k.sh`, from the files it wrote.

    python scripts/multi30k_table.py runs/multi30k                        # the Markdown table
    python scripts/multi30k_table.py --pick RUN valid "avg5 avg10" 4 0.6   # the model with the best valid BLEU
    python scripts/multi30k_table.py --pick-search RUN avg5                # "BEAM ALPHA" best on valid

Every choice is made on the validation set; test2016 is only reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def scores(run: Path, split: str, model: str, beam: int | str, alpha: float | str) -> dict:
    """BLEU, chrF and signatures of a decode written by multi30k.sh (`model`: a folder name under `run`,
    or the run's own name for its best checkpoint)."""
    tgt = run.name.split("-")[1]
    return json.loads((run / f"{split}.{model}.beam{beam}.alpha{alpha}.{tgt}.json").read_text())


def pick(run: Path, split: str, models: str, beam: str, alpha: str) -> str:
    """The model among `models` with the highest BLEU on `split` (the first on a tie)."""
    names = models.split()
    return max(names, key=lambda m: (scores(run, split, m, beam, alpha)["bleu"], -names.index(m)))


def pick_search(run: Path, model: str) -> str:
    """"BEAM ALPHA" of the highest validation BLEU among beams 4, 8 and alphas 0.6, 1.0 (the first on a tie)."""
    options = [(beam, alpha) for alpha in ("0.6", "1.0") for beam in (4, 8)]
    best = max(options, key=lambda o: (scores(run, "valid", model, *o)["bleu"], -options.index(o)))
    return f"{best[0]} {best[1]}"


def table(out: Path) -> None:
    print("| direction | model | search | valid BLEU | test2016 BLEU | test2016 chrF | training |")
    print("|---|---|---|---:|---:|---:|---|")
    signatures = set()
    for run in sorted(p for p in out.iterdir() if (p / "chosen").exists()):
        avg, search = (run / "chosen").read_text().split("\n")[:2]
        beam, alpha = search.split()
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        steps = max(r["step"] for r in records)
        best_step = json.loads((run / "config.json").read_text())["meta"]["best"]["step"]
        minutes = int((run / "train_seconds").read_text()) / 60
        src, tgt = run.name.split("-")
        for model, label in ((run.name, f"best (step {best_step})"), (avg, f"average of last {avg[3:]}")):
            for b, a in (("1", "0.6"), (beam, alpha)):
                test = scores(run, "test2016", model, b, a)
                valid_file = run / f"valid.{model}.beam{b}.alpha{a}.{tgt}.json"
                valid = f"{json.loads(valid_file.read_text())['bleu']:.2f}" if valid_file.exists() else ""
                signatures.update(test["signature"].values())
                search_label = "greedy" if b == "1" else f"beam {b}, α {a}"
                print(f"| {src}→{tgt} | {label} | {search_label} | {valid} | {test['bleu']:.2f} | {test['chrf']:.2f} "
                      f"| {minutes:.1f} min, {steps} steps |")
    for signature in sorted(signatures):
        print(f"\n{signature}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pick"]:
        print(pick(Path(sys.argv[2]), *sys.argv[3:7]))
    elif sys.argv[1:2] == ["--pick-search"]:
        print(pick_search(Path(sys.argv[2]), sys.argv[3]))
    else:
        table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/multi30k"))
