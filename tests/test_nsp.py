"""BERT's next-sentence prediction (`mlm train --nsp`) and whole-word masking (`--whole-word`): the pairs
(IsNext ratio, segments, [CLS]/[SEP], truncation, a pure function of (seed, batch)), exact resume, a toy the
NSP head learns, the word masks, and segment embeddings at 0 leaving today's model unchanged."""

import json
import random
import string
from pathlib import Path

import pytest
import torch

from transformer.cli import main
from transformer.config import preset
from transformer.corpora import tinyshakespeare_path
from transformer.errors import UserError
from transformer.inference.masked import CLS, FIRST_REGULAR, MASK, SEP
from transformer.model.attention import padding_mask
from transformer.model.models import build_model
from transformer.tasks.mlm import (
    IGNORE, MLMConfig, Specials, _nsp_objective, make_pairs, mask_tokens, mask_words, masker, read_documents,
    train_tokenizer, truncate_pair, word_starts,
)
from transformer.training.loop import LoopConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- pairs

def _docs(n_docs: int = 20) -> list[list[list[int]]]:
    """Documents whose tokens say where they come from: sentence j of document k is the id 7 + 10k + j,
    1 to 4 times; document k has 1 + k % 6 sentences (the one-sentence ones can only give a NotNext B)."""
    return [[[FIRST_REGULAR + 10 * k + j] * (1 + (3 * k + j) % 4) for j in range(1 + k % 6)] for k in range(n_docs)]


def _where(token: int) -> tuple[int, int]:
    return divmod(token - FIRST_REGULAR, 10)  # (document, sentence)


def _parts(row: list[int]) -> tuple[list[int], list[int], int]:
    """(A, B, length) of one row of `make_pairs`, checking [CLS] A [SEP] B [SEP] pad..."""
    assert row[0] == CLS and row.count(CLS) == 1 and row.count(SEP) == 2
    first, second = [i for i, t in enumerate(row) if t == SEP]
    assert all(t == 0 for t in row[second + 1 :])
    return row[1:first], row[first + 1 : second], second + 1


def test_pairs_isnext_ratio_and_where_b_comes_from():
    docs, n_next, n = _docs(), 0, 0
    for step in range(100):
        tokens, segments, labels = make_pairs(docs, 32, torch.Generator().manual_seed(step), 64)
        for row, label in zip(tokens.tolist(), labels.tolist()):
            a, b, _ = _parts(row)
            (doc_a, _), (doc_b, first_b) = _where(a[0]), _where(b[0])
            sentences_a = [_where(t)[1] for t in a]
            assert {_where(t)[0] for t in a} == {doc_a} and {_where(t)[0] for t in b} == {doc_b}
            assert len(docs[doc_a]) >= 2 and sentences_a == sorted(sentences_a)  # consecutive sentences
            assert set(sentences_a) == set(range(sentences_a[0], sentences_a[-1] + 1))
            if label == 0:  # IsNext: B is what follows A in its document
                assert doc_b == doc_a and first_b == sentences_a[-1] + 1
            else:  # NotNext: B from another document
                assert doc_b != doc_a
            n_next, n = n_next + (label == 0), n + 1
    assert n_next / n == pytest.approx(0.5, abs=0.03)


def test_segments_cls_and_sep():
    tokens, segments, labels = make_pairs(_docs(), 64, torch.Generator().manual_seed(1), 40)
    assert tokens.shape == segments.shape and labels.shape == (64,) and set(labels.tolist()) == {0, 1}
    for row, seg in zip(tokens.tolist(), segments.tolist()):
        a, b, length = _parts(row)
        assert a and b
        assert seg == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (len(row) - length)


def test_truncation():
    a, b = list(range(10)), [100, 101, 102]
    assert truncate_pair(a, b, 8) == (a[5:], b)  # the longer loses tokens: A from its start
    assert truncate_pair(list(range(5)), b + [103, 104], 7) == ([1, 2, 3, 4], [100, 101, 102])  # then in turn
    assert truncate_pair(a[:2], b, 5) == (a[:2], b)  # nothing to cut
    long = [[[FIRST_REGULAR + 10 * k + j] * 9 for j in range(4)] for k in range(6)]  # sentences of 9 tokens
    tokens, _, labels = make_pairs(long, 200, torch.Generator().manual_seed(2), 12)
    assert tokens.shape[1] == 12
    for row, label in zip(tokens.tolist(), labels.tolist()):
        a, b, length = _parts(row)
        assert length == 12 and len(a) == 5 and len(b) == 4
        if label == 0:  # the boundary is kept: A's end and B's start
            assert _where(b[0])[1] == _where(a[-1])[1] + 1


