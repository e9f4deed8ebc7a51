"""The documentation holds: the site builds with `mkdocs build --strict`, and the examples of README.md and of
docs/*.md run, so that they cannot drift from the code.

How the examples run (the rules for whoever writes README.md or a page of docs/):

- A page is README.md or a docs/*.md file. Each page runs in a fresh temporary folder, its examples in the
  order they appear, in one bash shell: a command sees the variables and files the earlier ones of its page
  made, so the `--out` folders of one page must not collide. (BENCHMARKS.md, which the site includes, holds
  the benchmark scripts, minutes to hours each: its blocks are not run.)
- A ```python block runs alone, as `python FILE` in the page's folder, so it imports what it uses. A Python
  example that must not run is fenced ```py instead (shown the same).
- A ```bash block (or sh, shell) is a list of commands: each line, with its `\\` continuations, is one
  command; comment lines are not. A ```console block is a transcript: its `$ ` lines are commands, the
  other lines output (not compared). Every command is run, unless a rule of SKIPPED matches one of the
  programs it starts; the rule says why.
- Every program a command starts must be known, so that a new command on a page fails this test until it is
  classified: `transformer VERB` with VERB in SHRINK (or with `--help`), a program of PLAIN, or a rule of
  SKIPPED. A `$(...)` other than the corpus paths below is not allowed (what it starts would go unchecked).
- A command runs as written, with these changes (so that the pages run in about two minutes):
  * `$(python -c "from transformer.corpora import NAME; print(NAME())")` becomes the path of a sample of that
    corpus made once per session: Multi30k's first 1,000 training pairs and 20 of valid and test2016, the
    first 100,000 characters of Tiny Shakespeare;
  * each `transformer VERB` gets SHRINK[VERB] appended (argparse keeps the last value of a flag): a training
    command a few steps, the tiny preset and a small vocabulary; a search at most 8 tokens;
  * the environment has one torch thread (tiny models) and caches (matplotlib, Hugging Face) in the session's
    temporary folder.
- A page that uses a model `runs/NAME` of PROVIDED (in a command or a Python block) but does not train it
  itself (no `--out runs/NAME`) gets a copy of a tiny model of that kind, trained once per session with the
  command line (`transformer.cli.main`). This is for pages that use the models of other pages (Export, From
  Python).
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TASKS = ("translation", "lm", "mlm", "classify", "vit", "caption")
STEPS = ["--max-steps", "2", "--valid-every", "2", "--no-progress"]
SEARCH = ["--max-len-a", "0", "--max-len-b", "8"]  # an untrained model never stops by itself: keep outputs short

# Flags appended to each `transformer VERB` (translation's verbs without the task's name). A verb missing here
# is unclassified. `train --resume` gets `--max-steps 4` on top, so that the resumed run has steps to make.
SHRINK: dict[str, list[str]] = {
    "train": [*STEPS, "--valid-bleu-lines", "4", "--preset", "tiny", "--vocab-size", "500"],
    "preprocess": ["--vocab-size", "500"],  # none with --tokenizer-model
    "translate": [*SEARCH, "--no-progress"],
    "evaluate": [*SEARCH, "--no-progress"],
    "attention": [],
    "lm train": [*STEPS, "--eval-batches", "2"],
    "lm sample": ["--tokens", "20"],
    "mlm train": [*STEPS, "--preset", "tiny", "--vocab-size", "500"],
    "mlm fill": [],
    "classify train": STEPS,
    "classify predict": [],
    "classify evaluate": [],
    "vit train": STEPS,
    "vit predict": [],
    "vit attention": [],
    "caption train": STEPS,
    "caption generate": ["--canvases", "8"],
    "caption attention": [],
    "params": [],
    "average": [],
    "plot": [],
    "export": [],
    "import": [],
}
# Programs that run as written (`python` only as `python -c`).
PLAIN = {"echo", "printf", "cat", "head", "ls", "mkdir", "cp", "python -c"}
# Commands not run: (what the command starts, why). A command is skipped when one of its programs matches.
SKIPPED: list[tuple[str, str]] = [
    ("pip install", "installs packages: CI installs the same extras itself (.ci/run: pip install -e \".[test]\")"),
    ("transformer quickstart", ("trains for 10 minutes, then beam-searches all 1,000 sentences of test2016 with a "
                                "7.6M-parameter model; tests/test_recipe.py checks that it runs its recipe")),
    ("transformer serve", ("serves until stopped; tests/test_serve_process.py runs real server processes on "
                           "127.0.0.1, tests/test_serve.py the endpoints")),
    ("curl", "asks a running `transformer serve` (see transformer serve)"),
    ("torchrun", ("starts several processes (GPUs, or machines): tests/test_distributed.py trains with 2 CPU "
                  "processes in torchrun's environment")),
    ("scripts/multi30k.sh", "the Multi30k results: one hour of training per direction"),
]
CORPUS = re.compile(r'\$\(python -c "from transformer\.corpora import (\w+); print\(\1\(\)\)"\)')
RUN_NAME = r"runs/[\w.-]+"
PYTHON_FENCES = {"python"}
SHELL_FENCES = {"bash", "sh", "shell"}


@dataclass
class Example:
    """One thing to run: a shell command or a Python block, where it is on its page."""

    page: str
    line: int
    kind: str  # "shell" or "python"
    text: str  # as written (a command: its lines joined)
    run: str = ""  # what runs: the command with its changes ("" for a Python block)
    skip: str | None = None
    unclassified: str | None = None
    uses: set[str] = field(default_factory=set)  # runs/NAME it reads or writes
    makes: set[str] = field(default_factory=set)  # runs/NAME it writes with --out


def blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """The fenced code blocks of a Markdown file: (line of the first body line, info string, body lines)."""
    found, fence, info, body, start = [], None, "", [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, info, body, start = m.group(1), m.group(2).lower(), [], number + 1
        elif stripped.startswith(fence) and stripped.strip("`~") == "":
            found.append((start, info, body))
            fence = None
        else:
            body.append(line)
    return found


def commands(start: int, body: list[str], console: bool) -> list[tuple[int, str]]:
    """The commands of a shell block (console: its `$ ` lines), each with its continuation lines joined."""
    out, i = [], 0
    while i < len(body):
        line, number = body[i], start + i
        i += 1
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].rstrip().endswith("\\") and i < len(body):
            parts[-1] = parts[-1].rstrip()[:-1]
            parts.append(body[i])
            i += 1
        out.append((number, " ".join(p.strip() for p in parts)))
    return out


def scan(text: str) -> tuple[list[tuple[int, int, int | None]], int]:
    """Split a command line at its unquoted control operators: [(start, end, where its redirections start)] of
    each simple command, and where an unquoted comment starts (len(text) if none)."""
    segments, start, redirect, i, quote = [], 0, None, 0, None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            break
        elif c == "&" and (text[i - 1:i] in ("<", ">") or text[i + 1:i + 2] == ">"):
            pass  # 2>&1, &>: a redirection
        elif c in "|&;":
            segments.append((start, i, redirect))
            i += 2 if text[i:i + 2] in ("||", "&&") else 1
            start, redirect = i, None
            continue
        elif c in "<>" and redirect is None:
            redirect = i - 1 if i > 0 and text[i - 1].isdigit() and (i == 1 or text[i - 2].isspace()) else i
        i += 1
    segments.append((start, i, redirect))
    return segments, i


def classify(text: str) -> tuple[str, str | None, str | None]:
    """What a command runs as (with SHRINK's flags), and why it is skipped or unclassified (else None)."""
    if "$(" in text or "`" in text:
        return text, None, "a command substitution other than a corpus path"
    segments, end = scan(text)
    run, done, skip = [], 0, None
    for start, stop, redirect in segments:
        words_end = redirect if redirect is not None else stop
        try:
            words = shlex.split(text[start:words_end])
        except ValueError as e:
            return text, None, f"cannot split into words: {e}"
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]  # VAR=value in front of a program, or an assignment alone
        if not words:
            continue
        joined = " ".join(words)
        for program, reason in SKIPPED:
            if joined == program or joined.startswith(program if program.endswith("/") else program + " ") or (
                    program.startswith("transformer ") and _verb(words) == program.split(" ", 1)[1]):
                skip = skip or f"{program}: {reason}"
        if skip:
            continue
        if words[0] == "transformer":
            verb = _verb(words)
            if "--help" in words or "-h" in words:
                continue
            if verb not in SHRINK:
                return text, None, f"`transformer {verb}` is in neither SHRINK nor SKIPPED"
            extra = list(SHRINK[verb])
            if verb == "train" and "--resume" in words:
                extra += ["--max-steps", "4"]
            if verb == "preprocess" and "--tokenizer-model" in words:
                extra = []
            if extra:
                at = words_end
                run.append(text[done:at].rstrip() + " " + shlex.join(extra) + (" " if at < len(text) else ""))
                done = at
        elif words[0] not in PLAIN and " ".join(words[:2]) not in PLAIN:
            return text, None, f"`{words[0]}` is in neither PLAIN nor SKIPPED"
    run.append(text[done:end])
    return "".join(run).rstrip(), skip, None


