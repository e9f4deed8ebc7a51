"""Translation with the paper's recipe (section 5): train on parallel text, validate with BLEU.

Batches grouped by length up to `max_tokens` padded tokens; label-smoothed cross-entropy
(eps 0.1, pad excluded); Adam (0.9, 0.98, 1e-9) with warm-up and inverse square-root
decay (`training.optim`); gradient accumulation over `update_freq` batches. Every
`valid_every` steps: validation loss, perplexity and greedy BLEU, a checkpoint, and the
best model by BLEU at the top of the run directory (`training.loop`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from transformer.config import ModelConfig
from transformer.errors import UserError
from transformer.inference.search import SearchConfig
from transformer.inference.translate import translate_lines
from transformer.model.models import EncoderDecoder
from transformer.report.metrics import score
from transformer.text.data import TokenBatchSampler, collate, encode_pairs, read_lines, read_parallel
from transformer.text.shards import DataFolder
from transformer.text.tokenizer import Tokenizer
from transformer.training import distributed
from transformer.training.lock import guard
from transformer.training.loop import LoopConfig, Objective, fit
from transformer.training.losses import label_smoothed_cross_entropy
from transformer.device import resolve_device
from transformer.training.run import begin, settle


@dataclass(frozen=True)
class TranslationConfig:
    """A translation training run: its data, vocabulary, batching and loss; `loop` has the rest."""

    train_src: Path | None  # None with `data_bin`
    train_tgt: Path | None
    valid_src: Path | None
    valid_tgt: Path | None
    loop: LoopConfig
    data_bin: Path | None = None  # a folder of `transformer preprocess` instead of the text files
    vocab_size: int = 8000  # joint BPE vocabulary
    tokenizer_type: str = "bpe"  # or "unigram"
    byte_fallback: bool = True  # characters unseen in training become UTF-8 byte pieces, not <unk>
    max_tokens: int = 4096  # per batch, padded (see text.data.TokenBatchSampler)
    too_long: str = "skip"  # a pair over max_len or --max-tokens: "skip" it (and count it) or make it an "error"
    max_epochs: int | None = None
    label_smoothing: float = 0.1
    bpe_dropout: float = 0.0  # > 0: each epoch's training text segmented anew (`Segmentations`)
    valid_bleu_lines: int | None = None  # decode only the first N validation lines for BLEU

    def __post_init__(self) -> None:
        if self.too_long not in ("skip", "error"):
            raise UserError(f"`too_long` {self.too_long}: choose skip or error")
        if self.bpe_dropout and self.data_bin is not None:
            raise UserError("`bpe_dropout` segments the training text anew each epoch; it cannot read `data_bin`'s "
                            "fixed ids (give the text files instead)")

    def to_dict(self) -> dict:
        """JSON-ready, without `loop` (the loop records itself)."""
        return {f.name: str(v) if isinstance(v, Path) else v
                for f in dataclasses.fields(self) if f.name != "loop" for v in [getattr(self, f.name)]}

@dataclass
class Corpus:
    src: Sequence[list[int]]  # token ids of each kept pair: lists, or read from a data folder's shards (`Side`)
    tgt: Sequence[list[int]]
    sampler: TokenBatchSampler
    src_text: list[str]
    tgt_text: list[str]


def _load_corpus(src_path: Path, tgt_path: Path, tokenizer: Tokenizer, max_len: int, cfg: TranslationConfig,
                 shuffle: bool, say: Callable) -> Corpus:
    pairs, skipped = read_parallel(src_path, tgt_path)
    if skipped:
        say(f"{src_path}: skipped {skipped} pair(s) with an empty side")
    src, tgt, kept = encode_pairs(tokenizer, pairs, max_len, src_path, tgt_path, cfg.max_tokens,
                                  skip_too_long=cfg.too_long == "skip")
    if not kept:
        raise UserError(f"{src_path}: every pair is too long for the model (max_len {max_len}, `max_tokens` "
                        f"{cfg.max_tokens})")
    if len(kept) < len(pairs):
        say(f"{src_path}: skipped {len(pairs) - len(kept)} pair(s) too long for the model "
            f"(max_len {max_len}, `max_tokens` {cfg.max_tokens}; `too_long` error makes them an error)")
    sampler = TokenBatchSampler([len(s) for s in src], [len(t) for t in tgt], cfg.max_tokens, seed=cfg.loop.seed,
                                shuffle=shuffle)
    return Corpus(src, tgt, sampler, [p.src for p in kept], [p.tgt for p in kept])


def _load_bin(folder: DataFolder, name: str, max_len: int, cfg: TranslationConfig, shuffle: bool,
              say: Callable) -> Corpus:
    """A split of a data folder: no tokenizing; batches from the lengths of its index, ids read when batched."""
    split = folder.split(name)
    longest = np.maximum(split.src_lens, split.tgt_lens)
    fits = (longest <= max_len - 2) & (longest + 1 <= cfg.max_tokens)
    keep = None if fits.all() else np.flatnonzero(fits)
    if keep is not None:
        first = int(np.argmin(fits))
        if cfg.too_long == "error":
            raise UserError(f"{split.sources[0]}:{split.lines[first]}: sentence pair has {longest[first]} tokens, too "
                            f"long for the model (max_len {max_len}, `max_tokens` {cfg.max_tokens}); raise them, "
                            "preprocess with `max_len`, or skip such pairs with `too_long` skip")
        if not len(keep):
            raise UserError(f"{folder.root}: every {name} pair is too long for the model (max_len {max_len}, "
                            f"`max_tokens` {cfg.max_tokens})")
        say(f"{folder.root} {name}: skipped {len(split) - len(keep)} pair(s) too long for the model "
            f"(max_len {max_len}, `max_tokens` {cfg.max_tokens}; `too_long` error makes them an error)")
    lens = (split.src_lens, split.tgt_lens) if keep is None else (split.src_lens[keep], split.tgt_lens[keep])
    sampler = TokenBatchSampler(*lens, cfg.max_tokens, seed=cfg.loop.seed, shuffle=shuffle)
    text: tuple[list[str], list[str]] = ([], [])
    if split.text is not None:
        text = tuple([lines[i] for i in keep] if keep is not None else lines for lines in map(read_lines, split.text))
    return Corpus(split.src(keep), split.tgt(keep), sampler, *text)


def _folder_tokenizer(folder: DataFolder) -> Tokenizer:
    src, tgt = folder.tokenizer_paths()
    if src != tgt:
        raise UserError(f"{folder.root}: has a vocabulary per side, but the model has one joint vocabulary; "
                        "preprocess without `separate_vocab`")
    return Tokenizer.load(src)


class Segmentations:
    """BPE-dropout: epoch e's training pairs in a segmentation sampled from (seed, e) (`Tokenizer.encode_sampled`),
    and its batches. Validation keeps the usual segmentation. A pair whose sampled form no longer fits the model
    or a batch keeps its usual one. Holds one epoch at a time; the same (seed, e) give the same ids on a resume."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, p: float, max_len: int, max_tokens: int,
                 seed: int) -> None:
        self.corpus, self.tokenizer, self.p, self.seed = corpus, tokenizer, p, seed
        self.limit = min(max_len - 2, max_tokens - 1)
        self.epoch: int | None = None
        self.src: Sequence[list[int]] = corpus.src
        self.tgt: Sequence[list[int]] = corpus.tgt

    def pairs(self, epoch: int) -> tuple[Sequence[list[int]], Sequence[list[int]]]:
        """Source and target ids of every training pair in epoch `epoch`."""
        if epoch != self.epoch:
            seed = (self.seed * 1_000_003 + epoch) * 2 % 2**32
            src = self.tokenizer.encode_sampled(self.corpus.src_text, self.p, seed)
            tgt = self.tokenizer.encode_sampled(self.corpus.tgt_text, self.p, seed + 1)
            fits = [max(len(s), len(t)) <= self.limit for s, t in zip(src, tgt)]
            self.src = [s if ok else usual for s, usual, ok in zip(src, self.corpus.src, fits)]
            self.tgt = [t if ok else usual for t, usual, ok in zip(tgt, self.corpus.tgt, fits)]
            self.epoch = epoch
        return self.src, self.tgt

    def arrays(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches, cut by the lengths of its segmentation (`TokenBatchSampler.arrays`)."""
        src, tgt = self.pairs(epoch)
        sampler = self.corpus.sampler
        return TokenBatchSampler([len(s) for s in src], [len(t) for t in tgt], sampler.max_tokens,
                                 seed=sampler.seed, shuffle=True).arrays(epoch)


class EpochBatches:
    """The i-th batch counting across epochs: epoch e's batches (seeded by e) follow epoch e-1's.

    `sampler` is a `TokenBatchSampler`, or `Segmentations` whose batches change with the epoch."""

    def __init__(self, sampler: TokenBatchSampler | Segmentations) -> None:
        self.sampler = sampler
        self.epoch, self.start, self.batches = 0, 0, sampler.arrays(0)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < self.start:  # only on a fresh lookup after a restart: walk again from epoch 0
            self.epoch, self.start, self.batches = 0, 0, self.sampler.arrays(0)
        while i >= self.start + len(self.batches):
            self.epoch, self.start = self.epoch + 1, self.start + len(self.batches)
            self.batches = self.sampler.arrays(self.epoch)
        return self.batches[i - self.start]

    def steps_in(self, epochs: int, update_freq: int) -> int:
        """Optimiser steps that the first `epochs` epochs make."""
        batches = sum(len(self.sampler.arrays(e)) for e in range(epochs))
        return -(-batches // update_freq)


def _to_device(corpus: Corpus, idx: list[int], device: torch.device, ids: ModelConfig,
               segmentations: Segmentations | None = None, epoch: int = 0):
    """A collated batch on `device` with the special ids of `ids` (a model config); on CUDA through pinned
    memory, copied without blocking."""
    src, tgt = segmentations.pairs(epoch) if segmentations is not None else (corpus.src, corpus.tgt)
    tensors = collate([src[i] for i in idx], [tgt[i] for i in idx], ids.pad_id, ids.bos_id, ids.eos_id)
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def validate(
    model: EncoderDecoder, tokenizer: Tokenizer, corpus: Corpus, cfg: TranslationConfig, device: torch.device
) -> dict[str, float]:
    """Validation loss, perplexity and greedy BLEU (the loop calls it in eval mode, without gradients)."""
    loss_sum = nll_sum = n = 0.0
    for idx in corpus.sampler.batches(0):
        src, tgt_in, tgt_out = _to_device(corpus, idx, device, model.cfg)
        loss, nll, count = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, cfg.label_smoothing, model.cfg.pad_id)
        loss_sum, nll_sum, n = loss_sum + loss.item(), nll_sum + nll.item(), n + count.item()
    lines = cfg.valid_bleu_lines or len(corpus.src_text)
    hyps = translate_lines(model, tokenizer, corpus.src_text[:lines], SearchConfig(beam=1), batch_size=128)
    bleu = score(hyps, corpus.tgt_text[:lines]).bleu
    return {"loss": loss_sum / n, "nll": nll_sum / n, "ppl": math.exp(min(nll_sum / n, 50.0)), "bleu": bleu}


def _tokenizer(cfg: TranslationConfig, say: Callable) -> Tokenizer:
    """The joint vocabulary of a new run, trained on both sides of the training pairs."""
    pairs, _ = read_parallel(cfg.train_src, cfg.train_tgt)
    say(f"training a {cfg.vocab_size}-token joint {cfg.tokenizer_type} vocabulary on {len(pairs)} pairs")
    return Tokenizer.train((s for p in pairs for s in (p.src, p.tgt)), cfg.vocab_size,
                           model_type=cfg.tokenizer_type, byte_fallback=cfg.byte_fallback)


def train(cfg: TranslationConfig, model_cfg: ModelConfig, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) a run in `cfg.loop.out`; returns the run directory. The best model is at its top."""
    with guard(cfg.loop.out, say):  # one command at a time per run directory
        return _train(cfg, model_cfg, say)


def _train(cfg: TranslationConfig, model_cfg: ModelConfig, say: Callable[[str], None]) -> Path:
    distributed.bind_cuda_device()  # under torchrun: "cuda" is cuda:LOCAL_RANK
    device = resolve_device(cfg.loop.device)
    world = distributed.env_world()
    say = say if world.main else (lambda _: None)

    def shape(vocab_size: int) -> ModelConfig:
        return model_cfg.replace(vocab_size=vocab_size, pad_id=Tokenizer.PAD)

    folder = DataFolder.open(cfg.data_bin) if cfg.data_bin is not None else None  # checked before anything
    model, stored_cfg, tokenizer, state, recorded = begin(
        cfg.loop, "encoder-decoder", shape, lambda: _folder_tokenizer(folder) if folder else _tokenizer(cfg, say),
        device, say)
    loop = cfg.loop
    meta = {"translation": cfg.to_dict()}
    if recorded is not None:  # a resume that would change the run is refused before the data is read
        settle(loop, stored_cfg, shape(stored_cfg.vocab_size), recorded, meta, lambda _: None)
    if folder is not None:
        if tokenizer.to_bytes() != _folder_tokenizer(folder).to_bytes():
            raise UserError(f"`data_bin` {folder.root}: its vocabulary is not the one of the run in {loop.out}")
        say(f"{folder.root}: " + "; ".join(folder.describe(name) for name in ("train", "valid") if folder.has(name)))
        train_data = _load_bin(folder, "train", stored_cfg.max_len, cfg, True, say)
        valid_data = _load_bin(folder, "valid", stored_cfg.max_len, cfg, False, say)
    else:
        train_data = _load_corpus(cfg.train_src, cfg.train_tgt, tokenizer, stored_cfg.max_len, cfg, True, say)
        valid_data = _load_corpus(cfg.valid_src, cfg.valid_tgt, tokenizer, stored_cfg.max_len, cfg, False, say)
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"data: {len(train_data.src)} training, {len(valid_data.src)} validation pairs")
    segmentations = None
    if cfg.bpe_dropout:
        say(f"BPE-dropout {cfg.bpe_dropout}: each epoch's training pairs segmented anew")
        segmentations = Segmentations(train_data, tokenizer, cfg.bpe_dropout, stored_cfg.max_len, cfg.max_tokens,
                                      loop.seed)
    batches = EpochBatches(segmentations or train_data.sampler)
    if cfg.max_epochs is not None:
        epoch_steps = batches.steps_in(cfg.max_epochs, loop.update_freq * world.world_size)
        loop = dataclasses.replace(loop, max_steps=min(loop.max_steps or epoch_steps, epoch_steps))
    loop = settle(loop, stored_cfg, shape(stored_cfg.vocab_size), recorded, meta, say)

    def loss(model: EncoderDecoder, batch) -> tuple[torch.Tensor, int]:
        src, tgt_in, tgt_out = batch
        loss, _, n = label_smoothed_cross_entropy(model(src, tgt_in), tgt_out, cfg.label_smoothing, stored_cfg.pad_id)
        return loss, int(n)

    def batch(i: int):
        idx = batches[i]  # first: it moves `batches.epoch` to the epoch of batch i
        return _to_device(train_data, idx, device, stored_cfg, segmentations, batches.epoch)

    objective = Objective(
        batch=batch, loss=loss,
        validate=lambda m: validate(m, tokenizer, valid_data, cfg, device), best_metric="bleu", higher_is_better=True,
    )
    return fit(loop, model, stored_cfg, tokenizer, objective, state, meta, say)
