"""BLEU and wall time of a trained translation model through its CTranslate2 exports, beside ours, in one process.

Exports `--model` to CTranslate2 in float32 and int8 (a temporary folder), translates
Multi30k test2016 (or `--input`/`--ref`) with our PyTorch search (fp32, and our own dynamic
int8, `DecodingModel`) and with `CTranslate2Translator` on each export, and prints per system: sacreBLEU, the wall time of
the whole test set (tokenize, search, detokenize; median of `--repeats` runs after a warm-up,
systems taken in turn), and the share of sentences whose translation is identical to ours.
Beam search (`--beam`, `--alpha`; 4 and 0.6, the paper's, unless told) and greedy.

    python benchmarks/export_quality.py --model runs/quickstart --threads 1
    python benchmarks/export_quality.py --model runs/multi30k/de-en/avg10 --beam 4 --alpha 1.0 \
        --input .../test2016.de --ref .../test2016.en
    CT2_USE_MKL=1 python benchmarks/export_quality.py ...   # Intel MKL's int8 (CTranslate2's default on Intel CPUs)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from transformer.corpora import multi30k_dir
from transformer.export.ctranslate2 import export_ctranslate2
from transformer.inference.ctranslate2 import CTranslate2Translator, cpu_vendor
from transformer.inference.runtime import DecodingModel
from transformer.inference.search import SearchConfig
from transformer.inference.translate import translate_lines
from transformer.report.metrics import score
from transformer.store.modeldir import load_model_dir
from transformer.text.data import read_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a translation model directory")
    parser.add_argument("--input", default=str(multi30k_dir() / "test2016.en"))
    parser.add_argument("--ref", default=str(multi30k_dir() / "test2016.de"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every system")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _, tokenizer, _ = load_model_dir(Path(args.model))
    lines, refs = read_lines(args.input), read_lines(args.ref)
    with tempfile.TemporaryDirectory() as tmp:
        int8 = DecodingModel(model, quantize="int8")
        systems = {  # name: translate(search) -> translations of `lines`
            "ours (PyTorch, fp32)": lambda search: translate_lines(model, tokenizer, lines, search, args.batch_size),
            "ours (PyTorch, int8)": lambda search: translate_lines(int8, tokenizer, lines, search, args.batch_size),
        }
        int8_line = ""
        for quantization in ("float32", "int8"):
            export_ctranslate2(model, tokenizer, Path(tmp) / quantization, quantization)
            translator = CTranslate2Translator(Path(tmp) / quantization, threads=args.threads)
            int8_line = translator.backend or int8_line
            systems[f"CTranslate2 export, {quantization}"] = functools.partial(
                translator.translate, lines, batch_size=args.batch_size)

        print(f"{args.input}: {len(lines)} sentences, {args.threads} thread(s), torch {torch.__version__}, "
              f"CPU vendor {cpu_vendor()}; {int8_line}\n")
        print("| search | system | BLEU | wall time (s) | identical to ours |")
        print("|---|---|---:|---:|---:|")
        for search in (SearchConfig(beam=args.beam, alpha=args.alpha), SearchConfig(beam=1)):
            outputs = {name: run(search) for name, run in systems.items()}  # warm-up, and the outputs
            times: dict[str, list[float]] = {name: [] for name in systems}
            for _ in range(args.repeats):
                for name, run in systems.items():  # in turn, so that a busy moment hits all alike
                    start = time.perf_counter()
                    run(search)
                    times[name].append(time.perf_counter() - start)
            ours = outputs["ours (PyTorch, fp32)"]
            for name, hyps in outputs.items():
                same = sum(a == b for a, b in zip(hyps, ours)) / len(ours)
                label = "greedy" if search.beam == 1 else f"beam {search.beam}, alpha {search.alpha}"
                print(f"| {label} | {name} | {score(hyps, refs).bleu:.2f} | {statistics.median(times[name]):.2f} "
                      f"| {100 * same:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
