"""Translation end to end through the command line: train, translate, evaluate, average, plot, resume, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer.training.checkpoint import list_checkpoints
from transformer.store.modeldir import load_model_dir
from transformer.cli import main
from transformer.corpora import multi30k_dir
from transformer.report.metrics import score

N_TRAIN = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A few hundred Multi30k en-de pairs, as plain files."""
    root = tmp_path_factory.mktemp("data")
    source = multi30k_dir()
    for split, n in (("train", N_TRAIN), ("valid", 40)):
        for lang in ("en", "de"):
            lines = (source / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (root / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--src-lang", "en", "--tgt-lang", "de", "--out", str(out),
        "--preset", "tiny", "--vocab-size", "400", "--max-tokens", "600", "--warmup", "10",
        "--lr-scale", "2", "--log-every", "1", "--valid-every", "4", "--no-progress", "--seed", "3", *extra,
    ]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train_args(data, out, "--max-steps", "30", "--keep-last", "2")) == 0
    return out


def test_train_writes_a_self_contained_model_dir_and_logs(trained):
    for name in ("config.json", "tokenizer.model", "model.safetensors", "log.jsonl"):
        assert (trained / name).is_file()
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    valid_records = [r for r in records if r["kind"] == "valid"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in train_records)
    assert [r["step"] for r in valid_records] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert all({"loss", "ppl", "bleu"} <= set(r) for r in valid_records)
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 1.0  # it learns
    checkpoints = list_checkpoints(trained)
    assert [c.name for c in checkpoints] == ["step_00000028", "step_00000030"]  # keep-last 2
    _, _, _, meta = load_model_dir(trained)
    best_valid = max(valid_records, key=lambda r: r["bleu"])
    assert meta["best"]["bleu"] == best_valid["bleu"]


def _evaluate_json(args: list[str], capsys) -> dict:
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_translate_and_evaluate(trained, data, tmp_path, capsys):
    refs = (data / "valid.de").read_text(encoding="utf-8").splitlines()
    ref_file = str(data / "valid.de")

    # The scorer: the references score 100 against themselves, and lose nearly everything when each line
    # is scored against another sentence (references rotated by one line), so lines are paired in order.
    perfect = _evaluate_json(["--hyp", ref_file, "--ref", ref_file], capsys)
    assert (perfect["bleu"], perfect["chrf"], perfect["n"]) == (100.0, 100.0, 40)
    rotated = tmp_path / "rotated.de"
    rotated.write_text("\n".join(refs[1:] + refs[:1]) + "\n", encoding="utf-8")
    wrong = _evaluate_json(["--hyp", str(rotated), "--ref", ref_file], capsys)
    assert wrong["bleu"] < 10 and wrong["chrf"] < 50  # 0.7 and 19 for these 40 lines
    assert wrong == score(refs[1:] + refs[:1], refs).to_json()

    # The last checkpoint: the best one in RUN/ (step 4, BLEU 0 like all the others) translates every
    # line to an empty string, which would make the comparisons below hold whatever the search did.
    # It runs on to the length limit instead (all beam sizes alike), so the search here sets that limit.
    model = list_checkpoints(trained)[-1]
    search = ["--beam", "2", "--max-len-b", "20"]
    hyp = tmp_path / "hyp.de"
    assert main(["translate", "--model", str(model), "--input", str(data / "valid.en"),
                 "--output", str(hyp), *search, "--no-progress"]) == 0
    lines = hyp.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 41 and lines[-1] == ""  # 40 translations, in order, newline-terminated
    hyps = lines[:-1]
    expected = score(hyps, refs)  # computed here, from the file's lines

    scores = _evaluate_json(["--hyp", str(hyp), "--ref", ref_file], capsys)
    assert scores == expected.to_json()
    assert set(scores) == {"bleu", "chrf", "signature", "n"} and scores["n"] == 40
    assert "nrefs:1" in scores["signature"]["bleu"] and "tok:13a" in scores["signature"]["bleu"]
    assert scores["signature"]["chrf"].startswith("chrF2|") and "nc:6" in scores["signature"]["chrf"]
    # Without --json: sacrebleu's two lines, signature = score details.
    assert main(["evaluate", "--hyp", str(hyp), "--ref", ref_file]) == 0
    assert capsys.readouterr().out == str(expected) + "\n"

    # evaluate --model --input translates first and gives the same scores for the same search.
    from_model = _evaluate_json(["--model", str(model), "--input", str(data / "valid.en"), "--ref", ref_file,
                                 *search, "--no-progress"], capsys)
    assert from_model == expected.to_json()
    # No check that the model beats a wrong system: 30 steps on 300 pairs leave the tiny model near
    # a unigram model (valid loss ~4.7, BLEU 0 at every validation, degenerate output), so its
    # translations carry no sentence-specific content that a shuffled system would lose.


def test_translate_reads_stdin_and_writes_stdout(trained):
    result = subprocess.run(
        [sys.executable, "-m", "transformer", "translate", "--model", str(trained), "--beam", "1"],
        input="A man is riding a horse.\nTwo dogs play in the snow.\n", capture_output=True, text=True, check=True,
    )
    assert len(result.stdout.splitlines()) == 2


