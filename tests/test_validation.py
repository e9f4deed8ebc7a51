"""Bad input is one line on stderr and exit status 2, found before any work starts: every number's range
(on the command line and in --config files), output paths, and a model directory's config.json."""

import argparse
import errno
import json
from pathlib import Path

import pytest

from transformer.cli import build_parser, main, parse
from transformer.cli import common
from transformer.cli.common import Number


def _error(argv: list[str], capsys, alone: bool = True) -> str:
    """The error line that main(argv) prints on stderr, having returned 2: the only line, or with `alone`
    False the last one after progress messages (and the only line with ": error: ")."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 if alone else [i for i, line in enumerate(lines) if ": error: " in line] == [len(lines) - 1], err
    return lines[-1]


# (command, flag, a value out of range, the range the message gives)
OUT_OF_RANGE = [
    *[("train", flag, value, rng) for flag, value, rng in [
        ("--warmup", "-10", ">= 0"), ("--valid-every", "0", ">= 1"), ("--log-every", "0", ">= 1"),
        ("--lr-scale", "0", "> 0"), ("--lr", "-1e-3", "> 0"), ("--update-freq", "0", ">= 1"),
        ("--max-steps", "0", ">= 1"), ("--max-minutes", "0", "> 0"), ("--max-epochs", "0", ">= 1"),
        ("--keep-last", "0", ">= 1"), ("--max-tokens", "0", ">= 1"), ("--vocab-size", "3", ">= 8"),
        ("--label-smoothing", "1", ">= 0 and < 1"), ("--dropout", "1.0", ">= 0 and < 1"),
        ("--dropout", "-0.1", ">= 0 and < 1"), ("--d-model", "0", ">= 1"), ("--n-heads", "0", ">= 1"),
        ("--d-ff", "0", ">= 1"), ("--layers", "0", ">= 1"), ("--max-len", "0", ">= 1"),
        ("--attn-window", "-1", ">= 0"), ("--clip-norm", "-1", ">= 0"), ("--weight-decay", "-0.1", ">= 0"),
        ("--decay-steps", "0", ">= 1"), ("--min-lr", "-1", ">= 0"), ("--beta2", "1", ">= 0 and < 1"),
        ("--adam-eps", "0", "> 0"), ("--seed", "-1", ">= 0 and <= 4294967295"),
        ("--seed", "4294967296", ">= 0 and <= 4294967295"), ("--valid-bleu-lines", "0", ">= 1"),
        ("--max-minutes", "inf", "> 0"), ("--lr", "nan", "> 0"),
    ]],
    *[("translate", flag, value, rng) for flag, value, rng in [
        ("--beam", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--min-len", "-1", ">= 0"),
        ("--max-len-a", "-1", ">= 0"), ("--max-len-b", "-1", ">= 0"), ("--alpha", "-1", ">= 0"),
    ]],
    ("evaluate", "--beam", "0", ">= 1"),
    ("attention", "--beam", "0", ">= 1"),
    ("quickstart", "--minutes", "0", "> 0"),
    *[("lm train", flag, value, rng) for flag, value, rng in [
        ("--valid-fraction", "0", "> 0 and < 1"), ("--valid-fraction", "1", "> 0 and < 1"),
        ("--block-size", "0", ">= 1"), ("--batch-size", "0", ">= 1"), ("--eval-batches", "0", ">= 1"),
        ("--vocab-size", "7", ">= 8"), ("--warmup", "-1", ">= 0"), ("--layers", "0", ">= 1"),
    ]],
    *[("lm sample", flag, value, rng) for flag, value, rng in [
        ("--tokens", "-1", ">= 0"), ("--temperature", "-0.5", ">= 0"), ("--top-k", "0", ">= 1"),
        ("--top-p", "0", "> 0 and <= 1"), ("--top-p", "1.5", "> 0 and <= 1"),
        ("--seed", "-1", ">= 0 and <= 4294967295"),
    ]],
    *[("mlm train", flag, value, rng) for flag, value, rng in [
        ("--mask-prob", "0", "> 0 and < 1"), ("--mask-prob", "1", "> 0 and < 1"), ("--batch-size", "0", ">= 1"),
        ("--vocab-size", "0", ">= 8"), ("--max-len", "0", ">= 1"),
    ]],
    ("mlm fill", "--n-best", "0", ">= 1"),
    ("mlm train", "--max-len", "2", ">= 3 for a masked language model ([CLS], at least one token, [SEP])"),
    ("params", "--vocab-size", "3", ">= 8"),
]


@pytest.mark.parametrize("command, flag, value, rng", OUT_OF_RANGE)
def test_a_number_out_of_range_is_one_line_with_the_range(command, flag, value, rng, capsys):
    extra = ["a [MASK] b"] if command == "mlm fill" else []
    line = _error([*command.split(), *extra, flag, value], capsys)
    prog = "transformer " + ("translation " + command if command in ("train", "translate", "evaluate", "attention",
                                                                       "quickstart") else command)
    assert line == f"{prog}: error: {flag} {value}: must be {rng}"


@pytest.mark.parametrize("flag, value", [("--warmup", "x"), ("--warmup", "1.5"), ("--lr", "fast"), ("--beam", "")])
def test_a_value_that_is_not_a_number_is_one_line(flag, value, capsys):
    command = ["translate"] if flag == "--beam" else ["train"]
    line = _error([*command, flag, value], capsys)
    assert line.startswith("transformer translation ") and f"{flag}: invalid" in line and repr(value) in line


@pytest.mark.parametrize("argv, value", [
    (["train", "--warmup", "0"], ("warmup", 0)), (["train", "--dropout", "0"], ("dropout", 0.0)),
    (["train", "--attn-window", "0"], ("attn_window", 0)), (["train", "--seed", "4294967295"], ("seed", 2**32 - 1)),
    (["train", "--label-smoothing", "0.999"], ("label_smoothing", 0.999)), (["train", "--clip-norm", "0"], ("clip_norm", 0.0)),
    (["lm", "sample", "--top-p", "1"], ("top_p", 1.0)), (["lm", "sample", "--temperature", "0"], ("temperature", 0.0)),
    (["lm", "sample", "--tokens", "0"], ("tokens", 0)), (["translate", "--min-len", "0"], ("min_len", 0)),
    (["train", "--vocab-size", "8"], ("vocab_size", 8)), (["train", "--lr", "1e-9"], ("lr", 1e-9)),
])
def test_the_bounds_themselves_are_taken(argv, value):
    name, expected = value
    got = getattr(parse(argv), name)
    assert got == expected and type(got) is type(expected)


def test_every_numeric_flag_has_a_range():
    """No flag of any command takes a bare int or float: each goes through `number` with its range."""
    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(build_parser()):
        for action in p._actions:
            assert action.type not in (int, float), f"{p.prog} {action.option_strings}: no range"
            if isinstance(action.type, Number):
                assert action.type.minimum is not None, f"{p.prog} {action.option_strings}: no minimum"


@pytest.mark.parametrize("argv, expected", [
    (["train", "--no-such-flag"], "transformer translation train: error: unrecognized arguments: --no-such-flag"),
    (["lm", "sample", "extra"], "transformer lm sample: error: unrecognized arguments: extra"),
    (["average", "a"], "transformer average: error: the following arguments are required: --out"),
    (["train", "--precision", "fp8"], "transformer translation train: error: --precision: invalid choice: 'fp8'"),
    (["train", "--warmup"], "transformer translation train: error: --warmup: expected one argument"),
    (["nonsense"], "transformer: error: "),
    ([], "transformer: error: the following arguments are required: TASK"),
])
def test_every_parse_error_is_one_line(argv, expected, capsys):
    assert _error(argv, capsys).startswith(expected)


@pytest.mark.parametrize("command", ["train", "lm train", "mlm train"])
@pytest.mark.parametrize("content, problem", [
    ("warmup = -10\n", "warmup: -10: must be >= 0"),
    ("dropout = 1.5\n", "dropout: 1.5: must be >= 0 and < 1"),
    ("lr = 0\n", "lr: 0: must be > 0"),
    ("max-steps = 0\n", "max-steps: 0: must be >= 1"),
    ("max_minutes = -1.0\n", "max_minutes: -1.0: must be > 0"),
    ("seed = -3\n", "seed: -3: must be >= 0"),
    ("vocab-size = 2\n", "vocab-size: 2: must be >= 8"),
    ("max-steps = 2.5\n", "max-steps: 2.5 is not a value of --max-steps"),
    ("warmup = [1, 2]\n", "warmup: [1, 2] is not a value of --warmup"),
    ("out = 5\n", "out: 5 is not a value of --out"),
    ("precision = 16\n", "precision: 16 is not a value of --precision"),
])
def test_config_file_values_get_the_same_checks_naming_file_and_key(command, content, problem, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(content, encoding="utf-8")
    line = _error([*command.split(), "--config", str(config)], capsys)
    prog = "transformer " + ("translation train" if command == "train" else command)
    assert line == f"{prog}: error: {config}: {problem}" or line.startswith(f"{prog}: error: {config}: {problem}")
    assert not (tmp_path / "run").exists()


def test_config_file_numbers_in_range_are_taken(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("warmup = 0\nmax-steps = 3.0\nlr = 1\ndropout = 0\nseed = 7\n", encoding="utf-8")
    args = parse(["train", "--config", str(config)])
    assert (args.warmup, args.max_steps, args.lr, args.dropout, args.seed) == (0, 3, 1.0, 0.0, 7)
    assert type(args.max_steps) is int and type(args.lr) is float


def test_a_message_with_a_line_break_stays_one_line(tmp_path, capsys):
    line = _error(["lm", "train", "--text", str(tmp_path / "a\nb.txt"), "--out", str(tmp_path / "run")], capsys)
    assert "a\\nb.txt: no such file" in line


# --- output paths, checked before the work -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(untrained_model_dir) -> Path:
    return untrained_model_dir


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a translation, an attention map or an average is computed."""
    from transformer.api import text as api_text
    from transformer.inference import translate
    from transformer.report import attention_maps
    from transformer.training import checkpoint

    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(translate, "translate_lines", forbidden)
    monkeypatch.setattr(attention_maps, "attention_maps", forbidden)
    monkeypatch.setattr(api_text, "translate_lines", forbidden)  # where Translator calls them
    monkeypatch.setattr(api_text, "attention_maps", forbidden)
    monkeypatch.setattr(checkpoint, "average_state", forbidden, raising=False)
    monkeypatch.setattr(checkpoint, "write_average", forbidden)