def _verb(words: list[str]) -> str:
    """`transformer [TASK] VERB ...` -> "VERB" for translation, "TASK VERB" for the others."""
    rest = words[1:3]
    if rest and rest[0] == "translation":
        return rest[1] if len(rest) > 1 else ""
    if rest and rest[0] in TASKS:
        return " ".join(rest[:2])
    return rest[0] if rest else ""


def examples(page: Path, samples: dict[str, str] | None = None) -> list[Example]:
    """The examples of a page, in order, each classified (corpus paths replaced by `samples` when given)."""
    name = page.relative_to(ROOT).as_posix()
    found = []
    for start, info, body in blocks(page):
        if info in PYTHON_FENCES:
            text = "\n".join(body) + "\n"
            found.append(Example(name, start, "python", text, uses=set(re.findall(RUN_NAME, text))))
        elif info in SHELL_FENCES or info == "console":
            for number, text in commands(start, body, console=info == "console"):
                replaced = CORPUS.sub(lambda m: shlex.quote((samples or {}).get(m.group(1), m.group(1))), text)
                run, skip, unclassified = classify(replaced)
                found.append(Example(name, number, "shell", text, run, skip, unclassified,
                                     uses=set(re.findall(RUN_NAME, run)),
                                     makes=set(re.findall(rf"--out\s+({RUN_NAME})(?=\s|$)", run))))
    return found


