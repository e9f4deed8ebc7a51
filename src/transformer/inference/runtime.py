"""A translation model prepared for fast decoding: bf16 weights, int8 dynamic quantization, torch.compile.

`DecodingModel` has the interface the searches use (`encode`, `decode`, `project`,
`new_cache`), so greedy and beam search take it in place of the model.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn


def _int8_linear(linear: nn.Linear) -> nn.Module:
    """An nn.Linear as a dynamically quantized int8 linear layer (CPU)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def _quantize_int8(model: nn.Module) -> None:
    """Replace, in place, every nn.Linear but one by its int8 version.

    Cross-attention's input projection is left in fp32: `MultiHeadAttention` slices its
    weight (queries from the target, keys/values from the memory), which a quantized
    layer does not expose. Its keys/values are computed once per source anyway.
    An untied output projection (`out_proj` of the model) is replaced too, but the model
    applies it with `F.linear(h, out_proj.weight)`, which a quantized layer does not
    support (its `weight` is a method): `DecodingModel.project` calls it as a module.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child_name == "in_proj" and name.endswith("cross_attn"):
                continue
            setattr(module, child_name, _int8_linear(child))


class DecodingModel(nn.Module):
    """A translation model (`EncoderDecoder`) prepared for fast decoding; the searches take it as the model.

    precision "bf16" casts a copy of the weights to bfloat16 (fast only on CPUs and GPUs
    with native bf16). quantize "int8" makes a copy whose linear layers, and the tied
    output projection (an `F.linear` with the embedding matrix, so not an nn.Linear), are
    int8 with dynamic activation quantization (`torch.ao.quantization`), CPU only.
    compile wraps encode/decode/project in `torch.compile`; if compiling or running a
    compiled function fails, it warns once and runs eagerly from then on.
    """

    def __init__(
        self, model: nn.Module, precision: str = "fp32", quantize: str | None = None, compile: bool = False
    ) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
        if quantize is not None and precision != "fp32":
            raise ValueError("int8 quantization starts from fp32 weights; use precision='fp32'")
        device = next(model.parameters()).device
        if quantize is not None and device.type != "cpu":
            raise ValueError(f"int8 dynamic quantization runs on the CPU, the model is on {device}")
        if precision != "fp32" or quantize is not None:
            model = copy.deepcopy(model)
        model.eval()
        if precision == "bf16":
            model.to(torch.bfloat16)
        self.head: nn.Module | None = None  # the output projection when it is replaced
        if quantize == "int8":
            _quantize_int8(model)
            if getattr(model, "out_proj", None) is None:  # tied: F.linear(h, embedding weight)
                tied = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
                tied.weight = nn.Parameter(model.tgt_embed.tokens.weight.detach().clone())
                self.head = _int8_linear(tied)
        self.model = model
        self.cfg = model.cfg
        self.precision, self.quantize = precision, quantize
        self._compiled: dict[str, object] = {}
        if compile:
            self._compiled = {
                name: torch.compile(getattr(self, f"_{name}"), dynamic=True) for name in ("encode", "decode", "project")
            }

    @property
    def compiled(self) -> bool:
        """Whether the compiled functions are in use (False after a fallback)."""
        return bool(self._compiled)

    def _encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode(src)

    def _decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache) -> Tensor:
        return self.model.decode(tgt, memory, memory_mask, cache)

    def _project(self, h: Tensor) -> Tensor:
        if self.head is not None:  # int8, tied
            return self.head(h)
        out_proj = getattr(self.model, "out_proj", None)
        if self.quantize is not None and out_proj is not None:  # int8, untied: no weight tensor for F.linear
            return out_proj(h)
        return self.model.project(h)

    def _run(self, name: str, *args):
        fn = self._compiled.get(name)
        if fn is not None:
            cache = args[-1] if name == "decode" else None
            mark = cache.state() if hasattr(cache, "state") else None
            try:
                return fn(*args)
            except Exception as e:  # any failure of dynamo/inductor: fall back for good
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "decoding without it",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._compiled = {}
                if cache is not None:
                    if mark is None:
                        raise
                    cache.rewind(mark)  # undo what the failed step appended
        return getattr(self, f"_{name}")(*args)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return self._run("encode", src)

    def decode(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, cache) -> Tensor:
        return self._run("decode", tgt, memory, memory_mask, cache)

    def project(self, h: Tensor) -> Tensor:
        return self._run("project", h)

    def new_cache(self):
        return self.model.new_cache()
