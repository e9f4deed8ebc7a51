"""Hugging Face ViT (`ViTForImageClassification`) -> our `ViT` (model/vision.py), weight for weight.

The two models compute the same function: a P × P patch convolution with stride P is a linear map
of each flattened (C, P, P) patch, which is what `patches` hands our `PatchEmbedding`; a learned
[CLS] token and learned positions; pre-norm encoder layers with a final LayerNorm; a linear
classifier on the [CLS] output. The separate query, key and value projections become our one fused
`in_proj` (rows q, k, v); with ``qkv_bias`` false their biases are zero, which is the same function.

Preprocessing. Our `ImageClassifier` (and `vit predict`, `vit attention`, `train --init`) feeds the
model images in [0, 1] (pixel / 255). The Hugging Face image processor instead gives the model
``((pixel · rescale_factor) - image_mean) / image_std`` per channel. That map is affine in our
input, so it is folded into the patch projection (its weight scaled per channel, its bias shifted):
the imported model takes our [0, 1] images and computes what the Hugging Face model computes on the
processor's output. With no preprocessor_config.json nothing is folded (the model then takes the
pixel values the Hugging Face model takes). The processor's resizing is not done by us: images must
be of the model's size, as for every ViT of ours. The meta records what was folded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from transformer.config import VisionConfig
from transformer.errors import UserError
from transformer.pretrained import Converted
from transformer.pretrained.common import activation
from transformer.pretrained.folder import HFFolder, read_json

PREFIX = "vit."  # ViTForImageClassification's backbone; a bare ViTModel has none
PREPROCESSOR = "preprocessor_config.json"


def convert(folder: HFFolder) -> Converted:
    """The ViT classifier in `folder` as our `ViT`'s config and state dict; `UserError` (one line) for a
    checkpoint without a classifier, an option we do not take, or a tensor of the wrong shape."""
    _classifier_or_refuse(folder)
    cfg = vision_config(folder)
    classes = class_names(folder, cfg.n_classes)
    state = weights(folder, cfg)
    scale, shift, record = preprocessing(folder, cfg.channels)
    state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"] = fold_affine_input(
        state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"], scale, shift,
        cfg.patch_size)
    meta = {"vit": {"imported": "ViTForImageClassification", "preprocessing": record}, "classes": classes}
    return Converted(cfg, state, b"", meta, "vit")


def _classifier_or_refuse(folder: HFFolder) -> None:
    """Refuse a checkpoint with no image classifier: masked image modelling (a pixel decoder) or a bare ViTModel."""
    if folder.has("classifier.weight"):
        return
    architectures = folder.option("architectures") or []
    if "ViTForMaskedImageModeling" in architectures or any(k.startswith("decoder.") for k in folder.tensors):
        raise UserError(f"{folder.path}: a ViTForMaskedImageModeling checkpoint (it reconstructs pixels, "
                        "encoder_stride); only ViTForImageClassification, which has a classifier, can be imported")
    raise UserError(f"{folder.path}: no tensor classifier.weight: a ViTModel without a classification head; "
                    "only ViTForImageClassification can be imported")


def _pair(folder: HFFolder, key: str, default: int) -> tuple[int, int]:
    """config.json's `key` (an int, or [height, width]) as (height, width)."""
    value = folder.option(key, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return value[0], value[1]
    raise UserError(f"{folder.path / 'config.json'}: {key} {value!r}: expected an integer or [height, width]")


def vision_config(folder: HFFolder) -> VisionConfig:
    """Our `VisionConfig` of the checkpoint's ViTConfig (pre-norm, [CLS] pooling, learned positions)."""
    height, width = _pair(folder, "image_size", 224)
    patch_h, patch_w = _pair(folder, "patch_size", 16)
    if patch_h != patch_w:
        folder.refuse("patch_size", folder.option("patch_size"), "our ViT takes square patches only")
    if height % patch_h or width % patch_w:
        folder.refuse("image_size", folder.option("image_size"),
                      f"not a whole number of patches of {patch_h}x{patch_w} (our ViT uses every pixel)")
    act = activation(folder, "hidden_act", "gelu")
    d = folder.need("hidden_size")
    classes = folder.tensor("classifier.weight").shape[0]
    try:
        return VisionConfig(
            image_height=height, image_width=width, channels=folder.option("num_channels", 3), patch_size=patch_h,
            d_model=d, n_heads=folder.need("num_attention_heads"), d_ff=folder.option("intermediate_size", 4 * d),
            n_layers=folder.need("num_hidden_layers"), dropout=float(folder.option("hidden_dropout_prob", 0.0)),
            norm_first=True, activation=act, pool="cls", positions="learned", n_classes=classes,
            layer_norm_eps=float(folder.option("layer_norm_eps", 1e-12)))
    except UserError as e:
        raise UserError(f"{folder.path / 'config.json'}: {e}") from None


def class_names(folder: HFFolder, n_classes: int) -> list[str]:
    """The names of classes 0 .. n_classes - 1 from config.json's id2label (absent: "0", "1", ...)."""
    id2label = folder.option("id2label")
    if id2label is None:
        return [str(i) for i in range(n_classes)]
    if not isinstance(id2label, dict):
        folder.refuse("id2label", id2label, "expected an object of class id -> name")
    names = {str(k): str(v) for k, v in id2label.items()}
    if sorted(names) != sorted(str(i) for i in range(n_classes)):
        folder.refuse("id2label", id2label, f"expected the ids 0 .. {n_classes - 1} (the classifier's rows)")
    return [names[str(i)] for i in range(n_classes)]


def weights(folder: HFFolder, cfg: VisionConfig) -> dict[str, Tensor]:
    """Our `ViT`'s state dict (nothing folded yet): embeddings, layers, final LayerNorm, head."""
    d, p, n = cfg.d_model, cfg.patch_size, cfg.n_patches
    emb = PREFIX + "embeddings."
    conv = folder.tensor(emb + "patch_embeddings.projection.weight", (d, cfg.channels, p, p))
    state = {
        "encoder.cls": folder.tensor(emb + "cls_token", (1, 1, d)),
        "encoder.positions": folder.tensor(emb + "position_embeddings", (1, n + 1, d))[0],  # (N + 1, d)
        "encoder.patch_embed.proj.weight": conv.reshape(d, -1),  # (d, C·P·P): each patch as (C, P, P) row-major
        "encoder.patch_embed.proj.bias": folder.tensor(emb + "patch_embeddings.projection.bias", (d,)),
        "encoder.encoder.norm.weight": folder.tensor(PREFIX + "layernorm.weight", (d,)),
        "encoder.encoder.norm.bias": folder.tensor(PREFIX + "layernorm.bias", (d,)),
        "head.weight": folder.tensor("classifier.weight", (cfg.n_classes, d)),
        "head.bias": folder.tensor("classifier.bias", (cfg.n_classes,)),
    }
    for i in range(cfg.n_layers):
        state |= _layer(folder, i, cfg)
    return state


def _layer(folder: HFFolder, i: int, cfg: VisionConfig) -> dict[str, Tensor]:
    """Layer i's tensors under our names: q, k, v fused into in_proj (3d, d); zero q/k/v biases with qkv_bias false."""
    d, ff = cfg.d_model, cfg.d_ff
    hf, ours = f"{PREFIX}encoder.layer.{i}.", f"encoder.encoder.layers.{i}."
    qkv_bias = folder.option("qkv_bias", True)
    attn = hf + "attention.attention."
    q, k, v = (folder.tensor(f"{attn}{name}.weight", (d, d)) for name in ("query", "key", "value"))
    if qkv_bias:
        biases = [folder.tensor(f"{attn}{name}.bias", (d,)) for name in ("query", "key", "value")]
    else:
        biases = [torch.zeros(d)] * 3
    pairs = {  # our name -> (theirs, shape of the weight)
        "self_attn.out_proj": ("attention.output.dense", (d, d)),
        "res_attn.norm": ("layernorm_before", (d,)),
        "ffn.w1": ("intermediate.dense", (ff, d)),
        "ffn.w2": ("output.dense", (d, ff)),
        "res_ffn.norm": ("layernorm_after", (d,)),
    }
    state = {ours + "self_attn.in_proj.weight": torch.cat([q, k, v]),  # (3d, d), rows q, k, v
             ours + "self_attn.in_proj.bias": torch.cat(biases)}
    for mine, (theirs, shape) in pairs.items():
        state[f"{ours}{mine}.weight"] = folder.tensor(f"{hf}{theirs}.weight", shape)
        state[f"{ours}{mine}.bias"] = folder.tensor(f"{hf}{theirs}.bias", shape[:1])
    return state


def _channel_values(folder: HFFolder, config: dict[str, Any], key: str, default: float, channels: int) -> Tensor:
    """(C,): preprocessor option `key` (one number, or one per channel), float64."""
    value = config.get(key, default)
    values = value if isinstance(value, (list, tuple)) else [value] * channels
    if len(values) != channels or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{folder.path / PREPROCESSOR}: {key} {value!r}: expected {channels} number(s), "
                        f"one per channel")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def preprocessing(folder: HFFolder, channels: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(scale (C,), shift (C,), record): the Hugging Face processor's input is scale · ours + shift per
    channel, ours being pixel / 255; the record (for meta) says what was folded and what is not done."""
    file = folder.file(PREPROCESSOR)
    if file is None:
        return torch.ones(channels), torch.zeros(channels), {"folded": None, "note": f"no {PREPROCESSOR}: "
                                                             "the model takes the pixel values given"}
    config = read_json(file)
    if not isinstance(config, dict):
        raise UserError(f"{file}: not a JSON object")
    # absent options: ViTImageProcessor's defaults (rescale by 1/255, normalise with mean 0.5, std 0.5)
    rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool):
        raise UserError(f"{file}: rescale_factor {rescale!r}: expected a number")
    scale = torch.full((channels,), 255 * float(rescale), dtype=torch.float64)  # HF's rescaled pixel = scale · ours
    shift = torch.zeros(channels, dtype=torch.float64)
    if config.get("do_normalize", True):
        mean = _channel_values(folder, config, "image_mean", 0.5, channels)
        std = _channel_values(folder, config, "image_std", 0.5, channels)
        if bool((std == 0).any()):
            raise UserError(f"{file}: image_std {config.get('image_std')!r}: a zero divides")
        scale, shift = scale / std, -mean / std
    record = {"folded": {"scale": scale.tolist(), "shift": shift.tolist()},
              "processor": {k: config.get(k) for k in ("image_processor_type", "do_rescale", "rescale_factor",
                                                       "do_normalize", "image_mean", "image_std", "do_resize",
                                                       "size") if k in config},
              "note": "images in [0, 1] of the model's size; the processor's resizing is not done"}
    return scale.float(), shift.float(), record


def fold_affine_input(weight: Tensor, bias: Tensor, scale: Tensor, shift: Tensor,
                      patch_size: int) -> tuple[Tensor, Tensor]:
    """The patch projection (weight (d, C·P·P), bias (d,)) that, applied to x, gives the original applied to
    scale_c · x + shift_c per channel c (scale, shift (C,)): W' = W · scale, b' = b + W · shift."""
    per_input = patch_size * patch_size  # a patch is (C, P, P) row-major: channel c owns a run of P·P inputs
    scale_in = scale.double().repeat_interleave(per_input)  # (C·P·P,)
    shift_in = shift.double().repeat_interleave(per_input)
    w = weight.double()
    return (w * scale_in).float(), (bias.double() + w @ shift_in).float()
