"""`transformer translation VERB`: train, translate, evaluate, attention, quickstart.

Translation is the default task: `transformer train ...` is `transformer translation train ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transformer.cli import flags, preprocess
from transformer.cli import serve as serving
from transformer.cli.common import command, needs_extra, number, say, writable_file, writable_folder
from transformer.errors import UserError

# The paper's recipe (section 5).
TRAIN_DEFAULTS = dict(schedule="inverse-sqrt", warmup=4000, beta2=0.98, adam_eps=1e-9, weight_decay=0.0,
                      valid_every=1000, keep_last=5)
# Named recipes (--recipe): flag values under --config's and the command line's. "small-data": the best of an
# hour of a 2-core CPU on about 30k pairs, chosen by the Multi30k ablations on the validation set (docs/results.md,
# "Multi30k results"; scripts/multi30k_ablations.py).
RECIPES = {
    "small-data": dict(preset="small", vocab_size=8000, dropout=0.2, max_tokens=2048, warmup=800, lr_scale=0.7,
                       max_steps=5500, max_minutes=60.0, valid_every=250, keep_last=10),
}
# "quickstart": `transformer quickstart`'s 10 minutes, about 600 updates on a 2-core AVX2 CPU, where the hour's
# dropout 0.2 and 800 warm-up updates (the peak learning rate only at update 800) learn too slowly. Chosen on
# Multi30k's validation set at update 500 (300 lines, AMD EPYC, fp32; docs/getting-started.md): BLEU 21.05 with
# dropout 0.1 and 400 warm-up updates, 15.67 with small-data's settings, 9.72 with dropout 0.1 and 200.
RECIPES["quickstart"] = RECIPES["small-data"] | dict(dropout=0.1, warmup=400, max_minutes=10.0, keep_last=3)


def _train_config(args: argparse.Namespace):
    from transformer.tasks.translation import TranslationConfig

    if args.data_bin is not None:  # a preprocessed folder: its files and tokenizer
        paths = dict.fromkeys(("train_src", "train_tgt", "valid_src", "valid_tgt"))
        given = [f"--{k.replace('_', '-')}" for k in ("data", *paths) if getattr(args, k) is not None]
        if given:
            raise UserError(f"--data-bin reads its own files; leave out {', '.join(given)}")
    else:
        files = flags.data_files(args, ("train", "valid"))
        paths = {f"{split}_{side}": f for split in files for side, f in zip(("src", "tgt"), files[split])}
    return TranslationConfig(
        **paths, data_bin=args.data_bin and Path(args.data_bin), loop=flags.loop_config(args),
        vocab_size=args.vocab_size,
        tokenizer_type=args.tokenizer, byte_fallback=args.byte_fallback, max_tokens=args.max_tokens,
        max_epochs=args.max_epochs, label_smoothing=args.label_smoothing, bpe_dropout=args.bpe_dropout,
        valid_bleu_lines=args.valid_bleu_lines,
        too_long=args.too_long,
    )


def _train(args: argparse.Namespace) -> None:
    from transformer.tasks.translation import train

    train(_train_config(args), flags.model_config(args), say=say)


def _read_input(path: str | None) -> tuple[list[str], str]:
    from transformer.text.data import read_lines

    if path is None or path == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"stdin: invalid UTF-8 at byte {e.start}") from None
        lines = [line.rstrip("\r") for line in text.split("\n")]
        return lines[:-1] if lines[-1] == "" else lines, "stdin"
    return read_lines(path), path


def _translator(args: argparse.Namespace):
    """The `Translator` of --model: --engine, --device, --precision, --quantize and --compile as asked; it says
    which int8 backend CTranslate2 runs, if any."""
    from transformer.api.load import load_as
    from transformer.api.text import Translator

    flags.required(args, "model")
    translator = load_as(Translator, args.model, device=args.device, precision=args.precision,
                         quantize=None if args.quantize == "none" else args.quantize, compile=args.compile,
                         engine=args.engine)
    if translator.backend:
        say(translator.backend)
    return translator


def _translate_text(args: argparse.Namespace, lines: list[str], name: str) -> list[str]:
    search = flags.search_config(args)
    translator = _translator(args)
    if not lines:
        return []
    return translator.translate(lines, beam=search.beam, alpha=search.alpha, max_len_a=search.max_len_a,
                                max_len_b=search.max_len_b, min_len=search.min_len, batch_size=args.batch_size,
                                progress=not args.no_progress, source_name=name)


def _serve(args: argparse.Namespace) -> None:
    """A translation model's server, or a language model's (the OpenAI completions API) after --model's kind."""
    from transformer.api.load import load_as, serving_engine
    from transformer.api.text import LanguageModel
    from transformer.store.kinds import model_kind

    needs_extra("serve", "serve", "fastapi", "uvicorn", "prometheus_client")
    flags.required(args, "model")
    name = Path(args.model).resolve().name
    kind = model_kind(args.model)
    if kind == "lm" or (kind == "huggingface" and _hf_lm(args.model)):
        serving.serve_lm(args, load_as(LanguageModel, args.model, device=args.device), name)
        return
    if kind == "ctranslate2" and _ct2_arch(args.model) == "decoder":
        raise UserError(f"{args.model}: a CTranslate2 export of a language model is not served (continuous "
                        "batching needs our decoding steps); serve the run it was exported from")
    flags.needs_engine(args)
    serving.serve(args, serving_engine(_translator(args), name, flags.search_config(args)))


