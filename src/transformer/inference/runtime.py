"""A translation model prepared for fast decoding: bf16 weights, int8 dynamic quantization, torch.compile.

`DecodingModel` has the interface the searches use (`encode`, `decode`, `project`,
`new_cache`), so greedy and beam search take it in place of the model.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from transformer.device import resolve_precision
from transformer.errors import UserError
from transformer.model.attention import SplitInProjection
from transformer.model.layers import DecoderLayer


def _int8_linear(weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A linear layer of weight (out, in) and bias (out,) as a dynamically quantized int8 layer (CPU)."""
    from torch.ao.quantization import quantize_dynamic

    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    with warnings.catch_warnings():  # torch.ao's eager quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def _split_cross_projections(model: nn.Module) -> None:
    """Replace, in place, each cross-attention's fused input projection by its pre-sliced
    query and key/value layers (`SplitInProjection`)."""
    for layer in model.modules():
        if isinstance(layer, DecoderLayer) and layer.cross_attn is not None:
            layer.cross_attn.in_proj = SplitInProjection(layer.cross_attn.in_proj)


def _quantize_int8(model: nn.Module) -> None:
    """Replace, in place, every linear layer (nn.Linear and its subclass `InProjection`) by its int8 version.

    Cross-attention's projections are split first (`_split_cross_projections`), so its
    queries and keys/values are int8 too. An untied output projection (`out_proj` of the
    model) is replaced too, but the model applies it with `F.linear(h, out_proj.weight)`,
    which a quantized layer does not support (its `weight` is a method):
    `DecodingModel.project` calls it as a module.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, _int8_linear(child.weight.detach(), child.bias))


class DecodingModel(nn.Module):
    """A translation model (`EncoderDecoder`) prepared for fast decoding; the searches take it as the model.

    The model is copied, and each cross-attention's input projection split into pre-sliced
    query and key/value layers (`SplitInProjection`). precision "bf16" casts the weights
    to bfloat16 (fast only on CPUs and GPUs with native bf16). quantize "int8" makes every
    linear layer, and the tied output projection (an `F.linear` with the embedding matrix,
    so not an nn.Linear), int8 with dynamic activation quantization
    (`torch.ao.quantization`), CPU only.
    compile wraps encode/decode/project in `torch.compile`; if compiling or running a
    compiled function fails, it warns once and runs eagerly from then on.
    """

    beams_share_memory = True  # a cached step takes one memory row per K beams, as `EncoderDecoder`'s

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
        model = copy.deepcopy(model).eval()
        if precision == "bf16":
            model.to(torch.bfloat16)
        _split_cross_projections(model)
        self.head: nn.Module | None = None  # the output projection when it is replaced
        if quantize == "int8":
            _quantize_int8(model)
            if getattr(model, "out_proj", None) is None:  # tied: F.linear(h, embedding weight)
                self.head = _int8_linear(model.tgt_embed.tokens.weight.detach(), model.out_bias)
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
            return out_proj(h) if self.model.out_bias is None else out_proj(h) + self.model.out_bias
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


def decoding_runtime(model: nn.Module, precision: str = "auto", quantize: str | None = None,
                     compile: bool = False) -> nn.Module:
    """`model` (an `EncoderDecoder`) as the searches should run it: itself when nothing is asked, else a
    `DecodingModel`. `precision` "auto" is bf16 only where bf16 is native for decoding (a GPU: `device`),
    "fp32" or "bf16" as asked; `quantize` None or "int8" (CPU). A bad combination is a `UserError`."""
    precision, _ = resolve_precision(precision, next(model.parameters()).device, training=False)
    if precision == "fp32" and quantize is None and not compile:
        return model
    try:
        return DecodingModel(model, precision=precision, quantize=quantize, compile=compile)
    except ValueError as e:
        raise UserError(f"`quantize` {quantize}, `precision` {precision}: {e}") from None