def _objective(tmp_path: Path, seed: int = 1):
    cfg = MLMConfig(text=tmp_path / "unused", loop=LoopConfig(out=tmp_path / "run", seed=seed), batch_size=16,
                    max_len=24, nsp=True)
    mask = masker(cfg, None, 120, Specials())
    return _nsp_objective(cfg, _docs(), _docs(6), 24, mask, Specials(), FIRST_REGULAR, torch.device("cpu"))


def test_pairs_are_a_function_of_seed_and_batch(tmp_path):
    objective = _objective(tmp_path)
    five = objective.batch(5)
    objective.batch(3)
    again = _objective(tmp_path).batch(5)
    assert all(torch.equal(x, y) for x, y in zip(five, objective.batch(5)))
    assert all(torch.equal(x, y) for x, y in zip(five, again))
    assert not torch.equal(five[0], objective.batch(6)[0])
    assert not torch.equal(five[0], _objective(tmp_path, seed=2).batch(5)[0])
    inputs, labels, segments, is_next = five
    assert ((labels != IGNORE) <= (inputs >= FIRST_REGULAR) | (inputs == MASK)).all() and is_next.shape == (16,)


def test_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("a b\nc d\n\n\n e f \n\ng\n", encoding="utf-8")
    assert read_documents(path) == [["a b", "c d"], ["e f"], ["g"]]
    path.write_text("one\ntwo\nthree\n", encoding="utf-8")
    with pytest.raises(UserError, match="single document"):
        read_documents(path)


# ---------------------------------------------------------------- whole-word masking

def test_word_starts_of_sentencepiece_and_wordpiece(tmp_path):
    tokenizer = train_tokenizer(["the playing children play", "a man plays the guitar"] * 20, 40)
    starts = word_starts(tokenizer)
    for i in range(tokenizer.vocab_size):
        assert starts[i] == (i < FIRST_REGULAR or tokenizer.id_to_piece(i).startswith("▁"))
    from transformer.text.pretrained import HubTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing", "the", "##s"]) + "\n")
    wordpiece = HubTokenizer.wordpiece(vocab, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]")
    assert wordpiece.encode(["the playing plays"]) == [[7, 5, 6, 5, 8]]
    assert word_starts(wordpiece, Specials(4, 2, 3, 0, 5)).tolist() == [True] * 6 + [False, True, False]


