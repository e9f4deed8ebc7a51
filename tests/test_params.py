"""Parameter counts of the presets, against the paper's Table 3 and BERT-base's block sizes."""

import json

import pytest

from transformer.cli import main
from transformer.config import preset
from transformer.model.models import build_model, count_parameters


def _expected_encoder_decoder(v, d, d_ff, n_enc, n_dec):
    """Count by hand: tied embedding + N encoder layers + N decoder layers (post-norm: no final norms)."""
    attn = 4 * (d * d + d)
    ffn = d * d_ff + d_ff + d_ff * d + d
    norm = 2 * d
    return v * d + n_enc * (attn + ffn + 2 * norm) + n_dec * (2 * attn + ffn + 3 * norm)


def test_base_matches_hand_count_and_paper():
    counts = count_parameters(build_model(preset("base", vocab_size=37000)))
    assert counts["total"] == _expected_encoder_decoder(37000, 512, 2048, 6, 6)
    assert 62e6 < counts["total"] < 64e6  # paper: 65M (see README for the difference)


def test_big_matches_hand_count_and_paper():
    counts = count_parameters(build_model(preset("big", vocab_size=37000)))
    assert counts["total"] == _expected_encoder_decoder(37000, 1024, 4096, 6, 6)
    assert abs(counts["total"] - 213e6) / 213e6 < 0.02  # paper: 213M


def test_bert_base_blocks_exact():
    counts = count_parameters(build_model(preset("bert-base")))
    assert counts["per_attention_block"] == 2_362_368
    assert counts["per_ffn_block"] == 4_722_432


def test_untied_counts_three_matrices():
    tied = count_parameters(build_model(preset("tiny")))["total"]
    untied = count_parameters(build_model(preset("tiny", tie_embeddings=False)))["total"]
    cfg = preset("tiny")
    assert untied - tied == 2 * cfg.vocab_size * cfg.d_model


@pytest.mark.parametrize("name", ["base", "bert-base"])
def test_params_command_json(name, capsys):
    assert main(["params", "--preset", name, "--vocab-size", "37000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"total", "per_attention_block", "per_ffn_block"} <= set(out)
    assert out["total"] == count_parameters(build_model(preset(name, vocab_size=37000)))["total"]


def test_params_command_unknown_preset(capsys):
    assert main(["params", "--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'huge'" in err and "Traceback" not in err
