"""Model configuration: one frozen dataclass with the paper's defaults, and named presets.

The defaults are the paper's "base" model (Vaswani et al., 2017, Table 3):
N=6, d_model=512, d_ff=2048, h=8, d_k=d_v=64, P_drop=0.1, post-norm residual blocks,
sinusoidal positions, embeddings scaled by sqrt(d_model) and shared with the output
projection. Every field that departs from the paper says so in its comment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UserError

Arch = Literal["encoder-decoder", "encoder", "decoder"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swish"]
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swish")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a Transformer. Names follow the paper."""

    arch: Arch = "encoder-decoder"  # "encoder" = BERT-style, "decoder" = GPT-style
    vocab_size: int = 37000  # the paper's joint BPE vocabulary for WMT14 en-de
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # residual and embedding dropout (paper section 5.4)
    attn_dropout: float = 0.0  # on attention weights; the paper uses none
    act_dropout: float = 0.0  # on the FFN's hidden ReLU output (fairseq's activation_dropout); the paper uses none
    norm_first: bool = False  # False = post-norm (paper); True = pre-norm option
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_len: int = 1024  # longest sequence the positional table covers
    tie_embeddings: bool = True  # share source, target embedding and output projection
    attn_window: int | None = None  # restricted self-attention radius r (Table 1); None = full
    layer_norm_eps: float = 1e-5  # not given in the paper; PyTorch's default
    # The options below are for the family built on the paper's blocks (imported checkpoints: `pretrained`);
    # each default is the paper's, so a model trained here is unchanged by them.
    activation: Activation = "relu"  # the FFN's: relu (paper), gelu (BERT, ViT), gelu_tanh (GPT-2), swish (OPUS-MT)
    scale_embedding: bool = True  # token embeddings × sqrt(d_model) (section 3.4); BERT and GPT-2 do not scale
    n_segments: int = 0  # BERT's segment (token-type) embeddings added to the input; 0 = none (paper)
    embed_norm: bool = False  # a LayerNorm on the summed embeddings, before dropout (BERT)
    logits_bias: bool = False  # a bias on the output projection (Marian's final_logits_bias); the MLM head has one
    next_sentence: bool = False  # BERT's pooler (dense, tanh on [CLS]) and next-sentence classifier (encoder only)
    pad_id: int = 0  # the special ids of every tokenizer here (text.tokenizer.Tokenizer)
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        """Every field's type and range checked; a `UserError` naming the field, e.g. "n_heads 0: must be >= 1"."""
        for name, (kind, low, high) in _FIELD_RULES.items():
            _check_field(name, getattr(self, name), kind, low, high)
        if self.d_model % self.n_heads:
            raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise UserError(f"d_model {self.d_model}: must be even with sinusoidal positions")
        for name in ("pad_id", "bos_id", "eos_id"):
            if getattr(self, name) >= self.vocab_size:
                raise UserError(f"{name} {getattr(self, name)}: must be < vocab_size ({self.vocab_size})")

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        _known_fields(cls, d)
        return cls(**d)


# Each field's type and range, read by ModelConfig.__post_init__: (type, minimum, maximum), a bound
# written (value, inclusive); "int?" is an int or None; a tuple of strings lists the choices.
_FIELD_RULES: dict[str, tuple] = {
    "arch": (("encoder-decoder", "encoder", "decoder"), None, None),
    "vocab_size": ("int", (1, True), None),
    "d_model": ("int", (1, True), None),
    "n_heads": ("int", (1, True), None),
    "d_ff": ("int", (1, True), None),
    "n_encoder_layers": ("int", (0, True), None),
    "n_decoder_layers": ("int", (0, True), None),
    "dropout": ("float", (0, True), (1, False)),
    "attn_dropout": ("float", (0, True), (1, False)),
    "act_dropout": ("float", (0, True), (1, False)),
    "norm_first": ("bool", None, None),
    "positions": (("sinusoidal", "learned"), None, None),
    "max_len": ("int", (1, True), None),
    "tie_embeddings": ("bool", None, None),
    "attn_window": ("int?", (0, True), None),
    "layer_norm_eps": ("float", (0, False), None),
    "activation": (ACTIVATIONS, None, None),
    "scale_embedding": ("bool", None, None),
    "n_segments": ("int", (0, True), None),
    "embed_norm": ("bool", None, None),
    "logits_bias": ("bool", None, None),
    "next_sentence": ("bool", None, None),
    "pad_id": ("int", (0, True), None),
    "bos_id": ("int", (0, True), None),
    "eos_id": ("int", (0, True), None),
}


