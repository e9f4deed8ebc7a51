"""`transformer preprocess` into a data folder of binary shards, and `train --data-bin` from it.

Round trip (the ids read back are the tokenizer's), the filters' counts on a hand-made corpus, the same
training losses as from text, a preprocess killed mid-way and run again, a half-written or corrupt folder
refused on one line, and two processes (as torchrun starts them) reading one folder.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transformer.cli import main
from transformer.errors import UserError
from transformer.tasks.preprocess import PreprocessConfig, preprocess
from transformer.text.data import TokenBatchSampler, read_lines
from transformer.text.shards import DataFolder
from transformer.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory) -> Path:
    """The 200 + 20 pairs preprocessed as the command line does it, with shards of 70 lines."""
    out = tmp_path_factory.mktemp("bin") / "data"
    assert main(["preprocess", "--data", str(data), "--out", str(out), "--vocab-size", "400",
                 "--shard-size", "70"]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_round_trip_gives_the_tokenizers_ids_for_every_line_in_order(folder, data):
    bin_ = DataFolder.open(folder)
    tokenizer = Tokenizer.load(bin_.tokenizer_paths()[0])
    for split in ("train", "valid"):
        src_lines, tgt_lines = read_lines(data / f"{split}.en"), read_lines(data / f"{split}.de")
        s = bin_.split(split)
        assert s.lines.tolist() == list(range(1, len(src_lines) + 1))  # no filter asked: every pair kept
        assert [s.src()[i] for i in range(len(s))] == tokenizer.encode(src_lines)
        assert [s.tgt()[i] for i in range(len(s))] == tokenizer.encode(tgt_lines)
    train = bin_.manifest["splits"]["train"]
    assert [shard["pairs"] for shard in train["shards"]] == [70, 70, 60]
    assert bin_.dtype == np.uint16 and bin_.vocab_size == tokenizer.vocab_size == 400
    assert read_lines(folder / "valid.tgt.txt") == read_lines(data / "valid.de")  # BLEU's references


def _char_tokenizer(tmp_path: Path) -> Path:
    """A character model: a sentence of n characters (spaces included) is n + 1 tokens (the leading "▁")."""
    path = tmp_path / "char.model"
    path.write_bytes(Tokenizer.train(["a b c x y z"] * 10, 12, model_type="char").to_bytes())
    return path


COUNTED = [  # (source, target, what becomes of the pair): --max-len 12 (10 tokens a side), --max-ratio 3, --dedup
    ("a b", "x y", "kept"),
    ("", "x", "empty"),
    ("   ", "x y", "empty"),
    ("a", "", "empty"),
    ("a b c a b c a b c", "x", "too_long"),  # 18 tokens (and a ratio of 9: the first reason counts)
    ("a b c a", "x", "ratio"),  # 8 tokens against 2
    ("a b c", "x", "kept"),  # 6 against 2: a ratio of 3, not over it
    ("a b", "x y", "duplicate"),
    ("a b", "x z", "kept"),
    (" a b ", "x y", "duplicate"),  # the same once stripped
    ("c c c c c", "z", "ratio"),  # 10 tokens: not too long, but 5 times 2
]


def test_the_filters_count_what_they_drop(tmp_path, capsys):
    for side, k in (("en", 0), ("de", 1)):
        (tmp_path / f"train.{side}").write_text("".join(row[k] + "\n" for row in COUNTED), encoding="utf-8")
    out = tmp_path / "bin"
    assert main(["preprocess", "--data", str(tmp_path), "--out", str(out), "--tokenizer-model",
                 str(_char_tokenizer(tmp_path)), "--max-len", "12", "--max-ratio", "3", "--dedup"]) == 0
    expected = {reason: sum(row[2] == reason for row in COUNTED) for reason in ("empty", "too_long", "ratio",
                                                                                "duplicate")}
    assert expected == {"empty": 3, "too_long": 1, "ratio": 2, "duplicate": 2}
    assert "11 pairs read, 3 kept in 1 shard(s)" in capsys.readouterr().err
    bin_ = DataFolder.open(out)
    assert bin_.counts("train") == {"lines": 11, "pairs": 3, "dropped": expected}
    split = bin_.split("train")
    assert split.lines.tolist() == [n for n, row in enumerate(COUNTED, start=1) if row[2] == "kept"]
    assert split.src_lens.tolist() == [4, 6, 4] and split.tgt_lens.tolist() == [4, 2, 4]
    assert not bin_.has("valid")


@pytest.mark.usefixtures("one_thread")
def test_train_from_the_folder_gives_the_losses_of_training_from_text(data, folder, tmp_path):
    common = ["--preset", "tiny", "--vocab-size", "400", "--max-tokens", "400", "--warmup", "10", "--log-every", "1",
              "--valid-every", "3", "--valid-bleu-lines", "5", "--max-steps", "3", "--no-progress", "--seed", "3"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "text"), *common]) == 0
    assert main(["train", "--data-bin", str(folder), "--out", str(tmp_path / "bin"), *common]) == 0
    logs = {}
    for run in ("text", "bin"):
        logs[run] = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for record in logs[run]:
            record.pop("elapsed_s"), record.pop("tokens_per_s", None)
    assert [r["step"] for r in logs["bin"] if r["kind"] == "train"] == [1, 2, 3]
    assert logs["bin"] == logs["text"]  # every loss, learning rate and validation
    assert (tmp_path / "bin" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert (tmp_path / "text" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()


_KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from transformer.text import shards

end_shard = shards.SplitWriter.end_shard

def end_shard_then_die(self):
    end_shard(self)
    os.kill(os.getpid(), signal.SIGKILL)

shards.SplitWriter.end_shard = end_shard_then_die
from transformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_preprocess_run_again_gives_the_same_folder(data, folder, tmp_path, capsys):
    """SIGKILL once the first shard is complete: no manifest, so train refuses the folder on one line; run again
    (with 2 workers this time), the folder is byte for byte the one of an uninterrupted run (1 worker)."""
    out = tmp_path / "data"
    args = ["preprocess", "--data", str(data), "--out", str(out), "--vocab-size", "400", "--shard-size", "70"]
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_FIRST_SHARD, *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (out / "train.000.src.bin").is_file() and not (out / "manifest.json").exists()
    assert main(["train", "--data-bin", str(out), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "no manifest.json, so not a finished data folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert main([*args, "--workers", "2"]) == 0
    assert _files(out) == _files(folder)


@pytest.mark.parametrize("damage, problem", [
    ("flip", "train.001.tgt.bin: sha256 differs from the manifest's"),
    ("truncate", "train.001.tgt.bin: 100 bytes, but the manifest says"),
    ("delete", "train.001.tgt.bin: missing (the manifest lists it)"),
])
def test_a_damaged_shard_is_refused_on_one_line(folder, tmp_path, capsys, damage, problem):
    copy = tmp_path / "data"
    copy.mkdir()
    for name, content in _files(folder).items():
        (copy / name).write_bytes(content)
    shard = copy / "train.001.tgt.bin"
    content = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(content[:10] + bytes([content[10] ^ 1]) + content[11:])
    elif damage == "truncate":
        shard.write_bytes(content[:100])
    else:
        shard.unlink()
    assert main(["train", "--data-bin", str(copy), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="sha256|bytes|missing"):
        DataFolder.open(copy)


def test_preprocess_never_writes_into_a_folder_of_other_files(data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["preprocess", "--data", str(data), "--out", str(out)]) == 2
    assert "holds 'notes.txt', which preprocess did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    (tmp_path / "train.en").write_bytes(b"a man\nbad \xff byte\n")
    (tmp_path / "train.de").write_text("ein mann\nschlecht\n", encoding="utf-8")
    assert main(["preprocess", "--data", str(tmp_path), "--out", str(tmp_path / "bin"), "--vocab-size", "40"]) == 2
    assert f"{tmp_path / 'train.en'}:2: invalid UTF-8 (byte 0xff at column 5)" in capsys.readouterr().err
    (tmp_path / "train.en").write_text("a man\n", encoding="utf-8")
    assert main(["preprocess", "--data", str(tmp_path), "--out", str(tmp_path / "bin")]) == 2
    assert "train.en has 1 lines but" in capsys.readouterr().err
    assert not (tmp_path / "bin" / "manifest.json").exists()
    assert main(["train", "--data-bin", str(tmp_path / "bin"), "--data", str(tmp_path), "--out", "run"]) == 2
    assert "--data-bin reads its own files; leave out --data" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_invalid_utf8_is_one_clean_line_naming_the_file_and_line(command, tmp_path, capsys):
    """An invalid byte on line 3 of a training file: exit 2 and exactly one line naming the file and line 3,
    without the stack of the sentencepiece callback that read it (both commands train a vocabulary on it)."""
    for split in ("train", "valid"):
        (tmp_path / f"{split}.en").write_bytes(b"a man\na dog\ntwo dogs \xff run\na cat\n")
        (tmp_path / f"{split}.de").write_text("ein mann\nein hund\nzwei hunde laufen\neine katze\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main([command, "--data", str(tmp_path), "--out", str(out), "--vocab-size", "40"]) == 2
    err = capsys.readouterr().err
    assert err == (f"transformer translation {command}: error: {tmp_path / 'train.en'}:3: invalid UTF-8 "
                   "(byte 0xff at column 10)\n"), err
    assert "INTERNAL" not in err and "At:" not in err


def test_separate_vocabularies_are_written_and_train_says_it_needs_a_joint_one(data, tmp_path, capsys):
    out = tmp_path / "bin"
    preprocess(PreprocessConfig(out=out, train=(data / "train.en", data / "train.de"),
                                valid=(data / "valid.en", data / "valid.de"), vocab_size=400, separate_vocab=True),
               say=lambda _: None)
    bin_ = DataFolder.open(out)
    src, tgt = (Tokenizer.load(p) for p in bin_.tokenizer_paths())
    assert src.to_bytes() != tgt.to_bytes()
    assert [bin_.split("train").tgt()[0]] == tgt.encode(read_lines(data / "train.de")[:1])
    assert main(["train", "--data-bin", str(out), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    assert "has a vocabulary per side" in capsys.readouterr().err


# --- two processes, as torchrun starts them, read one folder -------------------------------------


def _recording_worker(rank: int, port: int, args: list[str], record: str) -> None:
    """Rank `rank` of a 2-process `train --data-bin`, writing the number and pairs of each batch it trains on."""
    from test_distributed import _join

    from transformer.tasks import translation

    _join(rank, port)
    seen = []
    getitem = translation.EpochBatches.__getitem__

    def recorded(self, i):
        batch = getitem(self, i)
        seen.append((i, batch.tolist()))
        return batch

    translation.EpochBatches.__getitem__ = recorded
    code = main(args)
    Path(f"{record}.{rank}").write_text(json.dumps(seen))
    if code != 0:
        raise SystemExit(code)


def test_two_processes_read_one_folder_and_see_each_batch_once(folder, tmp_path):
    from test_distributed import _spawn

    args = ["train", "--data-bin", str(folder), "--out", str(tmp_path / "run"), "--preset", "tiny",
            "--max-tokens", "400", "--max-epochs", "1", "--valid-bleu-lines", "5", "--no-progress", "--seed", "5"]
    _spawn(_recording_worker, args, str(tmp_path / "seen"))
    split = DataFolder.open(folder).split("train")
    epoch = TokenBatchSampler(split.src_lens, split.tgt_lens, 400, seed=5).batches(0)
    seen = {rank: json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in (0, 1)}
    numbers = sorted(i for rank in seen for i, _ in seen[rank])
    assert numbers == list(range(len(numbers))) and len(numbers) >= len(epoch)  # each batch number once
    for rank, batches in seen.items():
        assert all(i % 2 == rank for i, _ in batches)
        assert all(batch == epoch[i] for i, batch in batches if i < len(epoch))  # the batches of one process
    pairs = sorted(j for rank in seen for i, batch in seen[rank] if i < len(epoch) for j in batch)
    assert pairs == list(range(len(split)))  # together, every pair of the epoch once


def test_batches_are_cut_greedily_in_length_order():
    """The sampler's batches (arrays, as training from a folder takes them): in sorted order without shuffling,
    each batch fits --max-tokens and would not with the next sentence; with shuffling, the same as lists."""
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 3000), rng.integers(1, 60, 3000)
    sampler = TokenBatchSampler(src, tgt, 500, shuffle=False)
    batches = sampler.arrays(0)
    widths = np.maximum(src, tgt) + 1
    assert np.array_equal(np.concatenate(batches), np.lexsort((src, tgt)))
    for batch, following in zip(batches, batches[1:]):
        assert len(batch) * widths[batch].max() <= 500
        assert (len(batch) + 1) * max(widths[batch].max(), widths[following[0]]) > 500
    shuffled = TokenBatchSampler(src, tgt, 500, seed=2)
    assert [b.tolist() for b in shuffled.arrays(1)] == shuffled.batches(1) != shuffled.batches(2)
