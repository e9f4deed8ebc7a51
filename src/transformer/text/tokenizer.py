"""Subword tokenizer: a thin wrapper over a SentencePiece model.

The ids of the special tokens are fixed for every model this package trains:
``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` (BOS) = 2, ``</s>`` (EOS) = 3. Encoding
never adds BOS/EOS; `transformer.data.collate` does that.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from transformer.errors import UserError

MODEL_TYPES = ("bpe", "unigram", "char")
# From this many sequences, decode in one batch call of sentencepiece: the call starts threads, 0.14 ms, where one
# sequence decodes in 0.008 ms (2-core AMD EPYC: one by one was as fast up to 100 sequences).
DECODE_BATCH = 64

# SentencePiece's unigram trainer gives different models for different thread
# counts, so training uses a fixed count rather than the machine's.
_TRAIN_THREADS = 8


class Tokenizer:
    """Text <-> token ids, backed by a SentencePiece model with fixed special ids."""

    PAD, UNK, BOS, EOS = 0, 1, 2, 3

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self._sp = processor

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
        user_symbols: Sequence[str] = (),
        byte_fallback: bool = False,
        verbatim: bool = False,
        sample_size: int = 2_000_000,
    ) -> "Tokenizer":
        """Train a model in memory on `sentences` (one sentence per item).

        `byte_fallback`: characters without a piece of their own are encoded as their UTF-8
        bytes (256 pieces of the vocabulary), so that any text survives encode and decode
        instead of turning into `<unk>`. `verbatim`: no Unicode normalisation, whitespace
        kept as it is (no dummy prefix, runs of spaces kept) and items of up to 1 MiB, as a
        language model needs (with "\\n" among `user_symbols`, decode(encode(text)) == text).
        Deterministic for the same sentences and options. At most `sample_size` sentences (a
        shuffled sample of a bigger corpus: sentencepiece's reservoir sampling, so memory stays
        bounded whatever the length of `sentences`) are used. Raises `UserError` when
        `vocab_size` does not suit the corpus.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, not {model_type!r}")
        text_options = dict(
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            max_sentence_length=1 << 20,
        ) if verbatim else {}
        model = io.BytesIO()
        spm.set_random_generator_seed(0)
        failed: list[Exception] = []
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_kept(sentences, failed),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                user_defined_symbols=list(user_symbols),
                byte_fallback=byte_fallback,
                pad_id=cls.PAD,
                unk_id=cls.UNK,
                bos_id=cls.BOS,
                eos_id=cls.EOS,
                input_sentence_size=sample_size,
                shuffle_input_sentence=True,
                num_threads=_TRAIN_THREADS,
                minloglevel=2,
                **text_options,
            )
        except RuntimeError as e:
            if failed:  # what reading `sentences` raised, which sentencepiece wraps in its own error
                raise failed[0] from None
            raise UserError(_training_problem(str(e), vocab_size)) from None
        return cls.from_bytes(model.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Tokenizer":
        """Tokenizer from a serialized SentencePiece model (as `to_bytes` gives), or, for a JSON document, the
        tokenizer of an imported checkpoint (`text.pretrained`: same methods, its own special ids).

        Raises `ValueError` if `data` is not a model with this package's special ids.
        """
        if data[:1] == b"{":
            from transformer.text.pretrained import from_document

            try:
                return from_document(json.loads(data))
            except (ValueError, AttributeError) as e:
                raise ValueError(str(e)) from None
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError:
            raise ValueError("not a SentencePiece model") from None
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if ids != (cls.PAD, cls.UNK, cls.BOS, cls.EOS):
            raise ValueError(f"special ids pad/unk/bos/eos are {ids}, expected (0, 1, 2, 3)")
        return cls(processor)

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model proto."""
        return self._sp.serialized_model_proto()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a model file written from `to_bytes`; `UserError` naming `path` on failure."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
        try:
            return cls.from_bytes(data)
        except ValueError as e:
            raise UserError(f"{path}: bad tokenizer model: {e}") from None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS. Extra whitespace is ignored."""
        return self._sp.encode(texts, out_type=int)

    encode_target = encode  # one model for both sides (an imported Marian tokenizer has two)

    @property
    def special_ids(self) -> set[int]:
        """Ids that `decode` drops."""
        return {self.PAD, self.BOS, self.EOS}

    def encode_sampled(self, texts: list[str], p: float, seed: int) -> list[list[int]]:
        """Token ids as `encode`, but a segmentation sampled anew: BPE-dropout (Provilkov et al., 2020) for a
        BPE model, each merge skipped with probability `p`; for a unigram model, subword regularisation (Kudo,
        2018) with smoothing `p`. The same (texts, p, seed) give the same ids."""
        spm.set_random_generator_seed(seed)  # one thread below, so the order of the draws is fixed too
        return self._sp.encode(texts, out_type=int, enable_sampling=True, alpha=p, nbest_size=-1, num_threads=1)

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Token ids of each text as an int32 array, the same ids as `encode`, on `threads` threads."""
        return self._sp.encode(texts, return_type="numpy", num_threads=threads)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Detokenized text of each id list; pad, BOS and EOS ids are dropped wherever they are."""
        skip = self.special_ids
        kept = [[i for i in seq if i not in skip] for seq in ids]
        if len(kept) < DECODE_BATCH:  # sentencepiece's batch call starts threads (see DECODE_BATCH)
            return [self._sp.decode(seq) for seq in kept]
        return self._sp.decode(kept)

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i`, e.g. ``"▁the"``."""
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `UNK` if it is not in the vocabulary."""
        return self._sp.piece_to_id(piece)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._sp.get_piece_size()


def _kept(sentences: Iterable[str], failed: list[Exception]) -> Iterator[str]:
    """`sentences`, with an exception raised while reading them put in `failed` as well as raised."""
    try:
        yield from sentences
    except Exception as e:
        failed.append(e)
        raise


def _training_problem(message: str, vocab_size: int) -> str:
    """A one-line explanation of a SentencePiece training failure."""
    too_high = re.search(r"Vocabulary size too high .*<= (\d+)", message)
    if too_high:
        return (
            f"`vocab_size` {vocab_size} is too large for this training text; "
            f"use `vocab_size` {too_high.group(1)} or less"
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return (
            f"`vocab_size` {vocab_size} is smaller than the {too_low.group(1)} characters and "
            "special tokens of the training text; raise it or lower the character coverage"
        )
    if "!sentences_.empty()" in message:
        return "no text to train the tokenizer on"
    return "tokenizer training failed: " + " ".join(message.split())
