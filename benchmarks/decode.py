"""Decoding speed: this project against Hugging Face `generate` and CTranslate2, in one process.

The `small` preset's shape (d_model 256, 4 heads, d_ff 1024, 3+3 layers, vocab 8000) with
random weights; sources of 25 tokens (24 + EOS); exactly 50 target tokens per sentence
(EOS forbidden before 50, output cut at 50: our `min_len`/`max_len_b`, HF's
`min_new_tokens`/`max_new_tokens`, CTranslate2's `min_decoding_length`/
`max_decoding_length`); batch 1 and 32; greedy and beam 4. Target tokens/s counts the 50
tokens of each sentence's returned translation (not the beams), median of `--repeats`
timed runs after one warm-up run; the systems of a (batch, search) row group are timed
round-robin, one run of each in turn.

    python benchmarks/decode.py            # the table
    python benchmarks/decode.py --json     # the rows as JSON
    python benchmarks/decode.py --profile int8 --batches 1 --beams 1   # where a decode of ours goes
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

from transformer.config import preset
from transformer.text.data import collate_source
from transformer.inference.runtime import DecodingModel
from transformer.inference.search import SearchConfig, translate_batch
from transformer.model.models import build_model

VOCAB, SRC_LEN, OUT_LEN = 8000, 25, 50
D_MODEL, HEADS, FFN, LAYERS = 256, 4, 1024, 3


def sources(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(4, VOCAB - 1, (SRC_LEN - 1,), generator=g).tolist() for _ in range(batch)]


def timed(fns: list, repeats: int) -> list[float]:
    """The median time of each of `fns`, after one warm-up each, timed round-robin (one run of each in turn),
    so that a busy moment of a shared machine hits every system alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ---- this project ---------------------------------------------------------------------------


def ours_systems(compile_: bool):
    torch.manual_seed(0)
    model = build_model(preset("small", vocab_size=VOCAB, dropout=0.0)).eval()
    yield "fp32", model
    yield "bf16", DecodingModel(model, precision="bf16")
    yield "int8", DecodingModel(model, quantize="int8")
    if compile_:
        yield "fp32+compile", DecodingModel(model, compile=True)


def ours_runner(model, batch: int, beam: int):
    src = collate_source(sources(batch))
    cfg = SearchConfig(beam=beam, max_len_a=0.0, max_len_b=OUT_LEN, min_len=OUT_LEN)

    def run():
        out = translate_batch(model, src, cfg)
        assert all(len(o) == OUT_LEN for o in out), [len(o) for o in out]

    return run


# ---- Hugging Face ---------------------------------------------------------------------------

EOS_ID, UNK_ID, PAD_ID = 3, 1, VOCAB - 1  # Marian puts <pad> (also the decoder start) last


def marian():
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, activation_function="relu", max_position_embeddings=512,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, forced_eos_token_id=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    torch.manual_seed(0)
    return MarianMTModel(config).eval()


def hf_runner(model, batch: int, beam: int):
    src = torch.tensor([s + [EOS_ID] for s in sources(batch)])
    mask = torch.ones_like(src)

    def run():
        with torch.no_grad():
            out = model.generate(
                input_ids=src, attention_mask=mask, num_beams=beam, do_sample=False,
                min_new_tokens=OUT_LEN, max_new_tokens=OUT_LEN, early_stopping=False, length_penalty=0.6,
            )
        assert out.shape == (batch, 1 + OUT_LEN), out.shape  # decoder start + 50

    return run


# ---- CTranslate2 ----------------------------------------------------------------------------


def token(i: int) -> str:
    return {EOS_ID: "</s>", UNK_ID: "<unk>", PAD_ID: "<pad>"}.get(i, f"t{i}")


class _Vocab:
    """The little of a tokenizer that the Marian converter reads."""

    eos_token, unk_token = "</s>", "<unk>"

    def get_vocab(self):
        return {token(i): i for i in range(VOCAB)}


def ct2_translators(model, threads: list[int]):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _Vocab()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "hf"))
        for compute_type in ("int8", "float32"):
            out = os.path.join(tmp, compute_type)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Converter(os.path.join(tmp, "hf")).convert(out, quantization=compute_type)
            for n in threads:
                yield f"{compute_type}, {n} thread{'s' if n > 1 else ''}", ctranslate2.Translator(
                    out, device="cpu", compute_type=compute_type, intra_threads=n, inter_threads=1
                )