def test_translate_into_a_reader_that_leaves_early_exits_quietly(trained):
    """`transformer translate ... | head -1`: no traceback when the pipe closes, exit status 141 as Unix tools."""
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first line is written
    with os.fdopen(writer, "w") as stdout:
        result = subprocess.run(
            [sys.executable, "-m", "transformer", "translate", "--model", str(trained), "--beam", "1", "--no-progress"],
            input="A man is riding a horse.\n" * 3, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_average_of_checkpoints(trained, tmp_path):
    a, b = list_checkpoints(trained)
    out = tmp_path / "avg"
    assert main(["average", str(a), str(b), "--out", str(out)]) == 0
    averaged, *_ = load_model_dir(out)
    first, *_ = load_model_dir(a)
    second, *_ = load_model_dir(b)
    for (name, p), q, r in zip(averaged.state_dict().items(), first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(p, (q + r) / 2, msg=name)


def test_plot_writes_png(trained, tmp_path):
    out = tmp_path / "curves.png"
    assert main(["plot", str(trained), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_the_same_losses(data, tmp_path):
    full = tmp_path / "full"
    assert main(_train_args(data, full, "--max-steps", "14")) == 0
    part = tmp_path / "part"
    assert main(_train_args(data, part, "--max-steps", "6")) == 0
    # A killed run may have logged steps after its last checkpoint: resume must drop them.
    with (part / "log.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "train", "step": 7, "loss": 99.0}) + "\n" + '{"kind": "tra')
    assert main(_train_args(data, part, "--max-steps", "14", "--resume")) == 0
    expected, got = _losses(full), _losses(part)
    assert sorted(got) == list(range(1, 15))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_refuses_to_overwrite_a_run_without_resume(data, trained, capsys):
    assert main(_train_args(data, trained, "--max-steps", "1")) == 2
    assert "--resume" in capsys.readouterr().err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("transformer ") and ": error: " in last
    return last


def test_bad_input_errors(data, tmp_path, capsys):
    good = ["--valid-src", str(data / "valid.en"), "--valid-tgt", str(data / "valid.de")]

    def train_args(src: Path, tgt: Path, *extra: str) -> list[str]:
        return ["train", "--train-src", str(src), "--train-tgt", str(tgt), *good, "--out", str(tmp_path / "x"),
                "--preset", "tiny", "--vocab-size", "500", "--no-progress", "--max-steps", "1", *extra]

    en, de = data / "train.en", data / "train.de"
    err = _error(train_args(tmp_path / "missing.en", de), capsys)
    assert "missing.en" in err and "no such file" in err
    short = _write(tmp_path / "short.de", b"eins\nzwei\n")
    err = _error(train_args(en, short), capsys)
    assert f"{N_TRAIN} lines" in err and "short.de has 2" in err
    bad = _write(tmp_path / "bad.de", "ok\n".encode() * 5 + b"\xff bad\n" + "ok\n".encode() * (N_TRAIN - 6))
    err = _error(train_args(en, bad), capsys)
    assert "bad.de:6:" in err and "UTF-8" in err
    empty_en, empty_de = _write(tmp_path / "e.en", b"\n\n"), _write(tmp_path / "e.de", b"\n\n")
    assert "empty corpus" in _error(train_args(empty_en, empty_de), capsys)
    lines = en.read_text(encoding="utf-8").splitlines()
    lines[9] = " ".join(lines[:40])  # far over the 64-token limit below
    long_en = _write(tmp_path / "long.en", ("\n".join(lines) + "\n").encode())
    err = _error(train_args(long_en, de, "--max-len", "64", "--max-tokens", "100000", "--too-long", "error"), capsys)
    assert "long.en:10:" in err and "tokens" in err
    assert "unknown preset" in _error(train_args(en, de, "--preset", "gigantic"), capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error(train_args(en, de, "--device", "cuda"), capsys)
    not_a_model = tmp_path / "nothing"
    not_a_model.mkdir()
    err = _error(["translate", "--model", str(not_a_model), "--input", str(en)], capsys)
    assert "not a model directory" in err


def test_empty_lines_are_skipped_and_counted(data, tmp_path, capsys):
    en = (data / "train.en").read_text().splitlines()
    de = (data / "train.de").read_text().splitlines()
    en[5], de[9] = "", ""
    src = _write(tmp_path / "t.en", ("\n".join(en) + "\n").encode())
    tgt = _write(tmp_path / "t.de", ("\n".join(de) + "\n").encode())
    assert main(["train", "--train-src", str(src), "--train-tgt", str(tgt), "--valid-src", str(data / "valid.en"),
                 "--valid-tgt", str(data / "valid.de"), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--vocab-size", "400", "--max-steps", "1", "--no-progress"]) == 0
    assert "skipped 2 pair(s)" in capsys.readouterr().err


def test_cli_error_exit_code_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "transformer", "translate", "--model", str(tmp_path / "nope")],
        input="", capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nope" in result.stderr


COMMANDS = ["params", "average", "plot", "translation train", "translation translate", "translation evaluate",
            "translation attention", "translation quickstart", "lm train", "lm sample", "mlm train", "mlm fill"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage: transformer " + command in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["train", "translate", "evaluate", "attention", "quickstart"])
def test_translation_is_the_default_task(verb, capsys):
    """`transformer VERB` is `transformer translation VERB`: the same parser, the same help."""
    with pytest.raises(SystemExit):
        main(["translation", verb, "--help"])
    full = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    assert capsys.readouterr().out == full


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """update_freq=2 over two halves of a batch gives the parameters of one step on the whole batch."""
    from transformer.config import preset
    from transformer.model.models import build_model
    from transformer.text.tokenizer import Tokenizer
    from transformer.training.loop import LoopConfig, Objective, fit

    tokenizer = Tokenizer.train(["a man rides a horse", "two dogs play in the snow"] * 20, 30, model_type="char")
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, cfg.vocab_size, (6, 7), generator=g)
    tgt = torch.randint(4, cfg.vocab_size, (6, 6), generator=g)
    tgt[1, 4:] = 0  # padding: the halves hold different numbers of predictions
    halves = [(src[:3], tgt[:3]), (src[3:], tgt[3:])]

    def loss_fn(model, batch):
        s, t = batch
        logits = model(s, torch.cat([torch.full((len(t), 1), 2), t[:, :-1]], dim=1))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=0, reduction="sum")
        return loss, int((t != 0).sum())

    results = []
    for update_freq, batch_for_step in ((1, lambda i: (src, tgt)), (2, lambda i: halves[i % 2])):
        torch.manual_seed(0)
        model = build_model(cfg)
        # Plain SGD: Adam would turn rounding noise on zero-gradient parameters into full-size steps.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loop = LoopConfig(out=tmp_path / f"uf{update_freq}", max_steps=1, update_freq=update_freq,
                          progress=False, valid_every=100, precision="fp32")  # exact sums: not bf16
        objective = Objective(batch_for_step, loss_fn, lambda m: {"loss": 0.0}, "loss", False)
        fit(loop, model, cfg, tokenizer, objective, say=lambda _: None,
            optimizer=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)))
        results.append(model.state_dict())
    torch.manual_seed(0)
    initial = build_model(cfg).state_dict()  # the same initial weights both runs started from
    assert (results[0]["decoder.layers.0.ffn.w1.weight"] - initial["decoder.layers.0.ffn.w1.weight"]).abs().max() > 1e-3
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=0, msg=name)


def test_auto_precision_is_bf16_where_native_and_decoding_on_a_cpu_stays_fp32(monkeypatch):
    from transformer import device as train_module

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    assert train_module.resolve_precision("auto", gpu) == ("bf16", "auto: the GPU has native bf16")
    assert train_module.resolve_precision("auto", gpu, training=False)[0] == "bf16"
    assert train_module.resolve_precision("auto", cpu)[0] == "bf16"  # AVX-512-BF16 / AMX
    assert train_module.resolve_precision("auto", cpu, training=False) == ("fp32", "auto: decoding on a CPU")
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert train_module.resolve_precision("auto", gpu)[0] == "fp32"
    assert train_module.resolve_precision("auto", cpu) == ("fp32", "auto: cpu has no native bf16")
    assert train_module.resolve_precision("bf16", cpu)[0] == "bf16"
    assert train_module.resolve_precision("bf16", cpu, training=False)[0] == "bf16"
    with pytest.raises(train_module.UserError):
        train_module.resolve_precision("fp8", cpu)


def test_native_bf16_on_a_cpu_needs_the_avx512_bf16_or_amx_flag_not_just_avx512(monkeypatch):
    from transformer import device as train_module

    cpu = torch.device("cpu")
    for flags, native in (({"avx512_f": True, "avx512_bw": True, "avx512_bf16": False, "amx_bf16": False}, False),
                          ({"avx2": True}, False), ({"avx512_bf16": True, "amx_bf16": False}, True),
                          ({"avx512_bf16": False, "amx_bf16": True}, True)):
        monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda flags=flags: flags)
        assert train_module.native_bf16(cpu) is native, flags


def test_a_time_limited_run_counts_its_progress_bar_to_the_steps_that_fit(data, tmp_path, capsys):
    """With --max-minutes ending the run first, the bar's total is the steps that fit, not --max-steps."""
    out = tmp_path / "run"
    args = [a for a in _train_args(data, out, "--max-steps", "100000", "--max-minutes", "0.04") if a != "--no-progress"]
    assert main(args) == 0
    bars = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)
    done, total = map(int, bars[-1])
    steps = max(_losses(out))
    assert steps < 100000 and done == steps and total == steps
    assert all(int(t) < 100000 for _, t in bars[1:])  # estimated from the first step on


def test_a_busy_cpu_is_named_once_and_a_quiet_one_not(data, tmp_path, capsys, monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 4.0 * cores, 4.0 * cores))
    assert main(_train_args(data, tmp_path / "busy", "--max-steps", "6")) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: this machine is busy: load average {4.0 * cores:.1f} on {cores} cores") == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert main(_train_args(data, tmp_path / "quiet", "--max-steps", "6")) == 0
    assert "this machine is busy" not in capsys.readouterr().err