def _words(rows: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (rows, 40) of sentences [CLS] words [SEP] pad; ids 7..49 begin a word, 50..99 continue one;
    and the word number of each position (-1 at special tokens)."""
    g = torch.Generator().manual_seed(0)
    starts = torch.zeros(100, dtype=torch.bool)
    starts[:50] = True
    tokens, words = torch.zeros(rows, 40, dtype=torch.long), torch.full((rows, 40), -1)
    for r in range(rows):
        row, word = [CLS], [-1]
        while len(row) < 30:
            pieces = 1 + int(torch.randint(0, 3, (1,), generator=g))
            row += [int(torch.randint(7, 50, (1,), generator=g))] + torch.randint(50, 100, (pieces - 1,), generator=g).tolist()
            word += [len(set(word)) - 1] * pieces
        tokens[r, : len(row) + 1], words[r, : len(row)] = torch.tensor(row + [SEP]), torch.tensor(word)
    return tokens, words, starts


def test_whole_word_masking_masks_the_pieces_of_a_word_together():
    tokens, words, starts = _words()
    inputs, labels = mask_words(tokens, 100, torch.Generator().manual_seed(1), starts, mask_prob=0.3)
    chosen, n_words, n_chosen, n_masked = labels != IGNORE, 0, 0, 0
    assert not (chosen & (tokens < FIRST_REGULAR)).any() and (labels[chosen] == tokens[chosen]).all()
    assert (inputs[~chosen] == tokens[~chosen]).all()
    for r in range(len(tokens)):
        for w in range(int(words[r].max()) + 1):
            at = words[r] == w
            picked = chosen[r, at]
            assert picked.all() or not picked.any()  # all pieces of a word, or none
            masked = inputs[r, at] == MASK
            assert masked.all() or not masked.any()  # one 80/10/10 draw per word
            n_words, n_chosen, n_masked = n_words + 1, n_chosen + bool(picked.any()), n_masked + bool(masked.all())
    assert n_chosen / n_words == pytest.approx(0.3, abs=0.02)
    assert n_masked / n_chosen == pytest.approx(0.8, abs=0.03)
    inputs, labels = mask_words(tokens, 100, torch.Generator().manual_seed(2), starts, mask_prob=1.0)
    assert ((labels != IGNORE) == (tokens >= FIRST_REGULAR)).all()  # never [CLS], [SEP], pad


def test_piece_masking_is_unchanged_by_the_option(tmp_path):
    tokens, _, _ = _words(20)
    cfg = MLMConfig(text=tmp_path / "unused", loop=LoopConfig(out=tmp_path))
    got = masker(cfg, None, 100, Specials())(tokens, torch.Generator().manual_seed(3))
    expected = mask_tokens(tokens, 100, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


# ---------------------------------------------------------------- segment embeddings at 0

# A tiny encoder (vocabulary 60) built under torch.manual_seed(0) before segments and the NSP head existed
# (commit 5883c53^): its state_dict keys, some of its parameters' absolute sums, and logits.
OLD_KEYS = ["out_bias", "embed.tokens.weight"] + [
    f"encoder.layers.{n}.{name}" for n in range(2) for name in (
        "self_attn.in_proj.weight", "self_attn.in_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "ffn.w1.weight", "ffn.w1.bias", "ffn.w2.weight", "ffn.w2.bias", "res_attn.norm.weight", "res_attn.norm.bias",
        "res_ffn.norm.weight", "res_ffn.norm.bias")
] + ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
OLD_SUMS = {"embed.tokens.weight": 265.158787, "encoder.layers.0.self_attn.in_proj.weight": 333.061268,
            "encoder.layers.1.ffn.w2.weight": 255.445517, "head.0.weight": 156.504862}
OLD_LOGITS = ([-0.18665, -1.065813, 1.54227, -0.589197, 1.142385], [0.731336, -0.963234, -0.319717, 0.310452, -2.700588])


def test_no_segments_is_the_model_of_before():
    torch.manual_seed(0)
    model = build_model(preset("tiny", arch="encoder", n_decoder_layers=0, vocab_size=60, n_segments=0)).eval()
    state = model.state_dict()
    assert list(state) == OLD_KEYS  # no segment embeddings, pooler or NSP head
    for key, total in OLD_SUMS.items():  # the same initialisation (the same draws, in the same order)
        assert state[key].double().abs().sum().item() == pytest.approx(total, rel=1e-6), key
    tokens = torch.tensor([[5, 17, 30, 41, 8, 6], [5, 22, 9, 6, 0, 0]])
    with torch.no_grad():
        logits = model(tokens)
        embed = model.embed  # the embedding as it was: tokens × sqrt(d_model) + positions, dropout
        before = model.logits(model.encoder(embed.dropout(embed.positions(embed.tokens(tokens) * embed.scale, 0)),
                                            padding_mask(tokens, 0)))
        with_zeros = model.logits(model.hidden(tokens, segments=torch.zeros_like(tokens)))
    assert torch.equal(logits, before) and torch.equal(logits, with_zeros)
    torch.testing.assert_close(logits[0, 1, :5], torch.tensor(OLD_LOGITS[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1, 2, :5], torch.tensor(OLD_LOGITS[1]), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- training through the command line

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nsp") / "speeches.txt"
    path.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


def _args(text: Path, out: Path, *extra: str) -> list[str]:
    return ["mlm", "train", "--text", str(text), "--out", str(out), "--nsp", "--whole-word", "--preset", "tiny",
            "--vocab-size", "200", "--batch-size", "8", "--max-len", "32", "--valid-every", "3", "--log-every", "1",
            "--warmup", "2", "--decay-steps", "6", "--lr", "3e-3", "--no-progress", *extra]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_nsp_run_resumes_exactly(shakespeare, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(shakespeare, full, "--max-steps", "6")) == 0
    valid = [r for r in _log(full) if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6]
    assert {"loss", "accuracy", "baseline_accuracy", "nsp_accuracy", "nsp_loss", "mlm_loss"} <= set(valid[-1])
    assert valid[-1]["pairs"] == 256 and 0 <= valid[-1]["nsp_accuracy"] <= 1
    config = json.loads((full / "config.json").read_text())
    assert config["model"]["next_sentence"] and config["model"]["n_segments"] == 2
    assert main(_args(shakespeare, part, "--max-steps", "3")) == 0
    with (part / "log.jsonl").open("a") as f:  # a killed run may have logged steps after its last checkpoint
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 99.0}) + "\n")
    assert main(_args(shakespeare, part, "--max-steps", "6", "--resume")) == 0
    losses = [{r["step"]: r["loss"] for r in _log(run) if r["kind"] == "train"} for run in (full, part)]
    assert sorted(losses[1]) == list(range(1, 7))
    for step, loss in losses[0].items():
        assert losses[1][step] == pytest.approx(loss, abs=1e-6), step
    capsys.readouterr()
    changed = [a for a in _args(shakespeare, part, "--max-steps", "8", "--resume") if a != "--whole-word"]
    assert main(changed) == 2 and "--whole-word" in capsys.readouterr().err


def test_nsp_refusals(shakespeare, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a line\nanother line\n", encoding="utf-8")
    assert main(_args(one, tmp_path / "x", "--max-steps", "1")) == 2
    assert "single document" in capsys.readouterr().err
    assert main(_args(shakespeare, tmp_path / "y", "--max-len", "4")) == 2
    assert "--max-len 4" in capsys.readouterr().err


def _topics(n_sentences: int, seed: int) -> str:
    """Six documents, each written in its own four letters: B follows A exactly when their letters agree."""
    rng, letters = random.Random(seed), string.ascii_lowercase
    return "\n\n".join("\n".join(" ".join("".join(rng.choice(letters[4 * k : 4 * k + 4]) for _ in range(3))
                                          for _ in range(rng.randint(2, 4))) for _ in range(n_sentences))
                       for k in range(6)) + "\n"


def test_the_nsp_head_learns_a_toy(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(_topics(30, 1))
    (tmp_path / "valid.txt").write_text(_topics(8, 2))
    out = tmp_path / "toy"
    assert main(["mlm", "train", "--text", str(tmp_path / "train.txt"), "--valid", str(tmp_path / "valid.txt"),
                 "--out", str(out), "--nsp", "--preset", "tiny", "--dropout", "0", "--vocab-size", "60",
                 "--batch-size", "32", "--max-len", "24", "--max-steps", "100", "--valid-every", "50", "--lr", "5e-3",
                 "--warmup", "5", "--no-progress", "--precision", "fp32"]) == 0  # the same learning on every CPU
    valid = [r for r in _log(out) if r["kind"] == "valid"]
    assert valid[-1]["nsp_accuracy"] > 0.85 and valid[0]["nsp_accuracy"] < valid[-1]["nsp_accuracy"]

    import transformer

    model = transformer.load(out)  # MaskedLM: fill, embed, and P(IsNext)
    assert len(model.fill("abc [MASK] bad", 3)[0]) == 3 and model.embed(["abc bad", "mno"]).shape[0] == 2
    same = [model.next_sentence("abc dab cca", "bbd acd"), model.next_sentence("mmo nop", "pon nnm ooo")]
    other = [model.next_sentence("abc dab cca", "pon nnm ooo"), model.next_sentence("mmo nop", "bbd acd")]
    assert min(same) > 0.5 > max(other)

    # --init with --nsp needs the head: a model trained without it is refused
    plain = tmp_path / "plain"
    assert main(["mlm", "train", "--text", str(tmp_path / "train.txt"), "--out", str(plain), "--preset", "tiny",
                 "--vocab-size", "60", "--batch-size", "8", "--max-steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["mlm", "train", "--text", str(tmp_path / "train.txt"), "--out", str(tmp_path / "ft"), "--nsp",
                 "--init", str(plain), "--max-steps", "1", "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no next-sentence head" in last and "--nsp" in last
    with pytest.raises(UserError, match="no next-sentence head"):
        transformer.load(plain).next_sentence("abc", "bad")
