"""GPT-style (decoder-only) language model: training on a text file, and sampling.

The text is one long token stream. Its first (1 - valid_fraction) characters are the
training data, the rest the validation data (nanoGPT's split for Tiny Shakespeare). A
batch is `batch_size` windows of `block_size` + 1 tokens at random offsets (inputs and
next-token targets); the offsets of optimiser step s are drawn from a generator seeded
with (seed, s), so resume is exact. Validation loss is the mean cross-entropy over a
fixed set of `eval_batches` validation batches (the same windows at every evaluation).

Vocabulary (`vocab`): both kinds are sentencepiece models stored in the model directory,
trained with the settings a language model needs, unlike translation's: no Unicode
normalisation, whitespace kept as it is (no dummy prefix, runs of spaces kept), and the
newline a token of its own, so that decode(encode(text)) == text.

- "char": one token per character of the training text (Tiny Shakespeare: its 65
  characters, plus the 4 special ids pad/unk/BOS/EOS that every model here has).
- "bpe": sentencepiece BPE with `vocab_size` pieces; pieces never cross a newline.

The model is `DecoderOnly` (ModelConfig arch "decoder") with max_len = block_size.
Sampling continues a prompt with `inference.sampling.sample` (KV cache). Longer than the block, it
slides: each further call keeps the last block_size / 2 tokens as context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.model.models import DecoderOnly
from transformer.text.data import read_text as read_file
from transformer.inference.lm import NEWLINE, encode_text
from transformer.text.tokenizer import Tokenizer
from transformer.training import distributed
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.device import resolve_device
from transformer.training.run import begin, settle



@dataclass(frozen=True)
class LMConfig:
    text: Path
    loop: LoopConfig
    vocab: str = "char"  # char | bpe
    vocab_size: int = 1000  # bpe only
    valid_fraction: float = 0.1  # the last 10% of the text
    block_size: int = 64
    batch_size: int = 12
    eval_batches: int = 50

    def to_dict(self) -> dict:
        """JSON-ready, without `loop` (the loop records itself)."""
        return {"text": str(self.text), "vocab": self.vocab, "vocab_size": self.vocab_size,
                "valid_fraction": self.valid_fraction, "block_size": self.block_size,
                "batch_size": self.batch_size, "eval_batches": self.eval_batches}


def read_text(path: Path) -> str:
    """The training text; `UserError` if it cannot be read or holds no text."""
    text = read_file(path)
    if not text.strip():
        raise UserError(f"{path}: no text")
    return text


def train_tokenizer(text: str, vocab: str, vocab_size: int = 1000) -> Tokenizer:
    """A sentencepiece model for LM text: exact round trip, newline a piece (see module docstring)."""
    if vocab not in ("char", "bpe"):
        raise UserError(f"`vocab` {vocab}: choose char or bpe")
    lines = text.split(NEWLINE)
    # Training "sentences": runs of 20 lines with their newlines (sentencepiece wants bounded items).
    chunks = [NEWLINE.join(lines[i : i + 20]) + NEWLINE for i in range(0, len(lines), 20)]
    if vocab == "char":
        vocab_size = len(set(text) | {NEWLINE}) + 4
    return Tokenizer.train(chunks, vocab_size, model_type=vocab, user_symbols=[NEWLINE], verbatim=True)


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    if not 0 < valid_fraction < 1:
        raise UserError(f"`valid_fraction` {valid_fraction}: must be between 0 and 1")
    cut = int(len(text) * (1 - valid_fraction))
    return text[:cut], text[cut:]


def windows(data: torch.Tensor, block: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random windows of data: inputs (B, block) and next-token targets (B, block)."""
    starts = torch.randint(len(data) - block, (batch,), generator=generator)
    x = torch.stack([data[i : i + block] for i in starts.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in starts.tolist()])
    return x, y


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lm_loss(model: DecoderOnly, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"), y.numel()


def _model_config(model_cfg: ModelConfig, vocab_size: int, block: int) -> ModelConfig:
    """The decoder-only shape an LM run trains: the flags' model with this vocabulary and block."""
    return model_cfg.replace(arch="decoder", vocab_size=vocab_size, pad_id=Tokenizer.PAD, max_len=block,
                             n_encoder_layers=0)


def train_lm(cfg: LMConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a GPT-style model on cfg.text; returns the run directory."""
    with guard(cfg.loop.out, say):  # one command at a time per run directory
        return _train_lm(cfg, model_cfg, say)


def _train_lm(cfg: LMConfig, model_cfg: ModelConfig, say: Callable[[str], None]) -> Path:
    distributed.bind_cuda_device()  # under torchrun: "cuda" is cuda:LOCAL_RANK
    loop, device = cfg.loop, resolve_device(cfg.loop.device)
    train_text, valid_text = split_text(read_text(cfg.text), cfg.valid_fraction)

    def new_tokenizer() -> Tokenizer:
        tokenizer = train_tokenizer(train_text, cfg.vocab, cfg.vocab_size)
        say(f"{cfg.vocab} vocabulary of {tokenizer.vocab_size} tokens (4 special)")
        return tokenizer

    def shape(vocab_size: int) -> ModelConfig:
        return _model_config(model_cfg, vocab_size, cfg.block_size)

    model, stored_cfg, tokenizer, state, recorded = begin(loop, "decoder", shape, new_tokenizer, device, say)
    # the model's block; a fine-tuning run (`init`) trains on windows of `block_size` within it
    block = min(cfg.block_size, stored_cfg.max_len) if loop.init is not None else stored_cfg.max_len
    meta = {"lm": cfg.to_dict()}
    loop = settle(loop, stored_cfg, shape(stored_cfg.vocab_size), recorded, meta, say)
    train_data, valid_data = encode_text(tokenizer, train_text), encode_text(tokenizer, valid_text)
    for name, data in (("training", train_data), ("validation", valid_data)):
        if len(data) <= block + 1:
            raise UserError(f"{cfg.text}: the {name} part has {len(data)} tokens, fewer than block size {block} + 2")
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"data: {len(train_data):,} training, {len(valid_data):,} validation tokens")
    valid_batches = [
        windows(valid_data, block, cfg.batch_size, step_generator(loop.seed + 7919, i)) for i in range(cfg.eval_batches)
    ]

    def batch(step: int):
        x, y = windows(train_data, block, cfg.batch_size, step_generator(loop.seed, step))
        return x.to(device), y.to(device)

    def validate(model: DecoderOnly) -> dict[str, float]:
        total = n = 0.0
        for x, y in valid_batches:
            loss, count = lm_loss(model, (x.to(device), y.to(device)))
            total, n = total + loss.item(), n + count
        return {"loss": total / n}

    objective = Objective(batch=batch, loss=lm_loss, validate=validate, best_metric="loss", higher_is_better=False)
    return fit(loop, model, stored_cfg, tokenizer, objective, state, meta, say)
