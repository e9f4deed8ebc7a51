"""The tokenizers of imported checkpoints, with the interface of `text.tokenizer.Tokenizer`.

- `HubTokenizer`: a Hugging Face `tokenizers` tokenizer (its tokenizer.json), as BERT's WordPiece and
  GPT-2's byte-level BPE ship; it tokenizes exactly as the checkpoint's own fast tokenizer.
- `MarianTokenizer`: OPUS-MT's two SentencePiece models (source and target) and the one vocabulary
  (vocab.json) that maps their pieces to the model's ids, as Marian and Hugging Face's
  `MarianTokenizer` use them: a piece outside the vocabulary is `<unk>`, a leading language code
  ``>>xx<<`` is one token.

Both are stored in a model directory's tokenizer.model as one JSON document (`to_bytes`);
`text.tokenizer.Tokenizer.from_bytes` tells them from a SentencePiece model. Encoding never adds special
tokens (the callers add BOS/EOS, [CLS]/[SEP] with the model config's ids); decoding drops them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import sentencepiece as spm

from transformer.errors import UserError

HUB, MARIAN = "huggingface-tokenizers", "marian-sentencepiece"
SPACE = "\u2581"  # SentencePiece's word boundary


class HubTokenizer:
    """Text <-> ids through a `tokenizers.Tokenizer`; `unk` is its unknown token (or None)."""

    def __init__(self, tokenizer: Any, unk: str | None = None) -> None:
        tokenizer.no_padding()  # ids are padded by the callers, and never cut
        tokenizer.no_truncation()
        self._tok = tokenizer
        self._unk = unk
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_file(cls, file: Path, unk: str | None = None) -> "HubTokenizer":
        """The tokenizer of a tokenizer.json; `UserError` naming the file when it is not one."""
        try:
            return cls.from_json(file.read_text(encoding="utf-8"), unk)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{file}: cannot read: {' '.join(str(e).split())}") from None

    @classmethod
    def wordpiece(cls, vocab: Path, specials: list[str], unk: str, lowercase: bool = True,
                  strip_accents: bool | None = None, chinese_chars: bool = True) -> "HubTokenizer":
        """BERT's WordPiece from its vocab.txt (one token a line, the line's number its id), as BERT's own
        tokenizer splits: cleaned text, CJK characters apart, lowercased (and accents stripped, unless
        `strip_accents` says otherwise) when `lowercase`, words and punctuation, then the longest pieces."""
        from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers

        backend = Backend(_read_model(lambda: models.WordPiece.from_file(str(vocab), unk_token=unk), vocab))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                        strip_accents=strip_accents, lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        return cls(_with_specials(backend, specials), unk)

    @classmethod
    def byte_level_bpe(cls, vocab: Path, merges: Path, specials: list[str],
                       add_prefix_space: bool = False) -> "HubTokenizer":
        """GPT-2's byte-level BPE from its vocab.json and merges.txt: the text's UTF-8 bytes as 256 symbols,
        split by GPT-2's pattern (words, numbers, punctuation, runs of spaces), then merged."""
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

        backend = Backend(_read_model(lambda: models.BPE.from_file(str(vocab), str(merges)), vocab))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        return cls(_with_specials(backend, specials))

    @classmethod
    def from_json(cls, text: str, unk: str | None = None) -> "HubTokenizer":
        from tokenizers import Tokenizer as Backend

        try:
            return cls(Backend.from_str(text), unk)
        except Exception as e:  # the library raises its own exception type for a bad document
            raise ValueError(f"not a tokenizers document ({' '.join(str(e).split())})") from None

    def to_bytes(self) -> bytes:
        return json.dumps({"format": HUB, "unk": self._unk, "tokenizer": json.loads(self._tok.to_str())},
                          ensure_ascii=False).encode("utf-8")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added ([CLS]/[SEP] are the caller's)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    encode_target = encode

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode(texts)]

    def encode_sampled(self, texts: list[str], p: float, seed: int) -> list[list[int]]:
        raise UserError("`bpe_dropout` needs a SentencePiece vocabulary; an imported tokenizer has none")

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Text of each id list, special tokens dropped."""
        return self._tok.decode_batch([list(map(int, seq)) for seq in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`; the unknown token's id (or -1 without one) when it is not in the vocabulary."""
        i = self._tok.token_to_id(piece)
        if i is None:
            i = self._tok.token_to_id(self._unk) if self._unk is not None else None
        return -1 if i is None else i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _read_model(read: Callable[[], Any], file: Path) -> Any:
    """The `tokenizers` model that `read()` makes from `file`; `UserError` naming the file when it fails."""
    try:
        return read()
    except Exception as e:  # the library raises its own exception type for a bad file
        raise UserError(f"{file}: cannot read: {' '.join(str(e).split())}") from None