def ours_ct2_translators(model, threads: list[int]):
    """Our model (the fp32 `small` of `ours_systems`) exported with `transformer.export.ctranslate2`."""
    import ctranslate2

    from transformer.export.ctranslate2 import TransformerConverter

    vocabulary = ["<pad>", "<unk>", "<s>", "</s>"] + [token(i) for i in range(4, VOCAB)]
    with tempfile.TemporaryDirectory() as tmp:
        for compute_type in ("int8", "float32"):
            out = os.path.join(tmp, compute_type)
            TransformerConverter(model, vocabulary).convert(out, quantization=compute_type)
            for n in threads:
                yield f"{compute_type}, {n} thread{'s' if n > 1 else ''}", ctranslate2.Translator(
                    out, device="cpu", compute_type=compute_type, intra_threads=n, inter_threads=1
                )


def ct2_runner(translator, batch: int, beam: int, source_eos: bool = True):
    """`source_eos`: append </s> to the source (the converted Marian model); our export has CTranslate2 do it."""
    src = [[token(i) for i in s] + ["</s>"] * source_eos for s in sources(batch)]

    def run():
        out = translator.translate_batch(
            src, beam_size=beam, min_decoding_length=OUT_LEN, max_decoding_length=OUT_LEN, length_penalty=0.6,
        )
        assert all(len(r.hypotheses[0]) == OUT_LEN for r in out), [len(r.hypotheses[0]) for r in out]

    return run


# ---- main -----------------------------------------------------------------------------------


def profile(run, rows: int = 30) -> None:
    """Print torch.profiler's table of one run (after a warm-up), by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--beams", default="1,4")
    parser.add_argument("--systems", default="ours,hf,ct2,ours-ct2",
                        help="comma-separated subset of ours,hf,ct2,ours-ct2 (ours exported to CTranslate2)")
    parser.add_argument("--options", default=None, help="only these options of ours (comma-separated)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--profile", metavar="OPTION", default=None,
                        help="instead of the table: profile one decode of ours with this option, first batch and beam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(x) for x in args.batches.split(",")]
    beams = [int(x) for x in args.beams.split(",")]
    systems = args.systems.split(",")
    if args.profile is not None:
        model = dict(ours_systems(args.profile.endswith("compile")))[args.profile]
        profile(ours_runner(model, batches[0], beams[0]))
        return

    cases: list[tuple[str, str, object, object]] = []  # (system, option, runner factory, model)
    hf_model = marian()
    if "ours" in systems:
        for option, model in ours_systems(not args.no_compile):
            if args.options is None or option in args.options.split(","):
                cases.append(("transformer", option, ours_runner, model))
    if "hf" in systems:
        cases.append(("HF generate", "fp32", hf_runner, hf_model))
    ct2 = list(ct2_translators(hf_model, [1, 2])) if "ct2" in systems else []
    cases += [("CTranslate2", option, ct2_runner, t) for option, t in ct2]
    if "ours-ct2" in systems:
        exported = list(ours_ct2_translators(next(ours_systems(False))[1], [1, 2]))
        cases += [("ours exported to CTranslate2", option, functools.partial(ct2_runner, source_eos=False), t)
                  for option, t in exported]

    torch.set_num_threads(args.threads)  # again: converting to CTranslate2 resets torch's thread count
    rows = []
    for batch in batches:
        for beam in beams:
            medians = timed([runner(model, batch, beam) for _, _, runner, model in cases], args.repeats)
            for (system, option, _, _), seconds in zip(cases, medians):
                rows.append({
                    "system": system, "option": option, "batch": batch,
                    "search": "greedy" if beam == 1 else f"beam {beam}",
                    "tokens_per_s": batch * OUT_LEN / seconds,
                })
                if not args.json:
                    print(f"  measured {system} {option} batch {batch} beam {beam}: "
                          f"{rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    for row in rows:
        hf = [r for r in rows if r["system"] == "HF generate" and r["batch"] == row["batch"]
              and r["search"] == row["search"]]
        row["vs_hf"] = row["tokens_per_s"] / hf[0]["tokens_per_s"] if hf else None
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| system | option | batch | search | tokens/s | × HF generate |")
    print("|---|---|---:|---|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_hf']:.2f}" if r["vs_hf"] is not None else "-"
        print(f"| {r['system']} | {r['option']} | {r['batch']} | {r['search']} | {r['tokens_per_s']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
