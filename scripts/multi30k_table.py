"""Print the Markdown results table of `scripts/multi30k.sh` from the files it wrote.

    python scripts/multi30k_table.py runs/multi30k
"""

import json
import sys
from pathlib import Path


def main(out: Path) -> None:
    print("| direction | model | search | sacreBLEU | chrF | training |")
    print("|---|---|---|---:|---:|---|")
    signatures = set()
    for run in sorted(p for p in out.iterdir() if (p / "train_seconds").exists()):
        minutes = int((run / "train_seconds").read_text()) / 60
        steps = json.loads((run / "config.json").read_text())["meta"]["best"]["step"]
        src, tgt = run.name.split("-")
        for model in ("best", "averaged"):
            for beam in (1, 4):
                path = run / f"test2016.{model}.beam{beam}.{tgt}.json"
                if not path.exists():
                    continue
                scores = json.loads(path.read_text())
                signatures.update(scores["signature"].values())
                label = f"best (step {steps})" if model == "best" else "average of last 5"
                search = "greedy" if beam == 1 else f"beam {beam}"
                print(f"| {src}→{tgt} | {label} | {search} | {scores['bleu']:.2f} | {scores['chrf']:.2f} | {minutes:.1f} min |")
    for signature in sorted(signatures):
        print(f"\n{signature}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/multi30k"))
