"""What the converters share: activation names, weight copies, output tying, the tokenizer's options."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from transformer.errors import UserError
from transformer.pretrained.folder import HFFolder, read_json
from transformer.text.pretrained import HubTokenizer


# Hugging Face's activation names (config.json's hidden_act, activation_function) -> our `activation`
ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "swish", "swish": "swish"}


def activation(folder: HFFolder, key: str, default: str) -> str:
    """Our name of the activation config.json's `key` names; `UserError` for one we do not have."""
    name = folder.option(key, default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        folder.refuse(key, name, f"the activations imported are {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def affine(folder: HFFolder, theirs: str, ours: str, shape: tuple[int, ...], conv1d: bool = False
           ) -> dict[str, Tensor]:
    """{ours.weight, ours.bias} from the layer `theirs`: a Linear's weight `shape` (out, in) or a LayerNorm's
    (d,) (old checkpoints' gamma, beta); `conv1d`: GPT-2's Conv1D, whose weight is stored (in, out)."""
    stored = tuple(reversed(shape)) if conv1d else shape
    weight = folder.tensor(f"{theirs}.weight", stored, f"{theirs}.gamma")
    return {f"{ours}.weight": weight.t().contiguous() if conv1d else weight,
            f"{ours}.bias": folder.tensor(f"{theirs}.bias", shape[:1], f"{theirs}.beta")}


def output_projection(folder: HFFolder, name: str, embeddings: Tensor) -> Tensor | None:
    """The vocabulary projection (V, d): None when it is the token `embeddings` (tied: the tensor `name` is
    absent while config.json's tie_word_embeddings is true, or equal to them), else the tensor `name`.
    Hugging Face ties them the same way: a stored projection that differs is kept apart."""
    if not folder.has(name) and folder.option("tie_word_embeddings", True):
        return None
    weight = folder.tensor(name, tuple(embeddings.shape))
    return None if torch.equal(weight, embeddings) else weight


def tokenizer_options(folder: HFFolder) -> dict[str, Any]:
    """tokenizer_config.json as a dict ({} without one)."""
    file = folder.file("tokenizer_config.json")
    options = read_json(file) if file is not None else {}
    return options if isinstance(options, dict) else {}


def token_name(options: dict[str, Any], key: str, default: str) -> str:
    """The special token `key` of tokenizer_config.json (a string, or an AddedToken's object), else `default`."""
    value = options.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def check_vocabulary(folder: HFFolder, tokenizer: HubTokenizer, vocab_size: int) -> None:
    """`UserError` when the tokenizer gives ids the model has no embedding for."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{folder.path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size "
                        f"is {vocab_size}")
