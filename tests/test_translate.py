"""Attention maps of one sentence (`transformer attention`), in the spirit of the paper's Figures 3-5; and
empty input lines through `transformer translate` and `evaluate` (issue #31)."""

import io
import json
import sys

import pytest
import torch

import transformer

from transformer.store.modeldir import save_model_dir
from transformer.cli import main
from transformer.config import preset
from transformer.inference.search import SearchConfig
from transformer.errors import UserError
from transformer.model.models import build_model
from transformer.text.tokenizer import Tokenizer
from transformer.inference.translate import translate_lines
from transformer.report.attention_maps import attention_maps

SENTENCES = ["a man rides a horse", "two dogs play in the snow", "a girl reads a book", "the men walk home"] * 10


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(SENTENCES, 40, model_type="char")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(3)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.1, n_decoder_layers=3)
    return build_model(cfg)  # in training mode: attention_maps must still be deterministic (eval)


def test_maps_have_every_layer_and_head_and_are_distributions(model, tokenizer):
    maps = attention_maps(model, tokenizer, "a man reads", "two dogs")
    cfg = model.cfg
    S, T = len(tokenizer.encode(["a man reads"])[0]) + 1, len(tokenizer.encode(["two dogs"])[0]) + 1
    assert (len(maps.src), len(maps.tgt_in), len(maps.tgt_out)) == (S, T, T)
    assert maps.src[-1] == "</s>" and maps.tgt_in[0] == "<s>" and maps.tgt_out[-1] == "</s>"
    assert maps.tgt_in[1:] == maps.tgt_out[:-1] and maps.translation == "two dogs"
    shapes = {"encoder": (cfg.n_encoder_layers, (S, S)), "decoder": (cfg.n_decoder_layers, (T, T)),
              "cross": (cfg.n_decoder_layers, (T, S))}
    for kind, (layers, queries_keys) in shapes.items():
        assert len(maps.weights[kind]) == layers
        for w in maps.weights[kind]:
            assert w.shape == (cfg.n_heads, *queries_keys)
            torch.testing.assert_close(w.sum(-1), torch.ones(cfg.n_heads, queries_keys[0]))
    for w in maps.weights["decoder"]:  # causal: no weight on later target positions
        assert torch.all(w.triu(diagonal=1) == 0)
    assert model.training  # the model is left in the mode it came in


def test_maps_follow_the_models_own_translation(model, tokenizer):
    search = SearchConfig(beam=2, max_len_b=6)
    source = "the men walk"
    maps = attention_maps(model, tokenizer, source, search=search)
    model.eval()
    try:
        expected = translate_lines(model, tokenizer, [source], search)[0]
    finally:
        model.train()
    assert maps.translation == expected
    again = attention_maps(model, tokenizer, source, search=search)  # eval mode: no dropout on the weights
    for a, b in zip(maps.weights["cross"], again.weights["cross"]):
        torch.testing.assert_close(a, b)


def test_empty_source_is_a_user_error(model, tokenizer):
    with pytest.raises(UserError, match="empty"):
        attention_maps(model, tokenizer, "   ")


def test_cli_writes_a_heatmap_per_layer_and_kind(model, tokenizer, tmp_path, capsys):
    save_model_dir(tmp_path / "model", model, model.cfg, tokenizer.to_bytes())
    out = tmp_path / "maps"
    code = main(["attention", "--model", str(tmp_path / "model"), "--sentence", "a girl reads", "--target", "a book",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"encoder_layer{i}.png" for i in (1, 2)]
                           + [f"{k}_layer{i}.png" for k in ("decoder", "cross") for i in (1, 2, 3)])
    for path in out.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "target: a book" in printed and str(out / "cross_layer3.png") in printed
    # Without --out the pictures go into the model directory.
    assert main(["attention", "--model", str(tmp_path / "model"), "--sentence", "a girl", "--device", "cpu"]) == 0
    assert (tmp_path / "model" / "attention" / "encoder_layer1.png").exists()


# ---- empty lines (issue #31): translated to empty lines, not decoded, the line count kept ----


def _alone(model_dir, lines: list[str]) -> list[str]:
    """Greedy translations of `lines`, each translated by itself."""
    translator = transformer.load(model_dir)
    return [translator.translate(line, beam=1) for line in lines]


@pytest.mark.usefixtures("one_thread")
def test_translate_prints_an_empty_line_for_an_empty_or_blank_line_of_stdin(trained_translation_dir, monkeypatch,
                                                                             capsys):
    stdin = "A dog runs.\n\nA cat sleeps.\n \t\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    assert main(["translate", "--model", str(trained_translation_dir), "--beam", "1", "--no-progress"]) == 0
    dog, cat = _alone(trained_translation_dir, ["A dog runs.", "A cat sleeps."])
    assert capsys.readouterr().out == f"{dog}\n\n{cat}\n\n" and dog and cat


@pytest.mark.usefixtures("one_thread")
def test_evaluate_scores_an_empty_hypothesis_for_an_empty_input_line(trained_translation_dir, multi30k_valid_en,
                                                                     tmp_path, capsys):
    """The references are the translations of the sentences alone and an empty line: BLEU 100 only if the empty
    input line gave an empty hypothesis (not an invented sentence)."""
    sentences = multi30k_valid_en[:2]  # long enough for 4-grams
    (tmp_path / "in.en").write_text(f"{sentences[0]}\n\n{sentences[1]}\n", encoding="utf-8")
    first, second = _alone(trained_translation_dir, sentences)
    (tmp_path / "ref.de").write_text(f"{first}\n\n{second}\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(trained_translation_dir), "--input", str(tmp_path / "in.en"),
                 "--ref", str(tmp_path / "ref.de"), "--beam", "1", "--json", "--no-progress"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 3 and scores["bleu"] == 100.0 and scores["chrf"] == 100.0