def _ct2_arch(path: str) -> str | None:
    """The architecture in the model config of a `transformer export --to ctranslate2` folder."""
    from transformer.store.kinds import CT2_CONFIG

    try:
        return json.loads((Path(path) / CT2_CONFIG).read_text(encoding="utf-8"))["model"].get("arch")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # loading it says what is wrong


def _hf_lm(path: str) -> bool:
    """Whether a Hugging Face folder holds a language model (GPT-2, the decoder-only family that `transformer
    import` takes)."""
    from transformer.pretrained.folder import HFFolder

    return HFFolder.open(path).model_type == "gpt2"


def _translate(args: argparse.Namespace) -> None:
    flags.needs_engine(args)
    if args.output:  # before any work: a translation is never lost to a path it cannot be written to
        writable_file(args.output, "--output")
    lines, name = _read_input(args.input)
    text = "".join(h + "\n" for h in _translate_text(args, lines, name))
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise UserError(f"--output {args.output}: cannot write ({e.strerror or e})") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()  # a closed pipe shows here, inside main, not at exit


def _evaluate(args: argparse.Namespace) -> None:
    from transformer.report.metrics import score
    from transformer.text.data import read_lines

    flags.required(args, "ref")
    if args.hyp is None:  # it translates
        flags.needs_engine(args)
    refs = read_lines(args.ref)
    if args.hyp is not None:
        hyps = read_lines(args.hyp)
    elif args.model is not None and args.input is not None:
        hyps = _translate_text(args, read_lines(args.input), args.input)
    else:
        raise UserError("give --hyp FILE, or --model DIR with --input FILE")
    scores = score(hyps, refs)
    print(json.dumps(scores.to_json()) if args.json else scores)


def _attention(args: argparse.Namespace) -> None:
    from transformer.report.plots import plot_attention

    flags.required(args, "sentence")
    if args.out:
        writable_folder(args.out, "--out")
    elif args.model is not None and Path(args.model).is_dir():
        writable_folder(Path(args.model) / "attention", "--out")
    from transformer.api.load import load_as
    from transformer.api.text import Translator

    maps = load_as(Translator, args.model, device=args.device, engine="torch").attention(
        args.sentence, args.target, args.beam, args.alpha)
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
    print(f"{'target' if args.target is not None else 'translation'}: {maps.translation}")
    print("\n".join(map(str, paths)))


def _quickstart(args: argparse.Namespace) -> None:
    """Train a small en->de model on the bundled Multi30k with the quickstart recipe, then score it on test2016."""
    from transformer.api.load import load_as
    from transformer.api.text import Translator
    from transformer.cli import parse
    from transformer.corpora import multi30k_dir
    from transformer.report.metrics import score
    from transformer.store.modeldir import read_meta
    from transformer.tasks.translation import train
    from transformer.text.data import read_lines

    data = multi30k_dir()
    # `transformer train --recipe quickstart`, in the time given
    train_args = parse(["train", "--recipe", "quickstart", "--data", str(data), "--out", args.out,
                        "--max-minutes", str(args.minutes), "--valid-bleu-lines", "300",
                        "--device", args.device, *(["--resume"] if args.resume else [])])
    start = time.perf_counter()
    run = train(_train_config(train_args), flags.model_config(train_args), say=say)
    translator = load_as(Translator, run, device=args.device, precision="fp32")
    src, ref = read_lines(data / "test2016.en"), read_lines(data / "test2016.de")
    hyps = translator.translate(src, beam=4, alpha=0.6, batch_size=64, progress=True)
    print(f"Multi30k test2016 en->de, best checkpoint (step {read_meta(run)['best']['step']}), beam 4:")
    print(score(hyps, ref))
    for s, h in list(zip(src, hyps))[:5]:
        print(f"  EN: {s}\n  DE: {h}")
    print(f"total time {(time.perf_counter() - start) / 60:.1f} min; model in {run}")


