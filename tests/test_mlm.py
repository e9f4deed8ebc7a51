"""BERT-style masked LM: masking proportions, the loss, training end to end through the command line, fill."""

import json
from pathlib import Path

import pytest
import torch

from transformer.store.modeldir import load_model_dir
from transformer.cli import main
from transformer.config import preset
from transformer.corpora import multi30k_dir
from transformer.inference.masked import CLS, FIRST_REGULAR, MASK, SEP
from transformer.tasks.mlm import IGNORE, chosen_logits, mask_tokens, mlm_loss
from transformer.model.models import build_model


def _sample_tokens(n_rows: int = 400, length: int = 500, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(FIRST_REGULAR, vocab, (n_rows, length), generator=g)
    tokens[:, 0], tokens[:, 100] = CLS, SEP
    tokens[:, 101:] = 0  # padding
    tokens[::7, 50] = 1  # unk
    return tokens


def test_masking_proportions():
    tokens = _sample_tokens()
    inputs, labels = mask_tokens(tokens, 1000, torch.Generator().manual_seed(1))
    regular = tokens >= FIRST_REGULAR
    chosen = labels != IGNORE
    assert not (chosen & ~regular).any()  # pad, unk, [CLS], [SEP] never chosen
    assert (inputs[~chosen] == tokens[~chosen]).all()  # what is not chosen is left alone
    assert (labels[chosen] == tokens[chosen]).all()
    share = chosen.sum().item() / regular.sum().item()
    assert share == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    unchanged = (inputs[chosen] == tokens[chosen]).sum().item() / n
    randomised = ((inputs[chosen] != MASK) & (inputs[chosen] != tokens[chosen])).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    # a random replacement equals the original token with probability 1/993: count it as unchanged
    assert unchanged == pytest.approx(0.1 + 0.1 / 993, abs=0.01)
    assert randomised == pytest.approx(0.1 * 992 / 993, abs=0.01)
    random_ids = inputs[chosen & (inputs != MASK) & (inputs != tokens)]
    assert random_ids.min() >= FIRST_REGULAR and random_ids.max() < 1000  # random tokens are regular ones


def test_special_tokens_are_never_chosen_even_with_mask_prob_one():
    tokens = _sample_tokens(20, 200)
    inputs, labels = mask_tokens(tokens, 1000, torch.Generator().manual_seed(2), mask_prob=1.0)
    assert ((labels != IGNORE) == (tokens >= FIRST_REGULAR)).all()
    assert (inputs[tokens < FIRST_REGULAR] == tokens[tokens < FIRST_REGULAR]).all()


def test_masking_is_reproducible():
    tokens = _sample_tokens(10, 200)
    a = mask_tokens(tokens, 1000, torch.Generator().manual_seed(3))
    b = mask_tokens(tokens, 1000, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loss_ignores_unchosen_positions():
    tokens = _sample_tokens(4, 120, vocab=50)
    _, labels = mask_tokens(tokens, 50, torch.Generator().manual_seed(4))
    logits = torch.randn(4, 120, 50, generator=torch.Generator().manual_seed(5))
    loss, n = mlm_loss(logits, labels)
    assert n == int((labels != IGNORE).sum()) > 0
    changed = logits.clone()
    changed[labels == IGNORE] = torch.randn_like(changed[labels == IGNORE]) * 100
    assert mlm_loss(changed, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    chosen = labels != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    changed[chosen] += torch.randn_like(changed[chosen])  # the chosen positions do count
    assert mlm_loss(changed, labels)[0].item() != pytest.approx(loss.item(), rel=1e-6)


def test_chosen_logits_equal_the_full_forward():
    cfg = preset("tiny", arch="encoder", n_decoder_layers=0, vocab_size=60)
    model = build_model(cfg).eval()
    tokens = torch.randint(FIRST_REGULAR, 60, (3, 12), generator=torch.Generator().manual_seed(6))
    tokens[1, 8:] = 0
    inputs, labels = mask_tokens(tokens, 60, torch.Generator().manual_seed(7), mask_prob=0.5)
    logits, gold = chosen_logits(model, inputs, labels)
    with torch.no_grad():
        full = model(inputs)
    torch.testing.assert_close(logits, full[labels != IGNORE], atol=1e-5, rtol=1e-5)
    assert torch.equal(gold, labels[labels != IGNORE])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    for split, n in (("train", 400), ("valid", 60)):
        lines = (multi30k_dir() / f"{split}.en").read_text(encoding="utf-8").splitlines()[:n]
        (root / f"{split}.en").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "mlm", "train", "--text", str(data / "train.en"), "--valid", str(data / "valid.en"), "--out", str(out),
        "--preset", "tiny", "--vocab-size", "300", "--batch-size", "32", "--valid-every", "5", "--log-every", "1",
        "--warmup", "2", "--decay-steps", "10", "--lr", "3e-3", "--no-progress", *extra,
    ]


def test_mlm_train_fill_and_resume(data, tmp_path, capsys):
    out = tmp_path / "mlm"
    assert main(_train_args(data, out, "--max-steps", "10")) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [5, 10]
    assert all({"loss", "accuracy", "baseline_accuracy", "masked"} <= set(r) for r in valid)
    assert 0 < valid[-1]["baseline_accuracy"] < 1 and valid[-1]["masked"] > 50
    model, cfg, tokenizer, meta = load_model_dir(out)
    assert cfg.arch == "encoder" and [tokenizer.piece_to_id(s) for s in ("[MASK]", "[CLS]", "[SEP]")] == [4, 5, 6]
    capsys.readouterr()
    assert main(["mlm", "fill", "--model", str(out), "a man [MASK] a horse .", "--n-best", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[MASK] 1: ")
    probs = [float(w) for w in lines[0].split()[3::2]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert main(["mlm", "fill", "--model", str(out), "no mask here"]) == 2
    assert "no [MASK]" in capsys.readouterr().err

    # resume gives the same losses as the run above
    part = tmp_path / "part"
    assert main(_train_args(data, part, "--max-steps", "5")) == 0
    assert main(_train_args(data, part, "--max-steps", "10", "--resume")) == 0
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
               if r["kind"] == "train"} for run in (out, part)]
    assert losses[0].keys() == losses[1].keys() and all(
        losses[1][s] == pytest.approx(v, abs=1e-6) for s, v in losses[0].items())


@pytest.mark.parametrize("command", [["mlm", "train"], ["mlm", "fill"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: transformer " + " ".join(command) in capsys.readouterr().out
