"""Training curves from a run's log, and attention heatmaps."""

import json

import pytest
import torch

from transformer.errors import UserError
from transformer.report.plots import (
    attention_figure,
    plot_attention,
    plot_training,
    read_log,
    training_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, truncated_tail=""):
    """A small log of 20 train and 4 valid records, optionally ending in a cut-off line."""
    records = []
    for step in range(50, 1001, 50):
        records.append({"kind": "train", "step": step, "epoch": 1, "loss": 9 - step / 200,
                        "nll": 8 - step / 200, "lr": step * 1e-6, "tokens_per_s": 5000.0,
                        "elapsed_s": step / 10})
        if step % 250 == 0:
            records.append({"kind": "valid", "step": step, "loss": 8 - step / 250, "nll": 7,
                            "ppl": 1100.0, "bleu": step / 50, "elapsed_s": step / 10})
    records.append({"kind": "done", "step": 1000})
    text = "".join(json.dumps(r) + "\n" for r in records) + truncated_tail
    (run_dir / "log.jsonl").write_text(text, encoding="utf-8")
    return records


def test_read_log_drops_a_truncated_last_line(tmp_path):
    records = write_log(tmp_path, truncated_tail='{"kind": "train", "step": 10')
    assert read_log(tmp_path / "log.jsonl") == records


def test_read_log_reports_a_corrupt_middle_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": \n{"kind": "train", "step": 2}\n')
    with pytest.raises(UserError, match=f"{log}:2: not valid JSON"):
        read_log(log)
    log.write_text('[1, 2]\n{"kind": "train", "step": 2}\n')
    with pytest.raises(UserError, match=f"{log}:1: expected a JSON object"):
        read_log(log)


def test_plot_training_writes_a_png_with_three_panels(tmp_path):
    records = write_log(tmp_path, truncated_tail='{"kind": "va')
    assert len(training_figure(records).axes) == 3
    [out] = plot_training(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    custom = tmp_path / "figs" / "run.png"
    assert plot_training(tmp_path, custom) == [custom] and custom.read_bytes().startswith(PNG_MAGIC)


def test_plot_training_without_records_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="log.jsonl: no such file"):
        plot_training(tmp_path)
    (tmp_path / "log.jsonl").write_text('{"kind": "config", "d_model": 512}\n')
    with pytest.raises(UserError, match="no train or valid records"):
        plot_training(tmp_path)


def test_plot_attention_draws_a_panel_per_head(tmp_path):
    src, tgt = ["The", "cat", "sat", "</s>"], ["Die", "Katze", "saß", "</s>", "."]
    weights = torch.softmax(torch.randn(6, len(tgt), len(src)), dim=-1)
    fig = attention_figure(weights, src, tgt, "encoder-decoder attention, layer 6")
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == 6
    assert [t.get_text() for t in visible[0].get_xticklabels()] == src
    out = plot_attention(weights, src, tgt, "layer 6", tmp_path / "attention.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="do not match"):
        attention_figure(weights, src, tgt[:-1], "wrong")
    one_head = attention_figure(weights[:1], src, tgt, "one head")
    assert len(one_head.axes) == 1