def _check_field(name: str, value: Any, kind: str | tuple, minimum: tuple | None, maximum: tuple | None) -> None:
    """`UserError` "NAME VALUE: must be ..." unless `value` has the type `kind` and lies within the bounds."""
    if isinstance(kind, tuple):
        if not isinstance(value, str) or value not in kind:
            raise UserError(f"{name} {value!r}: must be one of {', '.join(kind)}")
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{name} {value!r}: must be true or false")
        return
    if kind == "int?" and value is None:
        return
    if kind in ("int", "int?") and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{name} {value!r}: must be an integer" + (" or null" if kind == "int?" else ""))
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise UserError(f"{name} {value!r}: must be a finite number")
    bounds = []
    if minimum is not None:
        bounds.append((">=" if minimum[1] else ">", minimum[0], value < minimum[0] if minimum[1] else value <= minimum[0]))
    if maximum is not None:
        bounds.append(("<=" if maximum[1] else "<", maximum[0], value > maximum[0] if maximum[1] else value >= maximum[0]))
    if any(out for _, _, out in bounds):
        raise UserError(f"{name} {value!r}: must be {' and '.join(f'{op} {bound}' for op, bound, _ in bounds)}")


PRESETS: dict[str, ModelConfig] = {
    # For tests: runs in milliseconds.
    "tiny": ModelConfig(
        vocab_size=1000, d_model=32, n_heads=2, d_ff=64,
        n_encoder_layers=2, n_decoder_layers=2, max_len=256,
    ),
    # For a CPU: trains a useful Multi30k model in minutes.
    "small": ModelConfig(
        vocab_size=8000, d_model=256, n_heads=4, d_ff=1024,
        n_encoder_layers=3, n_decoder_layers=3,
    ),
    # The paper's base model (Table 3, first row).
    "base": ModelConfig(),
    # The paper's big model (Table 3, last row): P_drop 0.3 as for EN-DE.
    "big": ModelConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    # BERT-base (Devlin et al., 2019): 12 layers, 768 wide, 12 heads, encoder-only; GELU, learned positions,
    # two segments, LayerNorm on the embeddings (eps 1e-12), unscaled embeddings: a BERT checkpoint's options.
    "bert-base": ModelConfig(
        arch="encoder", vocab_size=30522, d_model=768, n_heads=12, d_ff=3072,
        n_encoder_layers=12, n_decoder_layers=0, max_len=512, positions="learned",
        activation="gelu", scale_embedding=False, n_segments=2, embed_norm=True, layer_norm_eps=1e-12,
    ),
    # GPT-2 small (Radford et al., 2019): pre-norm with a final LayerNorm, learned positions, GELU (tanh form).
    "gpt2": ModelConfig(
        arch="decoder", vocab_size=50257, d_model=768, n_heads=12, d_ff=3072, n_encoder_layers=0,
        n_decoder_layers=12, norm_first=True, positions="learned", activation="gelu_tanh", scale_embedding=False,
        pad_id=50256, bos_id=50256, eos_id=50256,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a ViT (Dosovitskiy et al., 2021): the image cut into patch_size × patch_size patches, one
    token each, through the package's encoder layers. The defaults are ViT-B/16 at 224 × 224 (Table 1)."""

    image_height: int = 224
    image_width: int = 224
    channels: int = 3
    patch_size: int = 16
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    n_layers: int = 12
    dropout: float = 0.1
    norm_first: bool = True  # ViT's blocks are pre-norm
    activation: Activation = "relu"  # the FFN's; the paper's ReLU by default, ViT's MLP is "gelu"
    pool: Literal["cls", "mean"] = "cls"  # the [CLS] token's output, or the mean of the patches' outputs
    positions: Literal["learned", "sinusoidal"] = "learned"  # "sinusoidal": 2-D, half the width for each axis
    n_classes: int = 1000
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name, (kind, low, high) in _VISION_RULES.items():
            _check_field(name, getattr(self, name), kind, low, high)
        if self.image_height % self.patch_size or self.image_width % self.patch_size:
            raise UserError(f"patch_size {self.patch_size}: must divide the image size "
                            f"{self.image_height}x{self.image_width}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positions == "sinusoidal" and self.d_model % 4:
            raise UserError(f"d_model {self.d_model}: must be a multiple of 4 with 2-D sinusoidal positions")

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def encoder_config(self) -> ModelConfig:
        """The shape of the encoder layers (a text model's config without a vocabulary)."""
        return ModelConfig(arch="encoder", vocab_size=1, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                           n_encoder_layers=self.n_layers, n_decoder_layers=0, dropout=self.dropout,
                           norm_first=self.norm_first, layer_norm_eps=self.layer_norm_eps, activation=self.activation,
                           pad_id=0, bos_id=0, eos_id=0)

    def replace(self, **changes: Any) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        _known_fields(cls, d)
        return cls(**d)


_VISION_RULES: dict[str, tuple] = {
    "image_height": ("int", (1, True), None),
    "image_width": ("int", (1, True), None),
    "channels": ("int", (1, True), None),
    "patch_size": ("int", (1, True), None),
    "d_model": ("int", (1, True), None),
    "n_heads": ("int", (1, True), None),
    "d_ff": ("int", (1, True), None),
    "n_layers": ("int", (0, True), None),
    "dropout": ("float", (0, True), (1, False)),
    "norm_first": ("bool", None, None),
    "activation": (ACTIVATIONS, None, None),
    "pool": (("cls", "mean"), None, None),
    "positions": (("learned", "sinusoidal"), None, None),
    "n_classes": ("int", (1, True), None),
    "layer_norm_eps": ("float", (0, False), None),
}

Bridge = Literal["qformer", "flamingo", "encoder-decoder"]


@dataclass(frozen=True)
class CaptionConfig:
    """An image-to-text model: a ViT encoder, a bridge, and a text decoder.

    bridge "qformer" (BLIP-2, Li et al., 2023): `n_queries` learned queries through `bridge_layers`
    layers of self-attention among them, with cross-attention to the image in every `cross_every`-th
    layer (BLIP-2: 32 queries, 12 layers, every other one), projected to a prefix of the frozen LM.
    bridge "flamingo" (Alayrac et al., 2022): a tanh-gated cross-attention block (gate 0 at the start)
    before every `cross_every`-th layer of the frozen LM. bridge "encoder-decoder": a decoder of the
    LM's shape, trained from scratch, attending to every patch (the paper's model with image tokens).
    `lm` is the language model's shape; `bos_id` starts a caption and `eos_id` ends it (for an LM
    trained on one caption a line, both are the newline); `max_len` counts a caption's tokens, BOS and
    EOS included. An image is `tiles` images of the ViT's size side by side, each through the ViT
    (tiling, as LLaVA-NeXT does for large images), their features marked with the tile they come
    from; `freeze_vision`: the ViT is not trained (a pretrained one, as in BLIP-2 and Flamingo).
    """

    vision: VisionConfig
    lm: ModelConfig
    bridge: Bridge = "qformer"
    n_queries: int = 32
    bridge_layers: int = 12
    cross_every: int = 2
    max_len: int = 32
    bos_id: int = 2
    eos_id: int = 3
    tiles: int = 1
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        _check_field("bridge", self.bridge, ("qformer", "flamingo", "encoder-decoder"), None, None)
        _check_field("freeze_vision", self.freeze_vision, "bool", None, None)
        for name in ("n_queries", "bridge_layers", "cross_every", "max_len", "tiles"):
            _check_field(name, getattr(self, name), "int", (1, True), None)
        for name in ("bos_id", "eos_id"):
            _check_field(name, getattr(self, name), "int", (0, True), (self.lm.vocab_size, False))
        if self.lm.arch != "decoder":
            raise UserError(f"lm arch {self.lm.arch!r}: the language model must be a decoder")
        prefix = self.n_queries if self.bridge == "qformer" else 0
        if prefix + self.max_len > self.lm.max_len:
            raise UserError(f"max_len {self.max_len}{f' + {prefix} queries' if prefix else ''}: more positions "
                            f"than the language model's max_len {self.lm.max_len}")

    @property
    def pad_id(self) -> int:
        return self.lm.pad_id

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images: the tiles side by side."""
        return self.vision.image_height, self.tiles * self.vision.image_width

    def replace(self, **changes: Any) -> "CaptionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptionConfig":
        _known_fields(cls, d)
        if not isinstance(d.get("vision"), dict) or not isinstance(d.get("lm"), dict):
            raise UserError('"vision" and "lm" must be objects')
        return cls(**(d | {"vision": VisionConfig.from_dict(d["vision"]), "lm": ModelConfig.from_dict(d["lm"])}))


def _known_fields(cls: type, d: dict[str, Any]) -> None:
    """`UserError` naming the keys of `d` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} "
                        f"(the fields are {', '.join(sorted(known))})")


VISION_PRESETS: dict[str, VisionConfig] = {
    # For tests: an 8×8 digit in 4 patches of 4×4.
    "tiny": VisionConfig(image_height=8, image_width=8, channels=1, patch_size=4, d_model=32, n_heads=2, d_ff=64,
                         n_layers=2, n_classes=10),
    # ViT-B/16 (Table 1), with ViT's GELU MLP.
    "base": VisionConfig(activation="gelu"),
}


def vision_preset(name: str, **overrides: Any) -> VisionConfig:
    """The named vision preset, with fields replaced by `overrides`."""
    if name not in VISION_PRESETS:
        raise UserError(f"unknown vision preset {name!r}; choose one of {', '.join(VISION_PRESETS)}")
    return VISION_PRESETS[name].replace(**overrides)
