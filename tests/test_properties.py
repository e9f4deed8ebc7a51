"""Property-based tests (hypothesis): whatever the bytes of the files and the values of the flags, a command
ends with exit status 0, or 2 and one error line on stderr; never a traceback, and it writes nothing
outside its --out. Counts and sizes are bounded so that the whole file runs in well under a minute."""

import contextlib
import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from transformer.cli import build_parser, main, parse
from transformer.cli.common import ArgumentsError, Number
from transformer.errors import UserError

# Hypothesis keeps caches in ./.hypothesis: here they go to the temporary folder, not into the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "transformer-hypothesis")
# TRANSFORMER_PROPERTY_SCALE=20 runs 20 times the examples, drawn at random, to hunt for a failure. Without it
# (CI) the examples are the same every run (derandomize), so that CI never fails by chance.
SCALE = int(os.environ.get("TRANSFORMER_PROPERTY_SCALE", "1"))
# No example database; slow examples are expected.
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize="TRANSFORMER_PROPERTY_SCALE" not in os.environ)

ALPHABET = "abcdeé xyz.,'\t\r😀"


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(root: Path, argv: list[str], outs: list[str]) -> tuple[int, str]:
    """main(argv) run in the folder `root` (stdout and stderr captured): its exit status and stderr, having
    checked that it ends in 0, or in 2 with one error line last, and that it added files only under `outs`
    (relative to `root`) and removed none."""
    before = _listing(root)
    cwd = os.getcwd()
    err, out = io.StringIO(), io.StringIO()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        os.chdir(cwd)
    after = _listing(root)
    stderr = err.getvalue()
    assert "Traceback" not in stderr
    assert code in (0, 2), (code, stderr)
    if code == 2:
        lines = stderr.splitlines()
        errors = [i for i, line in enumerate(lines) if ": error: " in line]
        assert errors == [len(lines) - 1] and lines[-1].startswith("transformer"), stderr
    event(f"exit {code}" + (f": {lines[-1].split(': error: ')[1][:40]}" if code == 2 else ""))
    assert before <= after, f"removed: {before - after}"
    added = after - before  # each under an out, or a folder made on the way to one
    assert all(any(p == o or p.startswith(o + os.sep) or o.startswith(p + os.sep) and (root / p).is_dir()
                   for o in outs) for p in added), (added, outs)
    return code, stderr


def _numeric_flags() -> list[tuple[list[str], str, Number]]:
    """(command words, flag, its Number type) for every numeric flag of every command."""
    found = []

    def walk(p, words):
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict) and action.option_strings == []:
                for name, sub in action.choices.items():
                    walk(sub, [*words, name])
            elif isinstance(action.type, Number):
                found.append((words, action.option_strings[0], action.type))

    walk(build_parser(), [])
    return found


NUMERIC_FLAGS = _numeric_flags()
NUMBER_TEXT = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "-0", "1e-3", "-1e-3", "0.5", "1.0", "nan", "-inf", "1_000", " 3 ", "0x10", ""]),
    st.text(max_size=6),
)


@settings(max_examples=200 * SCALE, **SETTINGS)
@given(which=st.integers(0, len(NUMERIC_FLAGS) - 1), value=NUMBER_TEXT)
def test_a_numeric_flag_is_parsed_within_its_range_or_refused_on_one_line(which, value):
    words, flag, kind = NUMERIC_FLAGS[which]
    extra = ["a [MASK]"] if words == ["mlm", "fill"] else ["x"] if words in (["average"], ["plot"]) else []
    try:
        args = parse([*words, *extra, f"{flag}={value}"])
    except ArgumentsError as e:
        assert "\n" not in str(e) and e.prog.startswith("transformer")
        return
    got = getattr(args, flag.lstrip("-").replace("-", "_"))
    assert isinstance(got, kind.kind) and not isinstance(got, bool)
    assert kind(got) == got  # within the range: the check takes it again


TOML_VALUE = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "nan", "inf", "-inf", "[1, 2]", "{a = 1}", "1979-05-27", '""', "'x'"]),
    st.text(ALPHABET, max_size=8).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
)
TRAIN_KEYS = sorted({a.dest for a in parse(["train"]).parser._actions if a.option_strings} - {"help"})