def _with_specials(backend: Any, specials: list[str]) -> Any:
    """`backend` with `specials` as special tokens: matched whole in the raw text, dropped by `decode`."""
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    return backend


class MarianTokenizer:
    """OPUS-MT's tokenization: source and target SentencePiece models, one shared vocabulary."""

    def __init__(self, source: bytes, target: bytes, vocab: dict[str, int], unk: int, specials: list[int]) -> None:
        self._source_bytes, self._target_bytes = source, target
        self._source, self._target = _processor(source, "source"), _processor(target, "target")
        self.vocab = vocab
        self._pieces = {i: p for p, i in vocab.items()}
        self.unk = unk
        self.special_ids = set(specials)

    @property
    def source_bytes(self) -> bytes:
        """The source SentencePiece model (source.spm)."""
        return self._source_bytes

    @property
    def target_bytes(self) -> bytes:
        """The target SentencePiece model (target.spm)."""
        return self._target_bytes

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": MARIAN, "unk": self.unk, "specials": sorted(self.special_ids), "vocab": self.vocab,
            "source": base64.b64encode(self._source_bytes).decode("ascii"),
            "target": base64.b64encode(self._target_bytes).decode("ascii"),
        }, ensure_ascii=False).encode("utf-8")

    def _ids(self, processor: spm.SentencePieceProcessor, text: str) -> list[int]:
        code = []
        if text.startswith(">>") and text.find("<<") != -1:  # a target-language code: one token
            end = text.find("<<") + 2
            code, text = [text[:end]], text[end:]
        return [self.vocab.get(p, self.unk) for p in code + processor.encode(text, out_type=str)]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of source texts (the source SentencePiece model), without the EOS."""
        return [self._ids(self._source, t) for t in texts]

    def encode_target(self, texts: list[str]) -> list[list[int]]:
        """Ids of target texts (the target SentencePiece model), without BOS and EOS."""
        return [self._ids(self._target, t) for t in texts]

    def encode_arrays(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode(texts)]

    def encode_sampled(self, texts: list[str], p: float, seed: int) -> list[list[int]]:
        raise UserError("`bpe_dropout` needs this package's own SentencePiece vocabulary; an imported Marian "
                        "tokenizer has two")

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Target text of each id list, special tokens dropped, as Hugging Face's ``batch_decode(ids,
        skip_special_tokens=True)``: the pieces through the target SentencePiece model, then any ``▁`` left
        (a piece that model does not know, such as a source-only piece of the shared vocabulary) as a
        space, and the ends stripped."""
        return [self._target.decode_pieces([self._pieces.get(int(i), "") for i in seq if int(i) not in
                                            self.special_ids]).replace(SPACE, " ").strip() for seq in ids]

    def id_to_piece(self, i: int) -> str:
        return self._pieces.get(int(i), "")

    def piece_to_id(self, piece: str) -> int:
        return self.vocab.get(piece, self.unk)

    @property
    def vocab_size(self) -> int:
        return max(self._pieces) + 1


def _processor(data: bytes, side: str) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except RuntimeError:
        raise ValueError(f"the {side} SentencePiece model is not valid") from None
    return processor


def from_document(doc: dict) -> HubTokenizer | MarianTokenizer:
    """The tokenizer of a JSON document written by `to_bytes`; `ValueError` when it is not one."""
    kind = doc.get("format")
    if kind == HUB and isinstance(doc.get("tokenizer"), dict):
        return HubTokenizer.from_json(json.dumps(doc["tokenizer"]), doc.get("unk"))
    if kind == MARIAN:
        try:
            return MarianTokenizer(base64.b64decode(doc["source"]), base64.b64decode(doc["target"]),
                                   {str(k): int(v) for k, v in doc["vocab"].items()}, int(doc["unk"]),
                                   [int(i) for i in doc["specials"]])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"bad Marian tokenizer document ({e})") from None
    raise ValueError(f"unknown tokenizer format {kind!r}")
