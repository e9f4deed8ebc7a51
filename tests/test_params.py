"""Parameter counts of the presets, by hand from each preset's shape, against the paper's Table 3,
BERT-base's block sizes and the table of docs/model.md; through the code and through `transformer params`."""

import json

import pytest

from transformer.cli import main
from transformer.config import preset
from transformer.model import models
from transformer.model.models import build_model, count_parameters

# The shapes, written out here rather than read from the presets, so that a changed preset fails too.
SHAPES = {
    #            arch               vocab   d_model d_ff  enc dec
    "tiny": ("encoder-decoder", 1000, 32, 64, 2, 2),
    "small": ("encoder-decoder", 8000, 256, 1024, 3, 3),
    "base": ("encoder-decoder", 37000, 512, 2048, 6, 6),
    "big": ("encoder-decoder", 37000, 1024, 4096, 6, 6),
    "bert-base": ("encoder", 30522, 768, 3072, 12, 0),
}
BERT_MAX_LEN = 512  # bert-base learns its position embeddings: a (max_len, d_model) table


@pytest.fixture
def no_init(monkeypatch):
    """Skip weight initialisation, which takes most of the time to build a large model; counts do not depend on it."""
    monkeypatch.setattr(models, "init_weights", lambda model: None)


def hand_count(name: str, vocab: int | None = None, tied: bool = True) -> dict[str, int]:
    """Every count `transformer params` prints, from the shape alone.

    Attention: in-projection W_Q, W_K, W_V (3·d² + 3·d) and output projection W_O (d² + d).
    FFN: W1 (d·d_ff + d_ff) and W2 (d_ff·d + d). LayerNorm: gain and bias (2·d), one per
    residual sub-layer. Post-norm: no final LayerNorm after a stack. Tied: one v×d matrix
    serves source embedding, target embedding and output projection; untied: three.
    """
    arch, v, d, d_ff, n_enc, n_dec = SHAPES[name]
    v = vocab or v
    attn = 4 * d * d + 4 * d
    ffn = 2 * d * d_ff + d_ff + d
    norm = 2 * d
    enc_layer = attn + ffn + 2 * norm  # self-attention, FFN
    dec_layer = 2 * attn + ffn + 3 * norm  # masked self-attention, cross-attention, FFN
    counts = {}
    if arch == "encoder-decoder":
        counts["embeddings"] = v * d if tied else 2 * v * d  # sinusoidal positions have no parameters
        counts["encoder"] = n_enc * enc_layer
        counts["decoder"] = n_dec * dec_layer
        if not tied:
            counts["out_proj"] = v * d
    else:  # BERT: learned positions, two segments, LayerNorm on the embeddings, MLM head (dense d×d + bias,
        # LayerNorm), output bias
        counts["embeddings"] = v * d + BERT_MAX_LEN * d + 2 * d + norm
        counts["encoder"] = n_enc * enc_layer
        counts["head"] = d * d + d + norm
        counts["out_bias"] = v
    counts["total"] = sum(counts.values())
    counts["per_attention_block"] = attn
    counts["per_ffn_block"] = ffn
    counts["per_encoder_layer"] = enc_layer
    if n_dec:
        counts["per_decoder_layer"] = dec_layer
    return counts


def test_hand_count_matches_the_published_numbers():
    """The hand count itself, against numbers stated outside the code (docs/model.md's table, BERT paper)."""
    assert hand_count("tiny")["total"] == 74_752
    assert hand_count("small")["total"] == 7_577_600
    assert hand_count("base")["total"] == 63_082_496
    assert hand_count("big")["total"] == 214_245_376
    bert = hand_count("bert-base")
    assert (bert["per_attention_block"], bert["per_ffn_block"]) == (2_362_368, 4_722_432)
    assert 108e6 < bert["total"] < 111e6  # BERT-base: 110M


@pytest.mark.parametrize("name", ["tiny", "small", "base", "bert-base"])
def test_count_parameters_matches_hand_count(name, no_init):
    assert count_parameters(build_model(preset(name))) == hand_count(name)


def test_base_and_big_against_the_paper(no_init, capsys):
    base, big = hand_count("base")["total"], hand_count("big")["total"]
    assert 62e6 < base < 64e6  # paper: 65M (docs/model.md says why)
    assert abs(big - 213e6) / 213e6 < 0.02  # paper: 213M
    # The big model through the command.
    assert main(["params", "--preset", "big", "--vocab-size", "37000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"preset": "big", "vocab_size": 37000, **hand_count("big")}


def test_untied_counts_three_matrices():
    for name in ("tiny", "small"):
        counts = count_parameters(build_model(preset(name, tie_embeddings=False)))
        assert counts == hand_count(name, tied=False)
        assert counts["total"] - hand_count(name)["total"] == 2 * SHAPES[name][1] * SHAPES[name][2]


def _parse_text(out: str) -> tuple[str, dict[str, int]]:
    header, *rows = out.strip("\n").splitlines()
    counts = {}
    for row in rows:
        assert row.startswith("  "), row
        key, number = row.split()
        counts[key] = int(number.replace(",", ""))
    return header, counts


@pytest.mark.parametrize(
    "name, vocab",
    [("tiny", None), ("tiny", 400), ("base", 37000), ("bert-base", None)],
)
def test_params_command_text_and_json(name, vocab, no_init, capsys):
    arch, default_vocab, d, d_ff, n_enc, n_dec = SHAPES[name]
    expected = hand_count(name, vocab)
    vocab_args = ["--vocab-size", str(vocab)] if vocab else []

    assert main(["params", "--preset", name, *vocab_args]) == 0
    header, counts = _parse_text(capsys.readouterr().out)
    assert header == (
        f"preset {name}: arch {arch}, vocab {vocab or default_vocab}, d_model {d}, heads {preset(name).n_heads}, "
        f"d_ff {d_ff}, layers {n_enc}+{n_dec}, tied embeddings True"
    )
    assert counts == expected
    assert list(counts) == list(expected)  # printed in this order

    assert main(["params", "--preset", name, *vocab_args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"preset": name, "vocab_size": vocab or default_vocab, **expected}


def test_params_command_unknown_preset(capsys):
    assert main(["params", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "Traceback" not in err