def _register_train(sub) -> None:
    p = command(sub, "train", _train, "Train a translation model on parallel text files.")
    data = p.add_argument_group("data")
    flags.parallel_data(data, ("train", "valid"))
    data.add_argument("--data-bin", help="a data folder of `transformer preprocess` (instead of text files): no "
                                         "tokenizing, ids read from its memory-mapped shards, its vocabulary")
    flags.vocabulary(data)
    data.add_argument("--max-tokens", type=number(int, 1), default=4096, help="padded tokens per batch")
    data.add_argument("--too-long", choices=["skip", "error"], default="skip",
                      help="a pair longer than --max-len or --max-tokens: skip it (and count it), or stop with an error")
    data.add_argument("--max-epochs", type=number(int, 1), help="stop after this many epochs")
    data.add_argument("--label-smoothing", type=number(float, 0, 1, below=True), default=0.1,
                      help="epsilon of label smoothing")
    data.add_argument("--bpe-dropout", type=number(float, 0, 1, below=True), default=0.0,
                      help="BPE-dropout: segment each epoch's training text anew, each merge skipped with this "
                           "probability (unigram: subword sampling with this smoothing); 0 = off")
    data.add_argument("--valid-bleu-lines", type=number(int, 1),
                      help="decode only the first N validation lines for BLEU")
    flags.training(p, TRAIN_DEFAULTS)
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="a named recipe: small-data = the Multi30k recipe (docs/results.md) for about 30k pairs on a CPU "
                        "(small model, dropout 0.2, 2,048-token batches, 5,500 steps or 60 minutes); quickstart = "
                        "the quick start's 10 minutes (dropout 0.1, 400 warm-up updates)")
    p.set_defaults(recipes=RECIPES)


def register(sub) -> None:
    """The translation verbs, under `sub` (the subparsers of `transformer translation`)."""
    preprocess.register(sub)
    _register_train(sub)
    p = command(sub, "translate", _translate, "Translate sentences from stdin (or --input) to stdout (or --output).")
    flags.model_dir(p)
    p.add_argument("--input", help="source sentences, one per line (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    flags.search(p)
    flags.engine(p)
    flags.device(p)
    flags.progress(p)

    p = command(sub, "serve", _serve, "Serve a model over HTTP: translations (dynamic batching), or a language model's "
                                      "completions (the OpenAI API, continuous batching); limits, metrics, a web page.")
    flags.model_dir(p)
    flags.search(p)
    flags.engine(p)
    flags.device(p)
    serving.add_flags(p)

    p = command(sub, "evaluate", _evaluate, "Score translations with sacreBLEU and chrF (and print the signatures).")
    p.add_argument("--ref", help="reference translations, one per line")
    p.add_argument("--hyp", help="hypotheses to score, one per line")
    flags.model_dir(p)
    p.add_argument("--input", help="source sentences to translate with --model, one per line")
    p.add_argument("--json", action="store_true", help='print {"bleu", "chrf", "signature"} as JSON')
    flags.search(p)
    flags.engine(p)
    flags.device(p)
    flags.progress(p)

    p = command(sub, "attention", _attention,
                "Draw PNG heatmaps of encoder, decoder and cross-attention, per layer and head, for one sentence.")
    flags.model_dir(p)
    p.add_argument("--sentence", help="the source sentence")
    p.add_argument("--target", help="a target sentence to attend over (default: the model's translation)")
    p.add_argument("--out", help="folder for the PNG files (default: MODEL/attention)")
    flags.beam(p)
    flags.device(p)

    p = command(sub, "quickstart", _quickstart,
                "Train a small English->German model on the bundled Multi30k, then score it on test2016.")
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--minutes", type=number(float, 0, above=True), default=10.0, help="training time budget")
    p.add_argument("--resume", action="store_true", help="continue a previous quick start")
    flags.device(p)
