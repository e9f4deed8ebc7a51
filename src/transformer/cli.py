"""The `transformer` command line: a thin layer over the library.

Every flag is declared here, once, with its help text. A `UserError` from the
library is printed as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .config import PRESETS, preset
from .errors import UserError


def _params(args: argparse.Namespace) -> None:
    from .models import build_model, count_parameters

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    cfg = preset(args.preset, **overrides)
    counts = count_parameters(build_model(cfg))
    if args.json:
        print(json.dumps({"preset": args.preset, "vocab_size": cfg.vocab_size, **counts}, indent=2))
        return
    print(f"preset {args.preset}: arch {cfg.arch}, vocab {cfg.vocab_size}, d_model {cfg.d_model}, "
          f"heads {cfg.n_heads}, d_ff {cfg.d_ff}, layers {cfg.n_encoder_layers}+{cfg.n_decoder_layers}, "
          f"tied embeddings {cfg.tie_embeddings}")
    for name, n in counts.items():
        print(f"  {name:<22} {n:>14,}")


def _model_config(args: argparse.Namespace):
    """The preset named by --preset with the model flags the user gave applied."""
    overrides = {
        field: getattr(args, field)
        for field in ("d_model", "n_heads", "d_ff", "dropout", "max_len", "attn_window", "positions")
        if getattr(args, field) is not None
    }
    if args.layers is not None:
        overrides |= {"n_encoder_layers": args.layers, "n_decoder_layers": args.layers}
    if args.norm_first:
        overrides["norm_first"] = True
    return preset(args.preset, **overrides)


def _train_config(args: argparse.Namespace):
    from .train import TrainConfig

    if args.data is not None:
        data = Path(args.data)
        paths = {
            "train_src": data / f"train.{args.src}", "train_tgt": data / f"train.{args.tgt}",
            "valid_src": data / f"valid.{args.src}", "valid_tgt": data / f"valid.{args.tgt}",
        }
    else:
        paths = {k: getattr(args, k) for k in ("train_src", "train_tgt", "valid_src", "valid_tgt")}
        missing = [f"--{k.replace('_', '-')}" for k, v in paths.items() if v is None]
        if missing:
            raise UserError(f"give --data DIR (with --src/--tgt), or all of {', '.join(missing)}")
    return TrainConfig(
        **{k: Path(v) for k, v in paths.items()},
        out=Path(args.out), vocab_size=args.vocab_size, tokenizer_type=args.tokenizer,
        max_tokens=args.max_tokens, update_freq=args.update_freq, max_steps=args.max_steps,
        max_epochs=args.max_epochs, max_minutes=args.max_minutes, warmup=args.warmup, lr_scale=args.lr_scale,
        label_smoothing=args.label_smoothing, clip_norm=args.clip_norm, seed=args.seed,
        precision=args.precision, device=args.device, valid_every=args.valid_every,
        valid_bleu_lines=args.valid_bleu_lines, keep_last=args.keep_last, log_every=args.log_every,
        resume=args.resume, progress=not args.no_progress,
    )


def _train(args: argparse.Namespace) -> None:
    from .train import train

    train(_train_config(args), _model_config(args), say=_say)


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def _search_config(args: argparse.Namespace):
    from .decode import SearchConfig

    return SearchConfig(
        beam=args.beam, alpha=args.alpha, max_len_a=args.max_len_a, max_len_b=args.max_len_b, min_len=args.min_len
    )


def _load(args: argparse.Namespace):
    from .checkpoint import load_model_dir
    from .translate import resolve_device

    return load_model_dir(Path(args.model), resolve_device(args.device))


def _read_input(path: str | None) -> tuple[list[str], str]:
    from .data import read_lines

    if path is None or path == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"stdin: invalid UTF-8 at byte {e.start}") from None
        lines = [line.rstrip("\r") for line in text.split("\n")]
        return lines[:-1] if lines[-1] == "" else lines, "stdin"
    return read_lines(path), path


def _translate_text(args: argparse.Namespace, lines: list[str], name: str) -> list[str]:
    from .translate import translate_lines

    model, _, tokenizer, _ = _load(args)
    if args.precision != "fp32" or args.quantize != "none" or args.compile:
        from .decode import DecodingModel

        try:
            model = DecodingModel(
                model, precision=args.precision, quantize=None if args.quantize == "none" else args.quantize,
                compile=args.compile,
            )
        except ValueError as e:
            raise UserError(str(e)) from None
    return translate_lines(
        model, tokenizer, lines, _search_config(args), args.batch_size, progress=not args.no_progress, source_name=name
    )


def _translate(args: argparse.Namespace) -> None:
    lines, name = _read_input(args.input)
    text = "".join(h + "\n" for h in _translate_text(args, lines, name))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not at exit


def _evaluate(args: argparse.Namespace) -> None:
    from .data import read_lines
    from .evaluate import score

    refs = read_lines(args.ref)
    if args.hyp is not None:
        hyps = read_lines(args.hyp)
    elif args.model is not None and args.src is not None:
        hyps = _translate_text(args, read_lines(args.src), args.src)
    else:
        raise UserError("give --hyp FILE, or --model DIR with --src FILE")
    scores = score(hyps, refs)
    print(json.dumps(scores.to_json()) if args.json else scores)


def _average(args: argparse.Namespace) -> None:
    from .checkpoint import write_average

    write_average([Path(p) for p in args.models], Path(args.out))
    print(f"averaged {len(args.models)} checkpoints into {args.out}", file=sys.stderr)


def _plot(args: argparse.Namespace) -> None:
    from .plots import plot_training

    for path in plot_training(Path(args.run), Path(args.out) if args.out else None):
        print(path)


def _attention(args: argparse.Namespace) -> None:
    from .decode import SearchConfig
    from .plots import plot_attention
    from .translate import attention_maps

    model, _, tokenizer, _ = _load(args)
    maps = attention_maps(model, tokenizer, args.src, args.tgt, SearchConfig(beam=args.beam, alpha=args.alpha))
    out = Path(args.out) if args.out else Path(args.model) / "attention"
    views = {  # kind (and file name): (title, query tokens, key tokens)
        "encoder": ("encoder self-attention", maps.src, maps.src),
        "decoder": ("decoder self-attention (causal)", maps.tgt_out, maps.tgt_in),
        "cross": ("encoder-decoder attention", maps.tgt_out, maps.src),
    }
    paths = [
        plot_attention(w, keys, queries, f"{title}, layer {layer}", out / f"{kind}_layer{layer}.png")
        for kind, (title, queries, keys) in views.items()
        for layer, w in enumerate(maps.weights[kind], start=1)
    ]
    print(f"translation: {maps.translation}")
    print("\n".join(map(str, paths)))


def _quickstart(args: argparse.Namespace) -> None:
    """Train a small en->de model on the bundled Multi30k, then score it on test2016."""
    from .checkpoint import load_model_dir
    from .corpora import multi30k_dir
    from .data import read_lines
    from .decode import SearchConfig
    from .evaluate import score
    from .train import TrainConfig, train
    from .translate import resolve_device, translate_lines

    data = multi30k_dir()
    cfg = TrainConfig(
        train_src=data / "train.en", train_tgt=data / "train.de",
        valid_src=data / "valid.en", valid_tgt=data / "valid.de", out=Path(args.out),
        vocab_size=8000, max_tokens=2048, warmup=400, lr_scale=0.5, max_minutes=args.minutes,
        valid_every=250, valid_bleu_lines=300, keep_last=3, resume=args.resume, device=args.device,
    )
    start = time.perf_counter()
    run = train(cfg, preset("small"), say=_say)
    model, _, tokenizer, meta = load_model_dir(run, resolve_device(cfg.device))
    src, ref = read_lines(data / "test2016.en"), read_lines(data / "test2016.de")
    hyps = translate_lines(model, tokenizer, src, SearchConfig(beam=4, alpha=0.6), batch_size=64, progress=True)
    print(f"Multi30k test2016 en->de, best checkpoint (step {meta['best']['step']}), beam 4:")
    print(score(hyps, ref))
    for s, h in list(zip(src, hyps))[:5]:
        print(f"  EN: {s}\n  DE: {h}")
    print(f"total time {(time.perf_counter() - start) / 60:.1f} min; model in {run}")


def _model_flags(p: argparse.ArgumentParser, preset_default: str) -> None:
    """The model flags of every training command: a preset and overrides of its fields."""
    model = p.add_argument_group("model")
    model.add_argument("--preset", default=preset_default, help=f"one of: {', '.join(PRESETS)}")
    model.add_argument("--d-model", type=int, help="override the preset's d_model")
    model.add_argument("--n-heads", type=int, help="override the preset's number of heads")
    model.add_argument("--d-ff", type=int, help="override the preset's FFN width")
    model.add_argument("--layers", type=int, help="override the preset's depth (encoder and decoder)")
    model.add_argument("--dropout", type=float, help="override the preset's dropout")
    model.add_argument("--max-len", type=int, help="longest sequence in tokens")
    model.add_argument("--attn-window", type=int, help="restricted self-attention radius r")
    model.add_argument("--norm-first", action="store_true", help="pre-norm blocks instead of the paper's post-norm")
    model.add_argument("--positions", choices=["sinusoidal", "learned"], help="override the preset's positions")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer",
        description="The Transformer of 'Attention Is All You Need': train, translate, evaluate, inspect.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    def model_dir_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def search_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy")
        p.add_argument("--alpha", type=float, default=0.6, help="length penalty ((5+|Y|)/6)^alpha")
        p.add_argument("--max-len-a", type=float, default=1.0, help="max output length = a*|source| + b")
        p.add_argument("--max-len-b", type=int, default=50, help="max output length = a*|source| + b")
        p.add_argument("--min-len", type=int, default=0, help="no end of sentence before this many tokens")
        p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
        p.add_argument("--quantize", default="none", choices=["none", "int8"],
                       help="int8: dynamic int8 quantization of the linear layers (CPU; faster at large batches)")
        p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                       help="weights for decoding (bf16 is slow on CPUs without native bf16)")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow start; falls back to eager if it fails)")

    p = command("params", _params, "Print parameter counts per component and in total.")
    p.add_argument("--preset", default="base", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = command("train", _train, "Train a translation model on parallel text files.")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="folder with train.SRC, train.TGT, valid.SRC, valid.TGT")
    data.add_argument("--src", default="en", help="source language suffix, with --data")
    data.add_argument("--tgt", default="de", help="target language suffix, with --data")
    for name in ("train-src", "train-tgt", "valid-src", "valid-tgt"):
        data.add_argument(f"--{name}", help=f"{name.replace('-', ' ')} file (instead of --data)")
    data.add_argument("--vocab-size", type=int, default=8000, help="joint vocabulary size")
    data.add_argument("--tokenizer", default="bpe", choices=["bpe", "unigram"], help="sentencepiece model type")
    p.add_argument("--out", required=True, help="run directory (the best model is written at its top)")
    _model_flags(p, "small")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    opt.add_argument("--update-freq", type=int, default=1, help="batches accumulated per optimiser step")
    opt.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    opt.add_argument("--max-epochs", type=int, help="stop after this many epochs")
    opt.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time")
    opt.add_argument("--warmup", type=int, default=4000, help="warm-up steps of the learning-rate schedule")
    opt.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the paper's learning rate")
    opt.add_argument("--label-smoothing", type=float, default=0.1, help="epsilon of label smoothing")
    opt.add_argument("--clip-norm", type=float, help="clip the gradient norm to this value")
    opt.add_argument("--seed", type=int, default=1, help="random seed")
    opt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                     help="auto = bf16 autocast on a GPU with native bf16, else fp32 (bf16 on a CPU: ask for it)")
    run = p.add_argument_group("run")
    run.add_argument("--valid-every", type=int, default=1000, help="steps between validations and checkpoints")
    run.add_argument("--valid-bleu-lines", type=int, help="decode only the first N validation lines for BLEU")
    run.add_argument("--keep-last", type=int, default=5, help="checkpoints kept")
    run.add_argument("--log-every", type=int, default=50, help="steps between log records")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    model_dir_flags(run)

    p = command("translate", _translate, "Translate sentences from stdin (or --input) to stdout (or --output).")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--input", help="input file, one sentence per line (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    search_flags(p)
    model_dir_flags(p)

    p = command("evaluate", _evaluate, "Score translations with sacreBLEU and chrF (and print the signatures).")
    p.add_argument("--ref", required=True, help="reference translations, one per line")
    p.add_argument("--hyp", help="hypotheses to score, one per line")
    p.add_argument("--model", help="model directory: translate --src first")
    p.add_argument("--src", help="source sentences to translate with --model")
    p.add_argument("--json", action="store_true", help='print {"bleu", "chrf", "signature"} as JSON')
    search_flags(p)
    model_dir_flags(p)

    p = command("average", _average, "Average the weights of checkpoints (the paper averages the last 5).")
    p.add_argument("models", nargs="+", help="model or checkpoint directories")
    p.add_argument("--out", required=True, help="model directory to write")

    p = command("plot", _plot, "Write PNG training curves (loss, validation BLEU, learning rate).")
    p.add_argument("run", help="run directory holding log.jsonl")
    p.add_argument("--out", help="PNG file to write (default: RUN/curves.png)")

    p = command("attention", _attention,
                "Draw PNG heatmaps of encoder, decoder and cross-attention, per layer and head, for one sentence.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--src", required=True, help="source sentence")
    p.add_argument("--tgt", help="target sentence to attend over (default: the model's translation)")
    p.add_argument("--out", help="folder for the PNG files (default: MODEL/attention)")
    p.add_argument("--beam", type=int, default=4, help="beam size of the translation; 1 = greedy")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty ((5+|Y|)/6)^alpha")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = command("quickstart", _quickstart,
                "Train a small English->German model on the bundled Multi30k, then score it on test2016.")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument("--resume", action="store_true", help="continue a previous quick start")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _language_model_commands(sub)
    return parser


def _loop_config(args: argparse.Namespace):
    from .train import LoopConfig

    return LoopConfig(
        out=Path(args.out), max_steps=args.max_steps, max_minutes=args.max_minutes, lr=args.lr,
        schedule=args.schedule, warmup=args.warmup, decay_steps=args.decay_steps, min_lr=args.min_lr,
        weight_decay=args.weight_decay, beta2=args.beta2, clip_norm=args.clip_norm or None, seed=args.seed,
        precision=args.precision, device=args.device, valid_every=args.valid_every, keep_last=args.keep_last,
        log_every=args.log_every, resume=args.resume, progress=not args.no_progress,
    )


def _lm_train(args: argparse.Namespace) -> None:
    from .lm import LMConfig, train_lm

    cfg = LMConfig(
        text=Path(args.text), loop=_loop_config(args), vocab=args.vocab, vocab_size=args.vocab_size,
        valid_fraction=args.valid_fraction, block_size=args.block_size, batch_size=args.batch_size,
        eval_batches=args.eval_batches,
    )
    train_lm(cfg, _model_config(args), say=_say)


def _lm_sample(args: argparse.Namespace) -> None:
    from .lm import generate

    model, cfg, tokenizer, _ = _load(args)
    if cfg.arch != "decoder":
        raise UserError(f"{args.model}: not a decoder-only language model (arch {cfg.arch!r})")
    prompt = args.prompt.encode("utf-8").decode("unicode_escape") if args.escapes else args.prompt
    text = generate(model, tokenizer, prompt, args.tokens, args.temperature, args.top_k, args.top_p, args.seed)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _mlm_train(args: argparse.Namespace) -> None:
    from .mlm import MLMConfig, train_mlm

    cfg = MLMConfig(
        text=Path(args.text), loop=_loop_config(args), valid=Path(args.valid) if args.valid else None,
        vocab_size=args.vocab_size, batch_size=args.batch_size, max_len=args.max_len or 128,
        mask_prob=args.mask_prob,
    )
    train_mlm(cfg, _model_config(args).replace(max_len=cfg.max_len), say=_say)


def _mlm_fill(args: argparse.Namespace) -> None:
    from .mlm import fill

    model, cfg, tokenizer, _ = _load(args)
    if cfg.arch != "encoder":
        raise UserError(f"{args.model}: not a BERT-style encoder (arch {cfg.arch!r})")
    for n, fillers in enumerate(fill(model, tokenizer, args.text, args.top_k), 1):
        print(f"[MASK] {n}: " + "  ".join(f"{word or '∅'} {p:.3f}" for word, p in fillers))


def _language_model_commands(sub) -> None:
    """`transformer lm {train,sample}` (GPT-style) and `transformer mlm {train,fill}` (BERT-style)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    def group(name: str, help: str):
        p = sub.add_parser(name, help=help, description=help, formatter_class=fmt)
        return p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    def command(subs, name: str, func, help: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help, formatter_class=fmt)
        p.set_defaults(func=func)
        return p

    def train_flags(p: argparse.ArgumentParser, preset_default: str, lr: float, warmup: int, beta2: float) -> None:
        p.add_argument("--text", required=True, help="training text (UTF-8)")
        p.add_argument("--out", required=True, help="run directory (the best model is written at its top)")
        _model_flags(p, preset_default)
        opt = p.add_argument_group("optimisation (AdamW, warm-up, then a schedule)")
        opt.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
        opt.add_argument("--max-minutes", type=float, help="stop after this much wall-clock time (whole run)")
        opt.add_argument("--lr", type=float, default=lr, help="peak learning rate")
        opt.add_argument("--schedule", default="cosine", choices=["cosine", "constant", "inverse-sqrt"],
                         help="after warm-up: cosine decay to --min-lr, constant, or the paper's inverse sqrt")
        opt.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps")
        opt.add_argument("--decay-steps", type=int, help="cosine: step where --min-lr is reached (default: --max-steps)")
        opt.add_argument("--min-lr", type=float, help="cosine: final learning rate (default: --lr / 10)")
        opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the matrices")
        opt.add_argument("--beta2", type=float, default=beta2, help="Adam beta2")
        opt.add_argument("--clip-norm", type=float, default=1.0, help="clip the gradient norm (0 = off)")
        opt.add_argument("--seed", type=int, default=1, help="random seed")
        opt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                         help="auto = bf16 autocast on a GPU with native bf16, else fp32 (bf16 on a CPU: ask for it)")
        run = p.add_argument_group("run")
        run.add_argument("--valid-every", type=int, default=250, help="steps between validations and checkpoints")
        run.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
        run.add_argument("--log-every", type=int, default=50, help="steps between log records")
        run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
        model_dir_flags(run)

    def model_dir_flags(p) -> None:
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    lm = group("lm", "GPT-style decoder-only language model: train on a text file, sample from it.")
    p = command(lm, "train", _lm_train, "Train a decoder-only language model on a text file.")
    train_flags(p, "small", lr=1e-3, warmup=100, beta2=0.99)
    data = p.add_argument_group("data")
    data.add_argument("--vocab", default="char", choices=["char", "bpe"], help="one token per character, or BPE")
    data.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size (with --vocab bpe)")
    data.add_argument("--valid-fraction", type=float, default=0.1, help="the last part of the text held out")
    data.add_argument("--block-size", type=int, default=64, help="context length in tokens")
    data.add_argument("--batch-size", type=int, default=12, help="windows per optimiser step")
    data.add_argument("--eval-batches", type=int, default=50, help="validation batches (fixed) per evaluation")
    p = command(lm, "sample", _lm_sample, "Continue a prompt with a trained language model.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--escapes", action="store_true", help="interpret backslash escapes such as \\n in --prompt")
    p.add_argument("--tokens", type=int, default=500, help="number of tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (1 = greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the most likely tokens with mass p")
    p.add_argument("--seed", type=int, default=1, help="random seed (the same seed gives the same text)")
    model_dir_flags(p)

    mlm = group("mlm", "BERT-style encoder-only masked language model: train on sentences, fill in [MASK].")
    p = command(mlm, "train", _mlm_train, "Train a masked language model on a text file, one sentence per line.")
    train_flags(p, "small", lr=5e-4, warmup=200, beta2=0.98)
    data = p.add_argument_group("data")
    data.add_argument("--valid", help="validation sentences (default: the last 5%% of --text)")
    data.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size")
    data.add_argument("--batch-size", type=int, default=128, help="sentences per optimiser step")
    data.add_argument("--mask-prob", type=float, default=0.15, help="share of the tokens chosen for prediction")
    p = command(mlm, "fill", _mlm_fill, "Print the most likely fillers of each [MASK] in a sentence.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("text", help='a sentence with [MASK], e.g. "a man [MASK] a horse ."')
    p.add_argument("--top-k", type=int, default=5, help="fillers printed per [MASK]")
    model_dir_flags(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"transformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
