"""GPT-style language model: vocabulary, training end to end through the command line, resume, sampling."""

import json
from pathlib import Path

import pytest
import torch

from transformer.training.checkpoint import list_checkpoints
from transformer.store.modeldir import load_model_dir
from transformer.cli import main
from transformer.corpora import tinyshakespeare_path
from transformer.inference.lm import encode_text, generate, generate_ids
from transformer.tasks.lm import train_tokenizer

SHAKESPEARE = tinyshakespeare_path()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """The first 20,000 characters of Tiny Shakespeare."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000]
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _train_args(text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "lm", "train", "--text", str(text), "--out", str(out), "--preset", "tiny", "--layers", "1",
        "--block-size", "16", "--batch-size", "4", "--eval-batches", "2", "--valid-every", "4",
        "--log-every", "1", "--warmup", "2", "--decay-steps", "10", "--no-progress", "--seed", "5", *extra,
    ]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.parametrize("vocab", ["char", "bpe"])
def test_tokenizer_round_trips_text_with_newlines(vocab):
    text = "First Citizen:\nBefore we  proceed,\n\n  hear me speak.\nAll:\n" * 20
    tokenizer = train_tokenizer(text, vocab, vocab_size=60)
    ids = encode_text(tokenizer, text)
    assert tokenizer.decode([ids.tolist()])[0] == text
    newline = tokenizer.piece_to_id("\n")
    assert newline != tokenizer.UNK and int((ids == newline).sum()) == text.count("\n")
    if vocab == "char":  # one token per distinct character, plus the 4 special ids
        assert tokenizer.vocab_size == len(set(text)) + 4 and len(ids) == len(text)


def test_tiny_shakespeare_char_vocabulary_has_65_characters():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert train_tokenizer(text, "char").vocab_size == 65 + 4


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "char"
    assert main(_train_args(text_file, out, "--max-steps", "10")) == 0
    return out


def test_lm_train_writes_a_run_directory(trained):
    for name in ("config.json", "tokenizer.model", "model.safetensors", "log.jsonl"):
        assert (trained / name).is_file()
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in records if r["kind"] == "valid"] == [4, 8, 10]
    assert [c.name for c in list_checkpoints(trained)] == ["step_00000004", "step_00000008", "step_00000010"]
    model, cfg, _, meta = load_model_dir(trained)
    assert cfg.arch == "decoder" and cfg.max_len == 16 and meta["lm"]["vocab"] == "char"


def test_lm_train_bpe_and_sample(text_file, tmp_path, capsys):
    out = tmp_path / "bpe"
    assert main(_train_args(text_file, out, "--vocab", "bpe", "--vocab-size", "200", "--max-steps", "3")) == 0
    _, cfg, tokenizer, _ = load_model_dir(out)
    assert tokenizer.vocab_size == cfg.vocab_size == 200
    capsys.readouterr()
    assert main(["lm", "sample", "--model", str(out), "--prompt", "First", "--tokens", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("First")


def test_resume_gives_the_same_losses(text_file, tmp_path):
    full = tmp_path / "full"
    assert main(_train_args(text_file, full, "--max-steps", "10", "--dropout", "0.1")) == 0
    part = tmp_path / "part"
    assert main(_train_args(text_file, part, "--max-steps", "4", "--dropout", "0.1")) == 0
    with (part / "log.jsonl").open("a") as f:  # a killed run may have logged past its last checkpoint
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 99.0}) + "\n" + '{"kind": "tra')
    assert main(_train_args(text_file, part, "--max-steps", "10", "--dropout", "0.1", "--resume")) == 0
    expected, got = _losses(full), _losses(part)
    assert sorted(got) == list(range(1, 11))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def _sample(trained: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["lm", "sample", "--model", str(trained), "--prompt", "First", "--tokens", "12", *extra]) == 0
    return capsys.readouterr().out


def test_same_seed_same_text(trained, capsys):
    a = _sample(trained, capsys, "--seed", "7", "--temperature", "1.5")
    b = _sample(trained, capsys, "--seed", "7", "--temperature", "1.5")
    c = _sample(trained, capsys, "--seed", "8", "--temperature", "1.5")
    assert a == b and a.startswith("First")
    assert a != c  # a different seed gives (almost surely) another text
    assert _sample(trained, capsys, "--seed", "7", "--top-p", "0.9", "--top-k", "20").startswith("First")


def test_temperature_zero_and_top_k_one_are_greedy(trained, capsys):
    model, _, tokenizer, _ = load_model_dir(trained)
    ids = torch.tensor([tokenizer.encode(["First"])[0]])
    with torch.no_grad():  # greedy by hand: the whole sequence through the model at each step, no cache
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = tokenizer.decode(ids.tolist())[0]
    assert _sample(trained, capsys, "--temperature", "0", "--seed", "1").rstrip("\n") == greedy.rstrip("\n")
    assert _sample(trained, capsys, "--top-k", "1", "--seed", "2").rstrip("\n") == greedy.rstrip("\n")


def test_sampling_beyond_the_block_slides_the_context(trained):
    model, cfg, tokenizer, _ = load_model_dir(trained)
    prompt = tokenizer.encode(["First"])[0]
    ids = generate_ids(model, prompt, 3 * cfg.max_len, temperature=1.0, seed=1)
    assert ids.shape == (1, len(prompt) + 3 * cfg.max_len) and ids[0, : len(prompt)].tolist() == prompt
    assert generate(model, tokenizer, "First", 3 * cfg.max_len, seed=1) == tokenizer.decode(ids.tolist())[0]


def test_lm_errors(text_file, trained, tmp_path, capsys):
    assert main(_train_args(text_file, trained, "--max-steps", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_train_args(tmp_path / "missing.txt", tmp_path / "r", "--max-steps", "1")) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    assert main(["lm", "sample", "--model", str(trained), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["lm", "train"], ["lm", "sample"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: transformer " + " ".join(command) in capsys.readouterr().out