def _unwritable(monkeypatch):
    """Make every folder refuse new files, as a read-only folder does (root writes into chmod 555 folders)."""
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(common.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("case", ["missing folder", "under a file", "a folder", "read-only folder"])
def test_translate_output_is_checked_before_translating(case, model_dir, tmp_path, capsys, monkeypatch, no_work):
    source = tmp_path / "in.txt"
    source.write_text("a man rides a horse .\n", encoding="utf-8")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    output, problem = {
        "missing folder": (tmp_path / "no" / "out.txt", "no such folder"),
        "under a file": (blocker / "out.txt", "is not a folder"),
        "a folder": (tmp_path, "is a folder"),
        "read-only folder": (tmp_path / "out.txt", "cannot write in"),
    }[case]
    if case == "read-only folder":
        _unwritable(monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    line = _error(["translate", "--model", str(model_dir), "--input", str(source), "--output", str(output)], capsys)
    assert line.startswith(f"transformer translation translate: error: --output {output}: ") and problem in line
    assert sorted(tmp_path.rglob("*")) == before


def test_translate_output_read_only_file(model_dir, tmp_path, capsys, monkeypatch, no_work):
    source = tmp_path / "in.txt"
    source.write_text("a\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    output.write_text("old\n", encoding="utf-8")
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if Path(path) == output and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    line = _error(["translate", "--model", str(model_dir), "--input", str(source), "--output", str(output)], capsys)
    assert f"--output {output}: cannot write" in line
    assert output.read_text(encoding="utf-8") == "old\n"


def test_translate_output_that_fails_at_the_end_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.txt"
    source.write_text("a man\n", encoding="utf-8")
    output = tmp_path / "out.txt"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    line = _error(["translate", "--model", str(model_dir), "--input", str(source), "--output", str(output),
                   "--beam", "1", "--max-len-b", "2", "--no-progress"], capsys)
    assert line.endswith(f"--output {output}: cannot write (No space left on device)")


def test_translate_output_that_can_be_written_is_written(model_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("a man\nein pferd\n", encoding="utf-8")
    output = tmp_path / "out.txt"
    assert main(["translate", "--model", str(model_dir), "--input", str(source), "--output", str(output),
                 "--beam", "1", "--max-len-b", "2", "--no-progress"]) == 0
    assert len(output.read_text(encoding="utf-8").splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # the probe left nothing


@pytest.mark.parametrize("case", ["under a file", "read-only folder"])
def test_attention_out_is_checked_before_drawing(case, model_dir, tmp_path, capsys, monkeypatch, no_work):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    out = blocker / "maps" if case == "under a file" else tmp_path / "maps"
    if case == "read-only folder":
        _unwritable(monkeypatch)
    line = _error(["attention", "--model", str(model_dir), "--sentence", "a man", "--out", str(out)], capsys)
    assert line.startswith(f"transformer translation attention: error: --out {out}: ")
    assert not (tmp_path / "maps").exists()


def test_attention_default_out_in_a_read_only_model_dir(model_dir, capsys, monkeypatch, no_work):
    _unwritable(monkeypatch)
    line = _error(["attention", "--model", str(model_dir), "--sentence", "a man"], capsys)
    assert f"--out {model_dir / 'attention'}: cannot write in {model_dir}" in line


@pytest.mark.parametrize("case", ["under a file", "read-only folder", "a file"])
def test_average_out_is_checked_before_reading_checkpoints(case, model_dir, tmp_path, capsys, monkeypatch, no_work):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    out = {"under a file": blocker / "avg", "read-only folder": tmp_path / "avg", "a file": blocker}[case]
    if case == "read-only folder":
        _unwritable(monkeypatch)
    line = _error(["average", str(model_dir), str(model_dir), "--out", str(out)], capsys)
    assert line.startswith(f"transformer average: error: --out {out}: ")
    assert not (tmp_path / "avg").exists()


@pytest.mark.parametrize("case", ["under a file", "read-only folder", "a folder"])
def test_plot_out_is_checked_before_plotting(case, tmp_path, capsys, monkeypatch):
    from transformer.report import plots

    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x", encoding="utf-8")
    out = {"under a file": blocker / "c.png", "read-only folder": None, "a folder": run}[case]
    if case == "read-only folder":
        _unwritable(monkeypatch)
    monkeypatch.setattr(plots, "plot_training", lambda *a, **k: pytest.fail("plotted before the check"))
    line = _error(["plot", str(run), *(["--out", str(out)] if out else [])], capsys)
    shown = out if out else run / "curves.png"
    assert line.startswith(f"transformer plot: error: --out {shown}: ")


# --- a model directory's config.json --------------------------------------------------------------------


@pytest.mark.parametrize("change, field, problem", [
    ({"n_heads": 0}, "n_heads", "n_heads 0: must be >= 1"),
    ({"d_model": "big"}, "d_model", "d_model 'big': must be an integer"),
    ({"d_model": 32.0}, "d_model", "d_model 32.0: must be an integer"),
    ({"n_heads": True}, "n_heads", "n_heads True: must be an integer"),
    ({"dropout": 1.5}, "dropout", "dropout 1.5: must be >= 0 and < 1"),
    ({"dropout": "0.1"}, "dropout", "dropout '0.1': must be a finite number"),
    ({"layer_norm_eps": 0}, "layer_norm_eps", "layer_norm_eps 0: must be > 0"),
    ({"arch": "rnn"}, "arch", "arch 'rnn': must be one of encoder-decoder, encoder, decoder"),
    ({"positions": None}, "positions", "positions None: must be one of sinusoidal, learned"),
    ({"norm_first": "no"}, "norm_first", "norm_first 'no': must be true or false"),
    ({"attn_window": -2}, "attn_window", "attn_window -2: must be >= 0"),
    ({"attn_window": "wide"}, "attn_window", "attn_window 'wide': must be an integer or null"),
    ({"max_len": 0}, "max_len", "max_len 0: must be >= 1"),
    ({"vocab_size": 3}, "eos_id", "eos_id 3: must be < vocab_size (3)"),
    ({"d_model": 32, "n_heads": 3}, "n_heads", "d_model=32 is not divisible by n_heads=3"),
    ({"d_model": 33, "n_heads": 1}, "d_model", "d_model 33: must be even with sinusoidal positions"),
    ({"colour": "blue"}, "colour", "unknown field 'colour'"),
])
@pytest.mark.parametrize("command", ["translate", "lm sample", "mlm fill", "average"])
def test_a_bad_model_config_is_one_line_naming_the_file_and_field(change, field, problem, command, model_dir,
                                                                  tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("tokenizer.model", "model.safetensors"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["model"].update(change)
    (bad / "config.json").write_text(json.dumps(config), encoding="utf-8")
    argv = {
        "translate": ["translate", "--model", str(bad), "--input", str(bad / "config.json")],
        "lm sample": ["lm", "sample", "--model", str(bad)],
        "mlm fill": ["mlm", "fill", "--model", str(bad), "a [MASK]"],
        "average": ["average", str(bad), "--out", str(tmp_path / "avg")],
    }[command]
    line = _error(argv, capsys)
    assert str(bad / "config.json") in line and field in line and problem in line


def test_a_config_that_does_not_fit_the_weights_is_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("tokenizer.model", "model.safetensors"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["model"].update(d_model=30, n_heads=3)  # a valid shape, but not the one of the weights
    (bad / "config.json").write_text(json.dumps(config), encoding="utf-8")
    line = _error(["translate", "--model", str(bad), "--input", str(bad / "config.json")], capsys)
    assert str(bad / "model.safetensors") in line and "do not fit" in line


def test_model_config_checks_every_field_in_python():
    from transformer.config import ModelConfig, preset
    from transformer.errors import UserError

    with pytest.raises(UserError, match=r"^n_encoder_layers -1: must be >= 0$"):
        ModelConfig(n_encoder_layers=-1)
    with pytest.raises(UserError, match=r"^attn_dropout 1: must be >= 0 and < 1$"):
        preset("tiny", attn_dropout=1)
    assert ModelConfig(attn_window=None, dropout=0).dropout == 0


# --- failures the library does not foresee -------------------------------------------------------------


def test_running_out_of_memory_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    from transformer.api import text as translate  # where Translator calls it

    def greedy(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 35712000000 bytes.\nmore")

    monkeypatch.setattr(translate, "translate_lines", greedy)
    source = tmp_path / "in.txt"
    source.write_text("a\n", encoding="utf-8")
    line = _error(["translate", "--model", str(model_dir), "--input", str(source), "--beam", "100000"], capsys)
    assert "error: out of memory, ask for less" in line and "35712000000 bytes" in line


def test_another_runtime_error_is_not_hidden(model_dir, tmp_path, monkeypatch):
    from transformer.api import text as translate  # where Translator calls it

    monkeypatch.setattr(translate, "translate_lines", lambda *a, **k: 1 / 0)
    source = tmp_path / "in.txt"
    source.write_text("a\n", encoding="utf-8")
    with pytest.raises(ZeroDivisionError):  # a bug: its traceback is what a report needs
        main(["translate", "--model", str(model_dir), "--input", str(source)])


def test_an_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    from transformer.report import plots

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "curves.png"))

    monkeypatch.setattr(plots, "plot_training", full)
    line = _error(["plot", str(tmp_path)], capsys)
    assert line == f"transformer plot: error: {tmp_path / 'curves.png'}: No space left on device"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    (root / "t.txt").write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    assert main(["lm", "train", "--text", str(root / "t.txt"), "--out", str(root / "run"), "--preset", "tiny",
                 "--layers", "1", "--block-size", "8", "--batch-size", "2", "--eval-batches", "1", "--max-steps", "1",
                 "--no-progress"]) == 0
    return root / "run"


@pytest.mark.parametrize("flag, value", [("--temperature", "1e-300"), ("--top-p", "1e-300")])
def test_sampling_with_a_vanishing_temperature_or_top_p_is_greedy(flag, value, lm_dir, capsys):
    """Both are in range (> 0): a vanishing temperature, or a nucleus of one token, samples the argmax."""
    greedy = ["lm", "sample", "--model", str(lm_dir), "--tokens", "5", "--seed", "0", "--temperature", "0"]
    assert main(greedy) == 0
    expected = capsys.readouterr().out
    assert main(["lm", "sample", "--model", str(lm_dir), "--tokens", "5", "--seed", "0", flag, value]) == 0
    assert capsys.readouterr().out == expected


# --- --too-long ------------------------------------------------------------------------------------------


def test_too_long_defaults_to_skip_and_takes_error(tmp_path, capsys):
    assert parse(["train"]).too_long == "skip"
    assert parse(["train", "--too-long", "error"]).too_long == "error"
    assert "--too-long: invalid choice: 'drop'" in _error(["train", "--too-long", "drop"], capsys)


def test_too_long_error_stops_at_the_long_pair(tmp_path, capsys):
    lines = [f"a man number {i} rides a horse ." for i in range(30)]
    long = lines[:]
    long[4] = " ".join(lines)  # far over --max-len 32
    for name, text in (("train.en", long), ("train.de", lines), ("valid.en", lines[:3]), ("valid.de", lines[:3])):
        (tmp_path / name).write_text("\n".join(text) + "\n", encoding="utf-8")
    argv = ["train", "--data", str(tmp_path), "--preset", "tiny", "--layers", "1", "--vocab-size", "60", "--no-byte-fallback",
            "--max-len", "32", "--max-steps", "1", "--valid-bleu-lines", "1", "--no-progress"]
    line = _error([*argv, "--out", str(tmp_path / "strict"), "--too-long", "error"], capsys, alone=False)
    assert f"{tmp_path / 'train.en'}:5:" in line
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))["meta"]
    assert meta["translation"]["too_long"] == "skip"


def test_a_config_json_whose_meta_is_not_an_object_is_one_line(tmp_path, capsys):
    from transformer.config import preset
    from transformer.model.models import build_model
    from transformer.text.tokenizer import Tokenizer
    from transformer.store.modeldir import save_model_dir

    tokenizer = Tokenizer.train(["a man rides a horse"] * 20, 30, model_type="char")
    model_dir = tmp_path / "m"
    save_model_dir(model_dir, build_model(preset("tiny", vocab_size=tokenizer.vocab_size)),
                   preset("tiny", vocab_size=tokenizer.vocab_size), tokenizer.to_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"meta": [1]}))
    assert main(["average", str(model_dir), str(model_dir), "--out", str(tmp_path / "avg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith('config.json: "meta" is not an object') and "\n" not in err