# ---- the site


def test_the_site_builds_with_strict(tmp_path):
    """`mkdocs build --strict`: every page of the nav exists, no link or anchor is broken, the API reference
    reads the docstrings, BENCHMARKS.md is included."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e \".[docs]\")")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    first_heading = next(line for line in (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
                         if line.startswith("## "))
    assert first_heading[3:].split(" (")[0] in benchmarks, "BENCHMARKS.md is not on the Benchmarks page"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    import transformer

    missing = [n for n in transformer.__all__ if f'id="transformer.{n}"' not in api]
    assert not missing, f"the API reference lacks {missing} of transformer.__all__"


def test_the_readme_links_point_at_files():
    """README.md is read on its own (GitHub, PyPI): its relative links must reach files of the repository."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert targets and not broken, f"README.md links to missing files: {broken}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_the_layout_page_names_every_module():
    """docs/layout.md draws the source tree: a new module or folder of the package must appear there."""
    import transformer

    package = Path(transformer.__file__).parent
    text = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    names = {p.name for p in package.rglob("*.py") if p.name != "__init__.py" and "__pycache__" not in p.parts}
    names |= {f"{d.name}/" for d in package.iterdir() if d.is_dir() and d.name != "__pycache__"}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}", text))
    assert not missing, f"docs/layout.md does not name {missing}"


# ---- the examples: classified (fast), then run


def test_every_command_is_run_or_skipped_with_a_reason():
    """A command nobody classified fails here, before anything runs; and every SKIPPED rule is still used."""
    everything = [e for page in PAGES for e in examples(page)]
    unclassified = [f"{e.page}:{e.line}: {e.text}\n  {e.unclassified}" for e in everything if e.unclassified]
    assert not unclassified, "unclassified commands (add them to SHRINK, PLAIN or SKIPPED):\n" + "\n".join(
        unclassified)
    unused = {program for program, _ in SKIPPED} - {e.skip.split(":")[0] for e in everything if e.skip}
    assert not unused, f"SKIPPED rules that no page uses (remove them): {sorted(unused)}"


