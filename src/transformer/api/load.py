"""`load`: any model the package writes, from its path, as the object that uses it."""

from __future__ import annotations

from pathlib import Path

from transformer.api.text import LanguageModel, MaskedLM, TextClassifier, Translator
from transformer.api.vision import Captioner, ImageClassifier
from transformer.device import resolve_device
from transformer.errors import UserError
from transformer.inference.ctranslate2 import CTranslate2Translator, compute_type
from transformer.inference.runtime import decoding_runtime
from transformer.inference.search import SearchConfig
from transformer.serve.engine import CTranslate2Engine, Engine, TorchEngine
from transformer.store import kinds, modeldir

Model = Translator | LanguageModel | MaskedLM | TextClassifier | ImageClassifier | Captioner
KIND_NAMES = {"translation": "a translation model", "lm": "a language model", "mlm": "a BERT-style masked LM",
              "classifier": "a text classifier", "vit": "an image classifier (ViT)", "captioner": "a captioner",
              "ctranslate2": "a CTranslate2 export", "huggingface": "a Hugging Face folder"}


def load(path: str | Path, device: str = "auto", precision: str = "auto", quantize: str | None = None,
         compile: bool = False, engine: str = "auto", threads: int | None = None) -> Model:
    """The model in `path` (a training run directory, one of its checkpoints, an averaged model, a folder of
    `transformer export --to ctranslate2`, or a Hugging Face folder of a family `transformer import` takes,
    converted in memory) as a `Translator`, `LanguageModel`, `MaskedLM`, `TextClassifier`, `ImageClassifier` or
    `Captioner`, after the kind its config says.

    `device`: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N. For translation: `precision` auto
    (bf16 where native for decoding: a GPU), fp32 or bf16; `quantize` None or "int8" (dynamic int8 on the
    CPU); `compile` (torch.compile); `engine` auto (CTranslate2 for an exported folder, else ours), torch or
    ctranslate2; `threads`: CTranslate2's (None: as many as PyTorch's). Raises `UserError` naming the
    path when it holds no model, or a setting that does not fit the model.
    """
    path = Path(path)
    kind = kinds.model_kind(path)
    if engine not in ("auto", "torch", "ctranslate2"):
        raise UserError(f"`engine` {engine}: choose auto, torch or ctranslate2")
    if engine == "ctranslate2" and kind != "ctranslate2":
        raise UserError(f"{path}: not an exported CTranslate2 folder (no {kinds.CT2_MODEL} and {kinds.CT2_CONFIG})")
    if kind not in ("translation", "ctranslate2", "huggingface") and (quantize is not None or compile):
        raise UserError(f"`quantize` and `compile` are for translation models; {path} holds {KIND_NAMES[kind]}")
    if kind == "ctranslate2":
        if engine == "torch":
            raise UserError(f"{path}: a CTranslate2 export runs with engine ctranslate2 (load the model "
                            "directory it was exported from for engine torch)")
        if compile:
            raise UserError("`compile`: only with engine torch (CTranslate2 runs its own kernels)")
        ct2 = CTranslate2Translator(path, device=device, compute_type=compute_type(precision, quantize),
                                    threads=threads)
        return Translator(ct2.cfg, ct2.tokenizer, ctranslate2=ct2)
    where = resolve_device(device)
    if kind == "huggingface":
        return _converted(path, where, precision, quantize, compile)
    if kind == "vit":
        model, cfg, meta = kinds.load_vit(path, where)
        return ImageClassifier(cfg, model, meta.get("classes") or [str(i) for i in range(cfg.n_classes)])
    if kind == "captioner":
        model, cfg, _ = kinds.load_captioner(path, where)
        return Captioner(cfg, kinds.load_tokenizer(path), model)
    if kind == "classifier":
        model, cfg, tokenizer, meta = kinds.load_text_classifier(path, where)
        return TextClassifier(cfg, tokenizer, model, meta)
    model, cfg, tokenizer, _ = modeldir.load_model_dir(path, where)
    return _text_model(kind, cfg, tokenizer, model, precision, quantize, compile)


def _converted(path: Path, where, precision: str, quantize: str | None, compile: bool) -> Model:
    """A Hugging Face folder, converted in memory (`transformer import` writes the same model to disk)."""
    from transformer.pretrained import build, convert_folder
    from transformer.text.tokenizer import Tokenizer

    converted = convert_folder(path)
    model = build(converted).to(where)
    if converted.kind == "vit":
        return ImageClassifier(converted.config, model, converted.meta["classes"])
    if converted.kind != "translation" and (quantize is not None or compile):
        raise UserError(f"`quantize` and `compile` are for translation models; {path} holds "
                        f"{KIND_NAMES[converted.kind]}")
    return _text_model(converted.kind, converted.config, Tokenizer.from_bytes(converted.tokenizer), model,
                       precision, quantize, compile)


def _text_model(kind: str, cfg, tokenizer, model, precision: str, quantize: str | None, compile: bool) -> Model:
    if kind == "lm":
        return LanguageModel(cfg, tokenizer, model)
    if kind == "mlm":
        return MaskedLM(cfg, tokenizer, model)
    return Translator(cfg, tokenizer, model, decoding_runtime(model, precision, quantize, compile))


def load_as(cls: type, path: str | Path, **options) -> Model:
    """`load`, refusing (`UserError`) a model that is not a `cls`."""
    model = load(path, **options)
    if not isinstance(model, cls):
        wanted = {Translator: "translation", LanguageModel: "lm", MaskedLM: "mlm", TextClassifier: "classifier",
                  ImageClassifier: "vit", Captioner: "captioner"}[cls]
        raise UserError(f"{path}: not {KIND_NAMES[wanted]}; it holds {KIND_NAMES[kinds.model_kind(path)]}")
    return model


def serving_engine(translator: Translator, name: str, search: SearchConfig) -> Engine:
    """The engine `transformer serve` decodes `translator` with (`search`: all but beam and alpha)."""
    if translator.engine == "ctranslate2":
        return CTranslate2Engine(translator._ct2, search, name)
    return TorchEngine(translator._torch, translator.tokenizer, search, name, decoder=translator._decoder)