@settings(max_examples=120 * SCALE, **SETTINGS)
@given(entries=st.lists(st.tuples(st.one_of(st.sampled_from(TRAIN_KEYS), st.text("abz_-", min_size=1, max_size=5)),
                                  TOML_VALUE), max_size=4),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_a_config_file_is_taken_or_refused_on_one_line_naming_it(entries, raw, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "run.toml"
    if raw is None:
        text = "".join(f'"{key}" = {value}\n' for key, value in dict(entries).items())
        config.write_text(text, encoding="utf-8")
    else:
        config.write_bytes(raw)
    try:
        parse(["train", "--config", str(config)])
    except UserError as e:
        assert "\n" not in str(e) and str(config) in str(e)


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(data=st.binary(max_size=200))
def test_reading_lines_of_any_bytes_gives_lines_or_a_user_error(data, tmp_path_factory):
    from transformer.text.data import read_lines

    path = tmp_path_factory.mktemp("read") / "f.txt"
    path.write_bytes(data)
    try:
        lines = read_lines(path)
    except UserError as e:
        assert str(path) in str(e)
    else:
        assert all("\n" not in line for line in lines)


FIELD_VALUE = st.one_of(st.integers(-2, 40), st.floats(-1, 2), st.booleans(), st.none(), st.text(max_size=4),
                        st.sampled_from(["encoder", "decoder", "encoder-decoder", "learned", "sinusoidal"]))


@pytest.fixture(scope="module")
def model_dir(untrained_model_dir) -> Path:
    return untrained_model_dir


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(changes=st.dictionaries(st.sampled_from(["d_model", "n_heads", "d_ff", "vocab_size", "max_len", "dropout",
                                                "attn_window", "arch", "positions", "norm_first", "pad_id", "x"]),
                               FIELD_VALUE, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_a_model_directory_with_any_config_loads_or_is_one_user_error(changes, raw, model_dir, tmp_path_factory):
    import json

    from transformer.store.modeldir import load_model_dir

    path = tmp_path_factory.mktemp("m") / "model"
    path.mkdir()
    for name in ("tokenizer.model", "model.safetensors"):
        (path / name).write_bytes((model_dir / name).read_bytes())
    if raw is None:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        config["model"].update(changes)
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    else:
        (path / "config.json").write_bytes(raw)
    try:
        load_model_dir(path)
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)


@st.composite
def parallel_corpus(draw) -> tuple[bytes, bytes]:
    """Two files: aligned lines of text (most of the time), or any bytes."""
    if draw(st.integers(0, 3)):
        n = draw(st.integers(1, 12))
        side = st.lists(st.text(ALPHABET, min_size=1, max_size=30), min_size=n, max_size=n)
        return tuple(("\n".join(draw(side)) + "\n").encode() for _ in range(2))
    return draw(st.binary(max_size=200)), draw(st.binary(max_size=200))


def _mostly(valid, invalid):
    """Values of `valid` three times in four, else of `invalid`."""
    return st.one_of(valid, valid, valid, invalid)


def _some_flags(table: dict, most: int = 3):
    """Up to `most` flags of `table`, each with a value of its strategy, as an argument list."""
    names = st.lists(st.sampled_from(sorted(table)), max_size=most, unique=True)
    values = names.flatmap(lambda chosen: st.fixed_dictionaries({name: table[name] for name in chosen}))
    return values.map(lambda d: [s for flag, value in d.items() for s in (flag, str(value))])


TRAIN_FLAGS = {
    "--vocab-size": st.integers(0, 400), "--max-tokens": _mostly(st.integers(40, 2000), st.integers(-1, 40)),
    "--max-len": _mostly(st.integers(8, 48), st.integers(-1, 8)), "--d-model": st.sampled_from([8, 15, 16, 32]),
    "--n-heads": _mostly(st.integers(1, 2), st.integers(-1, 5)), "--d-ff": st.integers(0, 32),
    "--attn-window": st.integers(-1, 3), "--dropout": _mostly(st.floats(0, 0.5), st.floats(-2, 2)),
    "--label-smoothing": _mostly(st.floats(0, 0.5), st.floats(-2, 2)), "--lr": _mostly(st.floats(1e-4, 1), st.floats(-1, 0)),
    "--lr-scale": _mostly(st.floats(0.1, 3), st.floats(-1, 0)), "--warmup": st.integers(-1, 4),
    "--update-freq": st.integers(0, 2), "--valid-every": st.integers(0, 2), "--log-every": st.integers(0, 2),
    "--keep-last": st.integers(0, 2), "--max-steps": st.integers(0, 2), "--max-epochs": st.integers(0, 2),
    "--clip-norm": st.floats(-1, 2), "--weight-decay": st.floats(-0.1, 0.5), "--seed": st.integers(-1, 5),
    "--schedule": st.sampled_from(["inverse-sqrt", "cosine", "constant", "linear"]),
    "--too-long": st.sampled_from(["skip", "error", "drop"]), "--tokenizer": st.sampled_from(["bpe", "unigram"]),
    "--valid-bleu-lines": st.integers(0, 2), "--positions": st.sampled_from(["sinusoidal", "learned"]),
    "--max-minutes": _mostly(st.floats(0.01, 5), st.floats(-1, 0)), "--precision": st.sampled_from(["fp32", "fp16"]),
}


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(corpus=parallel_corpus(), valid=parallel_corpus(), flags=_some_flags(TRAIN_FLAGS), fallback=st.booleans())
def test_train_on_any_corpus_with_any_flags(corpus, valid, flags, fallback, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in zip(("train.en", "train.de", "valid.en", "valid.de"), (*corpus, *valid)):
            (root / name).write_bytes(data)
        argv = ["train", "--data", ".", "--out", "run", "--preset", "tiny", "--layers", "1", "--max-steps", "1",
                "--valid-bleu-lines", "2", "--no-progress", "--device", "cpu",
                *(["--byte-fallback", "--vocab-size", "300"] if fallback else ["--no-byte-fallback", "--vocab-size", "30"]),
                *flags]
        code, _ = _run(root, argv, ["run"])
        if code == 0:
            assert (root / "run" / "model.safetensors").is_file()


LM_FLAGS = {
    "--block-size": _mostly(st.integers(1, 12), st.integers(-1, 0)), "--batch-size": st.integers(0, 3),
    "--eval-batches": st.integers(0, 2), "--valid-fraction": _mostly(st.floats(0.1, 0.9), st.floats(-0.1, 1.1)),
    "--vocab": st.sampled_from(["char", "bpe"]), "--vocab-size": st.integers(0, 200), "--max-steps": st.integers(0, 2),
    "--warmup": st.integers(-1, 3), "--max-len": st.integers(0, 16), "--d-model": st.sampled_from([8, 16]),
    "--n-heads": _mostly(st.integers(1, 2), st.integers(-1, 3)), "--lr": _mostly(st.floats(1e-4, 1), st.floats(-1, 0)),
}


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(text=st.one_of(st.binary(max_size=300), st.text(ALPHABET + "\n", min_size=50, max_size=300).map(str.encode)),
       flags=_some_flags(LM_FLAGS))
def test_lm_train_on_any_text_with_any_flags(text, flags, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "t.txt").write_bytes(text)
        argv = ["lm", "train", "--text", "t.txt", "--out", "run", "--preset", "tiny", "--layers", "1",
                "--max-steps", "1", "--block-size", "8", "--batch-size", "2", "--eval-batches", "1",
                "--valid-fraction", "0.3", "--no-progress", "--device", "cpu", *flags]
        _run(root, argv, ["run"])


TRANSLATE_FLAGS = {
    "--beam": _mostly(st.integers(1, 3), st.integers(-1, 0)), "--batch-size": _mostly(st.integers(1, 4), st.just(0)),
    "--min-len": st.integers(-1, 3), "--max-len-a": _mostly(st.floats(0, 1.5), st.floats(-1, 0)),
    "--max-len-b": st.integers(-1, 4), "--alpha": _mostly(st.floats(0, 2), st.floats(-1, 0)),
    "--quantize": st.sampled_from(["none", "int8"]),
}


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(source=st.one_of(st.binary(max_size=120), st.text(ALPHABET + "\n", max_size=80).map(str.encode)),
       output=st.sampled_from(["out/hyp.txt", "out/missing/hyp.txt", "out", "src.txt/hyp.txt", None]),
       flags=_some_flags(TRANSLATE_FLAGS))
def test_translate_any_input_with_any_flags(source, output, flags, model_dir, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "src.txt").write_bytes(source)
        (root / "out").mkdir()
        argv = ["translate", "--model", str(model_dir), "--input", "src.txt", "--no-progress", "--device", "cpu",
                "--max-len-b", "3", *(["--output", output] if output else []), *flags]
        code, _ = _run(root, argv, ["out"])
        if code == 0 and output == "out/hyp.txt":
            assert (root / output).is_file()


MLM_FLAGS = {
    "--mask-prob": _mostly(st.floats(0.05, 0.9), st.floats(-0.5, 1.5)), "--batch-size": st.integers(0, 3),
    "--vocab-size": st.integers(0, 120), "--max-len": _mostly(st.integers(4, 32), st.integers(-1, 3)),
    "--max-steps": st.integers(0, 2), "--valid-every": st.integers(0, 2),
}


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(text=st.one_of(st.binary(max_size=300), st.lists(st.text(ALPHABET, min_size=1, max_size=40), max_size=40)
                      .map(lambda lines: ("\n".join(lines) + "\n").encode())),
       flags=_some_flags(MLM_FLAGS))
def test_mlm_train_on_any_text_with_any_flags(text, flags, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "t.txt").write_bytes(text)
        argv = ["mlm", "train", "--text", "t.txt", "--out", "run", "--preset", "tiny", "--layers", "1",
                "--max-steps", "1", "--batch-size", "4", "--vocab-size", "25", "--no-progress", "--device", "cpu",
                *flags]
        _run(root, argv, ["run"])


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, one_thread) -> Path:
    """A character language model trained for one step."""
    from transformer.corpora import tinyshakespeare_path

    root = tmp_path_factory.mktemp("lm")
    (root / "t.txt").write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:3000], encoding="utf-8")
    assert main(["lm", "train", "--text", str(root / "t.txt"), "--out", str(root / "run"), "--preset", "tiny",
                 "--layers", "1", "--max-len", "16", "--block-size", "8", "--batch-size", "2", "--eval-batches", "1",
                 "--max-steps", "1", "--no-progress"]) == 0
    return root / "run"


SAMPLE_FLAGS = {
    "--tokens": _mostly(st.integers(0, 20), st.integers(-2, -1)),
    "--temperature": _mostly(st.one_of(st.just(0.0), st.floats(1e-300, 3)), st.floats(-1, 0)),
    "--top-k": st.integers(0, 50), "--top-p": _mostly(st.floats(1e-300, 1), st.floats(-1, 0) | st.floats(1, 2)),
    "--seed": st.integers(-1, 9),
}


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(prompt=st.text(max_size=24), escapes=st.booleans(), flags=_some_flags(SAMPLE_FLAGS))
def test_lm_sample_any_prompt_with_any_flags(prompt, escapes, flags, lm_dir, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["lm", "sample", "--model", str(lm_dir), f"--prompt={prompt}", "--device", "cpu",
                *(["--escapes"] if escapes else []), *flags]
        _run(Path(tmp), argv, [])


@settings(max_examples=30 * SCALE, **SETTINGS)
@given(command=st.sampled_from(["average", "plot", "attention"]),
       out=st.sampled_from(["out", "out/new/deeper", "file.txt", "file.txt/x", "out/c.png", None]),
       sentence=st.text(ALPHABET, max_size=20), target=st.text(ALPHABET, max_size=8),
       model=st.sampled_from(["translation", "lm"]))
def test_tools_write_only_where_they_are_told(command, out, sentence, target, model, model_dir, lm_dir, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "out").mkdir()
        (root / "file.txt").write_text("x", encoding="utf-8")
        given_out = ["--out", out] if out else []
        path = str(model_dir if model == "translation" else lm_dir)
        outs = [out] if out else []
        if command == "average":
            argv = ["average", path, str(model_dir), *given_out]
        elif command == "plot":
            argv = ["plot", str(lm_dir), *given_out]
        else:  # a short --target: an untrained model's own translation is long, and slow to draw
            argv = ["attention", "--model", path, "--sentence", sentence, "--target", target, *given_out]
        before = _listing(lm_dir.parent) | _listing(model_dir.parent)
        code, _ = _run(root, argv, outs)
        if out is None and code == 0:  # the default places: RUN/curves.png, MODEL/attention
            added = (_listing(lm_dir.parent) | _listing(model_dir.parent)) - before
            assert all(p.startswith(("run/curves.png", "model/attention")) for p in added), added