def test_the_changes_to_a_command_are_the_ones_written_down():
    assert classify('echo "A man." | transformer translate --model runs/ende > out.txt  # comment') == (
        'echo "A man." | transformer translate --model runs/ende --max-len-a 0 --max-len-b 8 --no-progress > out.txt',
        None, None)
    run, skip, bad = classify("transformer train --data d --out runs/x --resume")
    assert run.endswith("--vocab-size 500 --max-steps 4") and skip is None and bad is None
    assert classify("pip install -e . && transformer quickstart")[1].startswith("pip install")
    assert classify("transformer translation serve --model runs/ende")[1].startswith("transformer serve")
    assert "neither" in classify("rm -rf runs")[2]
    assert "neither" in classify("transformer frobnicate --model m")[2]
    assert "substitution" in classify("X=$(transformer params --preset tiny)")[2]
    assert classify('printf "a # b\\n" > f.txt') == ('printf "a # b\\n" > f.txt', None, None)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, str]:
    """Small copies of the bundled corpora, by the name of the function that gives the full one's path."""
    from transformer.corpora import multi30k_dir, tinyshakespeare_path

    root = tmp_path_factory.mktemp("corpora")
    multi30k = root / "multi30k"
    multi30k.mkdir()
    for split, n in (("train", 1000), ("valid", 20), ("test2016", 20)):
        for lang in ("en", "de"):
            lines = (multi30k_dir() / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (multi30k / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shakespeare = root / "tinyshakespeare.txt"
    shakespeare.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return {"multi30k_dir": str(multi30k), "tinyshakespeare_path": str(shakespeare)}


# The models a page may use without training them: runs/NAME -> the command line that trains a tiny one into
# `out` (`root`: the folder of the provided models, `data`: the corpus samples).
PROVIDED = {
    "runs/ende": lambda out, root, data: [
        "train", "--data", data["multi30k_dir"], "--out", out, "--preset", "tiny", "--vocab-size", "500",
        "--max-steps", "20", "--valid-every", "20", "--valid-bleu-lines", "4", "--no-progress"],
    "runs/shakespeare": lambda out, root, data: [
        "lm", "train", "--text", data["tinyshakespeare_path"], "--out", out, "--preset", "tiny",
        "--max-steps", "20", "--valid-every", "20", "--eval-batches", "2", "--no-progress"],
    "runs/lm": lambda out, root, data: PROVIDED["runs/shakespeare"](out, root, data),
    "runs/mlm": lambda out, root, data: [
        "mlm", "train", "--text", f"{data['multi30k_dir']}/train.en", "--valid", f"{data['multi30k_dir']}/valid.en",
        "--out", out, "--preset", "tiny", "--vocab-size", "500", "--max-steps", "20", "--valid-every", "20",
        "--no-progress"],
    "runs/vit": lambda out, root, data: [
        "vit", "train", "--bundled", "digits", "--out", out, "--max-steps", "20", "--valid-every", "20",
        "--no-progress"],
    "runs/caption-lm": lambda out, root, data: [
        "lm", "train", "--text", _captions(root), "--out", out, "--preset", "tiny", "--d-model", "64",
        "--n-heads", "4", "--layers", "2", "--dropout", "0", "--max-steps", "20", "--valid-every", "20",
        "--eval-batches", "2", "--no-progress"],
    "runs/qformer": lambda out, root, data: [
        "caption", "train", "--lm", _provided("runs/caption-lm", root, data), "--vit",
        _provided("runs/vit", root, data), "--bridge", "qformer", "--out", out, "--max-steps", "20",
        "--valid-every", "20", "--no-progress"],
}


def _captions(root: Path) -> str:
    """A caption text for the caption LM: 500 captions of random digits, each line twice (as on the Vision page)."""
    from transformer.images.captions import caption

    rng = random.Random(0)
    lines = [caption([rng.randrange(10) for _ in range(rng.randint(2, 4))]) + "\n" for _ in range(500)]
    path = root / "captions.txt"
    path.write_text("".join(line + line for line in lines), encoding="utf-8")
    return str(path)


def _provided(name: str, root: Path, data: dict[str, str]) -> str:
    """The tiny model PROVIDED[name] in `root`, trained with the command line the first time it is asked for."""
    out = root / name
    if not (out / "config.json").exists():
        import torch

        from transformer.cli import main

        argv = PROVIDED[name](str(out), root, data)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(argv) == 0, f"training the provided model {name} failed: transformer {shlex.join(argv)}"
        finally:
            torch.set_num_threads(threads)
    return str(out)


def _script(page_examples: list[Example], scripts: Path) -> str:
    """The bash script of a page: each example announced, run, and its exit status checked."""
    lines = ["set -o pipefail"]
    for i, example in enumerate(page_examples):
        if example.skip:
            continue
        if example.kind == "python":
            file = scripts / f"example_{i:03d}.py"
            file.write_text(example.text, encoding="utf-8")
            run = f"{shlex.quote(sys.executable)} {shlex.quote(str(file))}"
        else:
            run = example.run
        lines += [f"printf '\\n@@@ example {i} %s\\n' \"$EPOCHREALTIME\"", run,
                  f"rc=$?; if [ $rc -ne 0 ]; then printf '\\n@@@ failed {i} %d\\n' $rc; exit 1; fi"]
    lines.append("printf '\\n@@@ end %s\\n' \"$EPOCHREALTIME\"")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory, samples):
    """Every page's examples, run two pages at a time (the machines are small, and a command is mostly the
    start-up of Python and torch): page name -> (its examples, the future of (exit status, output)). Pages that
    need PROVIDED models start once those are trained."""
    root = tmp_path_factory.mktemp("docs-examples")
    cache = root / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "MPLCONFIGDIR": str(cache / "matplotlib"), "HF_HOME": str(cache / "huggingface"),
           "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"}
    pool = ThreadPoolExecutor(max_workers=2)
    runs, later = {}, []
    # the pages with the most commands first, so that the two workers finish together
    for page in sorted(PAGES, key=lambda page: -sum(not e.skip for e in examples(page))):
        page_examples = examples(page, samples)
        runnable = [e for e in page_examples if not e.skip]
        if not runnable or any(e.unclassified for e in page_examples):
            continue  # nothing to run, or test_every_command_is_run_or_skipped_with_a_reason fails
        uses = set().union(*(e.uses for e in runnable)) - set().union(*(e.makes for e in runnable))
        needs = sorted(uses & PROVIDED.keys())
        if needs:
            later.append((page, page_examples, needs))
        else:
            runs[_name(page)] = (page_examples, pool.submit(_run_page, page_examples, root / page.stem, env))
    for page, page_examples, needs in later:
        for name in needs:
            shutil.copytree(_provided(name, root / "provided", samples), root / page.stem / name)
        runs[_name(page)] = (page_examples, pool.submit(_run_page, page_examples, root / page.stem, env))
    yield runs
    pool.shutdown(wait=True)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _run_page(page_examples: list[Example], folder: Path, env: dict[str, str]) -> tuple[int, str]:
    folder.mkdir(exist_ok=True)
    scripts = folder.parent / f"{folder.name}-scripts"
    scripts.mkdir()
    script = scripts / "page.sh"
    script.write_text(_script(page_examples, scripts), encoding="utf-8")
    done = subprocess.run(["bash", str(script)], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=280, check=False)
    return done.returncode, done.stdout


@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_the_examples_of_a_page_run(page, page_runs):
    if _name(page) not in page_runs:
        if any(e.unclassified for e in examples(page)):
            pytest.fail("unclassified commands: see test_every_command_is_run_or_skipped_with_a_reason")
        pytest.skip("nothing to run on this page")
    page_examples, future = page_runs[_name(page)]
    rc, output = future.result()
    if rc == 0:
        ran = set(map(int, re.findall(r"^@@@ example (\d+) ", output, flags=re.MULTILINE)))
        assert ran == {i for i, e in enumerate(page_examples) if not e.skip}, "not every example ran"
        return
    failed = re.search(r"^@@@ failed (\d+) (\d+)$", output, flags=re.MULTILINE)
    if not failed:
        pytest.fail(f"the page's script stopped (exit {rc}) outside an example:\n{output[-3000:]}")
    i, status = int(failed.group(1)), failed.group(2)
    example = page_examples[i]
    part = output[output.rindex(f"@@@ example {i} "):failed.start()]
    shown = example.text if example.kind == "python" else f"{example.text}\nran as: {example.run}"
    pytest.fail(f"{example.page}:{example.line}: a {example.kind} example exited {status}:\n{shown}\n"
                f"--- its output (end) ---\n{part[-4000:]}")
