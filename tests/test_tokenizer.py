from pathlib import Path

import pytest

from transformer.corpora import multi30k_dir
from transformer.errors import UserError
from transformer.text.tokenizer import Tokenizer

DATA = multi30k_dir()  # the vendored copy: tests need nothing outside the repository


def _lines(name: str, start: int, stop: int) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").split("\n")[start:stop]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _lines("train.en", 0, 250) + _lines("train.de", 0, 250)


@pytest.fixture(scope="module")
def tok(corpus: list[str]) -> Tokenizer:
    return Tokenizer.train(corpus, vocab_size=400)


def test_special_ids(tok: Tokenizer) -> None:
    assert (Tokenizer.PAD, Tokenizer.UNK, Tokenizer.BOS, Tokenizer.EOS) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert [tok.piece_to_id(p) for p in ["<pad>", "<unk>", "<s>", "</s>"]] == [0, 1, 2, 3]
    assert tok.vocab_size == 400


def test_roundtrip_held_out(tok: Tokenizer) -> None:
    held_out = _lines("valid.en", 0, 50) + _lines("valid.de", 0, 50)
    ids = tok.encode(held_out)
    assert all(ids) and all(0 <= i < tok.vocab_size for seq in ids for i in seq)
    assert not any(i in (0, 2, 3) for seq in ids for i in seq)  # no pad/BOS/EOS added
    known = [(text, seq) for text, seq in zip(held_out, ids) if Tokenizer.UNK not in seq]
    assert len(known) >= 80  # characters unseen in training become <unk>
    assert tok.decode([seq for _, seq in known]) == [text for text, _ in known]
    assert sum(map(len, ids)) < sum(map(len, held_out))  # pieces longer than characters


def test_decode_ignores_special_ids(tok: Tokenizer) -> None:
    ids = tok.encode(["A dog runs."])[0]
    assert tok.decode([[2] + ids + [3, 0, 0]]) == ["A dog runs."]


def test_encode_ignores_extra_whitespace(tok: Tokenizer) -> None:
    assert tok.encode(["  A  dog runs. \n"]) == tok.encode(["A dog runs."])


def test_bytes_roundtrip_and_determinism(tok: Tokenizer, corpus: list[str], tmp_path: Path) -> None:
    texts = _lines("test2016.de", 0, 30)
    copy = Tokenizer.from_bytes(tok.to_bytes())
    assert copy.encode(texts) == tok.encode(texts)
    path = tmp_path / "spm.model"
    path.write_bytes(tok.to_bytes())
    assert Tokenizer.load(path).encode(texts) == tok.encode(texts)
    assert Tokenizer.train(corpus, vocab_size=400).to_bytes() == tok.to_bytes()


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(UserError, match="nope.model"):
        Tokenizer.load(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.model"):
        Tokenizer.load(bad)


def test_vocab_too_large(corpus: list[str]) -> None:
    with pytest.raises(UserError, match=r"`vocab_size` \d+ or less"):
        Tokenizer.train(corpus[:50], vocab_size=5000)
    with pytest.raises(UserError, match=r"`vocab_size` 20 is smaller than the \d+ characters"):
        Tokenizer.train(corpus, vocab_size=20, model_type="unigram")
    with pytest.raises(UserError, match="no text"):
        Tokenizer.train([], vocab_size=100)


def test_char_and_unigram(corpus: list[str]) -> None:
    char = Tokenizer.train(corpus, vocab_size=500, model_type="char")
    text = "Ein Hund läuft."
    ids = char.encode([text])[0]
    assert [char.id_to_piece(i) for i in ids] == list("▁" + text.replace(" ", "▁"))
    assert char.decode([ids]) == [text]
    uni = Tokenizer.train(corpus, vocab_size=300, model_type="unigram")
    assert uni.vocab_size == 300 and uni.decode(uni.encode([text])) == [text]


def test_user_symbols(corpus: list[str]) -> None:
    tok = Tokenizer.train(corpus, vocab_size=300, user_symbols=["<sep>"])
    sep = tok.piece_to_id("<sep>")
    assert sep > 3 and sep in tok.encode(["a<sep>b"])[0]


UNSEEN = "Ein Café in Zürich — 東京, naïve ☃ 😀"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_byte_fallback_keeps_characters_unseen_in_training(corpus: list[str], model_type: str) -> None:
    """With byte fallback any UTF-8 text survives encode and decode; without it, unseen characters become <unk>."""
    assert not any(c in "".join(corpus) for c in "東京☃😀")  # really unseen
    with_bytes = Tokenizer.train(corpus, vocab_size=400, model_type=model_type, byte_fallback=True)
    ids = with_bytes.encode([UNSEEN])[0]
    assert Tokenizer.UNK not in ids and with_bytes.decode([ids]) == [UNSEEN]
    assert with_bytes.piece_to_id("<0xE6>") in ids  # the first byte of 東
    without = Tokenizer.train(corpus, vocab_size=400, model_type=model_type)
    assert Tokenizer.UNK in without.encode([UNSEEN])[0] and without.decode(without.encode([UNSEEN])) != [UNSEEN]


def test_translation_training_uses_byte_fallback(tmp_path: Path) -> None:
    """`transformer train` builds its vocabulary with byte fallback unless --no-byte-fallback."""
    from transformer.corpora import multi30k_dir
    from transformer.tasks.translation import TranslationConfig, _tokenizer
    from transformer.training.loop import LoopConfig

    data = multi30k_dir()
    cfg = TranslationConfig(data / "train.en", data / "train.de", data / "valid.en", data / "valid.de",
                            loop=LoopConfig(out=tmp_path), vocab_size=1000)
    tokenizer = _tokenizer(cfg, lambda _: None)
    assert tokenizer.decode(tokenizer.encode([UNSEEN])) == [UNSEEN]
