"""Where the int8 CTranslate2 export changes a model's greedy translations, and how far an export could help.

CTranslate2 runs every linear layer of an int8 model on a CPU in int8: the weights are
quantized per output row at conversion (scale 127 / max|row|, `ctranslate2/specs/model_spec.py`),
the layer's input per row (token) when it runs, both symmetric and rounded to nearest. This
script emulates that in PyTorch on our model (each linear sees its input and weight rounded to
those grids, then computes in float32), checks the emulation against the real int8 export, and
then quantizes one kind of layer, or one side, at a time, to show where the changed greedy
translations come from (the validation set unless told):

- all layers: the emulated export; weights only; inputs only; each kind of layer alone;
- the inputs of the layers that read the residual stream (self- and cross-attention Q, K, V,
  the FFN's first linear, the output projection) and nothing else. In a post-norm model the
  LayerNorm output *is* the residual stream, so no exact rewrite of the weights can rescale
  these inputs (SmoothQuant's trick needs a linear or a LayerNorm of its own before them): this
  share of changed sentences stays whatever the export does with the weights.

    python benchmarks/int8_bound.py --model runs/multi30k/en-de/avg5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from transformer.corpora import multi30k_dir
from transformer.export.ctranslate2 import export_ctranslate2
from transformer.inference.ctranslate2 import CTranslate2Translator
from transformer.inference.search import SearchConfig
from transformer.inference.translate import translate_lines
from transformer.model.models import EncoderDecoder
from transformer.text.data import read_lines
from transformer.store.modeldir import load_model_dir

KINDS = ("enc self Q,K,V", "enc self out", "enc W1", "enc W2", "dec self Q,K,V", "dec self out",
         "dec cross Q,K,V", "dec cross out", "dec W1", "dec W2", "embedding / projection")
READ_RESIDUAL = {"enc self Q,K,V", "enc W1", "dec self Q,K,V", "dec cross Q,K,V", "dec W1", "embedding / projection"}


def kind(name: str) -> str | None:
    """The kind of layer a weight belongs to (its parameter name), None for biases and LayerNorms."""
    if not name.endswith("weight") or ".norm" in name:
        return None
    if "tokens" in name or name == "out_proj.weight":
        return "embedding / projection"
    stack = "enc" if name.startswith("encoder") else "dec"
    for part, label in (("self_attn.in_proj", "self Q,K,V"), ("self_attn.out_proj", "self out"),
                        ("cross_attn.in_proj", "cross Q,K,V"), ("cross_attn.out_proj", "cross out"),
                        ("ffn.w1", "W1"), ("ffn.w2", "W2")):
        if part in name:
            return f"{stack} {label}"
    return None


def round_rows(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """x rounded to an int8 grid of each row (last dimension): `levels` / max|row| steps. 127 is
    CTranslate2's own (its converter's weights, and every input at run time); our export's weights
    use 64 (export/ctranslate2.py)."""
    scale = levels / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.round(x * scale) / scale


@contextlib.contextmanager
def emulated(model: EncoderDecoder, weights: set[str], inputs: set[str]):
    """Within: the linears of kinds `weights` use int8-rounded weights, those of kinds `inputs` int8-rounded inputs."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage_kind = {p.untyped_storage().data_ptr(): kind(n) for n, p in model.named_parameters() if kind(n)}
    linear = F.linear

    def int8_linear(x, w, b=None):
        if storage_kind.get(w.untyped_storage().data_ptr()) in inputs:
            x = round_rows(x)
        return linear(x, w, b)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if kind(n) in weights:
                p.copy_(round_rows(p))
    F.linear = int8_linear
    try:
        yield
    finally:
        F.linear = linear
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a translation model directory (post-norm)")
    parser.add_argument("--input", default=str(multi30k_dir() / "valid.en"),
                        help="source sentences, one a line (default: Multi30k valid.en)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _, tokenizer, _ = load_model_dir(Path(args.model))
    model.eval()
    lines = read_lines(args.input)
    greedy = functools.partial(translate_lines, model, tokenizer, lines, SearchConfig(beam=1))
    ours = greedy()

    everything = set(KINDS)
    with emulated(model, everything, everything):
        emulation = greedy()
    with tempfile.TemporaryDirectory() as tmp:
        export_ctranslate2(model, tokenizer, Path(tmp), "int8")
        export = CTranslate2Translator(tmp, threads=args.threads).translate(lines, SearchConfig(beam=1))
    print(f"{len(lines)} sentences, {args.threads} thread(s)\n")
    print("| int8 on | greedy translations changed |\n|---|---:|")
    print(f"| the real CTranslate2 int8 export | {changed(export, ours)} |")
    print(f"| all layers, emulated (differs from the real export on {changed(emulation, export)}) "
          f"| {changed(emulation, ours)} |")
    settings = [("weights only", everything, set()), ("inputs only", set(), everything),
                ("inputs of the layers that read the residual stream only", set(), READ_RESIDUAL)]
    settings += [(f"{k} only (weight and input)", {k}, {k}) for k in KINDS]
    for label, weights, inputs in settings:
        with emulated(model, weights, inputs):
            print(f"| {label} | {changed(greedy(), ours)} |", flush=True)


def changed(a: list[str], b: list[str]) -> str:
    """The share of sentences translated differently in a and b."""
    return f"{100 * sum(x != y for x, y in zip(a, b)) / len(a):.1f}%"


if __name__ == "__main__":
    main()
