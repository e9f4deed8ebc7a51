"""Export a trained model to the formats people deploy and share it in.

- `ctranslate2`: a CTranslate2 model folder (`ctranslate2.Translator`, or `ctranslate2.Generator`
  for a decoder-only LM), built with CTranslate2's own specification classes and converter.
- `huggingface`: a Marian folder that `MarianMTModel.from_pretrained` and `MarianTokenizer` load.

Both exporters read a model directory (`training.checkpoint.load_model_dir`) and write a new
folder as a whole: it is built beside its destination and renamed into place, so it appears
complete or not at all. A model the target cannot express (windowed attention, pre-norm blocks
for Marian, ...) is refused with one `UserError` naming the feature, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from transformer.errors import UserError
from transformer.files import check_new_folder

TARGETS = ("ctranslate2", "huggingface")
# CTranslate2's weight types (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES); None = float32
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "bfloat16", "float16", "float32")


def export_model(model_dir: Path, target: str, out: Path, quantization: str | None = None) -> None:
    """Export the model directory `model_dir` to `target` (one of `TARGETS`) as the new folder `out`."""
    from transformer.store.modeldir import load_model_dir

    if target not in TARGETS:
        raise UserError(f"`to` {target}: choose one of {', '.join(TARGETS)}")
    if target != "ctranslate2" and quantization is not None:
        raise UserError("`quantization`: only for `to` ctranslate2 (a Marian folder holds float32 weights)")
    check_new_folder(Path(out))
    model, _, tokenizer, _ = load_model_dir(Path(model_dir))
    if target == "ctranslate2":
        try:
            from transformer.export.ctranslate2 import export_ctranslate2
        except ImportError:
            raise UserError("`to` ctranslate2 needs the ctranslate2 package: "
                            "pip install 'transformer[export]'") from None
        export_ctranslate2(model, tokenizer, Path(out), quantization)
    else:
        from transformer.export.huggingface import export_marian

        export_marian(model, tokenizer, Path(out))
