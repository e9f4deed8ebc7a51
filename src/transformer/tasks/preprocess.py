"""`transformer preprocess`: parallel text into a data folder of token-id shards, once (layout: `text.shards`).

1. The files of every split are scanned for line starts (numpy, no decoding), so that line counts are
   checked before anything is written, and each split is cut into work items of `CHUNK` lines.
2. The tokenizer: a sentencepiece model trained once, with byte fallback, on a bounded shuffled sample
   of the training pairs (`sample_size` sentences; sentencepiece samples with a reservoir, so memory does
   not grow with the corpus), or the model given (`tokenizer_model`). Optionally one per side.
3. `workers` processes read, decode and encode the work items; the main process takes their results in
   input order (a bounded window of items in flight) and appends them to the shards, so the folder is
   the same for any number of workers.
4. Filters, each pair counted under the first that drops it: a side empty; a side over `max_len` - 2
   tokens (what a model with that --max-len takes: BOS and EOS need the other 2 positions); a length
   ratio longer/shorter over `max_ratio`; with `dedup`, a pair equal to an earlier kept pair of the split
   (compared by a 64-bit hash of its text).
5. The manifest, last. The folder is locked while it is written; a preprocess that starts (or starts
   again after a kill) first deletes the manifest, then what an earlier preprocess wrote there, so the
   folder is never complete and stale at once, and a rerun writes it again identically.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from transformer.errors import UserError
from transformer.text import shards
from transformer.text.data import decode, open_binary
from transformer.text.tokenizer import Tokenizer
from transformer.training.lock import LOCK, locked_run

CHUNK = 10_000  # lines per work item
EMPTY, TOO_LONG, RATIO = 1, 2, 3  # a line's status in a work item (0: kept)


@dataclass(frozen=True)
class PreprocessConfig:
    """What to preprocess into `out`, and how."""

    out: Path
    train: tuple[Path, Path]  # source and target files, line-aligned
    valid: tuple[Path, Path] | None = None
    test: tuple[Path, Path] | None = None
    tokenizer_model: Path | None = None  # reuse this sentencepiece model instead of training one
    vocab_size: int = 8000
    tokenizer_type: str = "bpe"
    byte_fallback: bool = True
    separate_vocab: bool = False  # a vocabulary per side (training needs a joint one)
    sample_size: int = 2_000_000  # sentences the tokenizer is trained on, at most
    workers: int = 1
    max_len: int | None = None  # drop pairs with a side over max_len - 2 tokens
    max_ratio: float | None = None  # drop pairs whose longer side has over max_ratio x the tokens of the shorter
    dedup: bool = False
    shard_size: int = 1_000_000  # input lines per shard (rounded up to whole work items)

    def __post_init__(self) -> None:
        if self.tokenizer_model is not None and self.separate_vocab:
            raise UserError("`tokenizer_model` gives one joint vocabulary; leave out `separate_vocab`")
        if self.max_len is not None and self.max_len < 3:
            raise UserError(f"`max_len` {self.max_len}: must be >= 3 (BOS, EOS and a token)")

    def options(self) -> dict:
        return {"max_len": self.max_len, "max_ratio": self.max_ratio, "dedup": self.dedup,
                "separate_vocab": self.separate_vocab, "shard_size": self.shard_size}


# --- reading the files -----------------------------------------------------------------------


def line_starts(path: Path, every: int) -> tuple[int, list[int]]:
    """(lines in `path`, byte offsets of its lines 0, every, 2·every, ... followed by the file's size).

    Lines are split on "\\n" only, as `text.data.read_lines` splits them.
    """
    starts, lines, size, last = [0], 0, 0, b"\n"
    with open_binary(path) as f:
        while block := f.read(1 << 24):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            following = lines + np.arange(1, len(newlines) + 1)  # the line that starts after each newline
            starts.extend((size + newlines[following % every == 0] + 1).tolist())
            lines, size, last = lines + len(newlines), size + len(block), block[-1:]
    lines += last != b"\n"  # a last line without a newline
    if starts[-1] != size:
        starts.append(size)
    return lines, starts


def _lines(data: bytes, path: Path, first_line: int, at_start: bool) -> list[str]:
    """The stripped lines of `data`, a run of whole lines of `path` starting at line `first_line`."""
    text = decode(data, path, first_line)
    if at_start:
        text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the run ends with a newline
    return [line.strip() for line in lines]


def _read(path: Path, first_line: int, span: tuple[int, int]) -> list[str]:
    with open_binary(path) as f:
        f.seek(span[0])
        data = f.read(span[1] - span[0])
    return _lines(data, path, first_line, span[0] == 0)


def _training_sentences(src: Path, tgt: Path, sides: tuple[bool, bool]) -> Iterator[str]:
    """The stripped sentences of the pairs with text on both sides: source then target (`sides`: which)."""
    with open_binary(src) as a, open_binary(tgt) as b:
        for n, (s, t) in enumerate(zip(a, b), start=1):
            s, t = _lines(s, src, n, n == 1), _lines(t, tgt, n, n == 1)
            s, t = (s[0] if s else ""), (t[0] if t else "")
            if s and t:
                yield from [x for x, wanted in zip((s, t), sides) if wanted]


# --- the work of the encoding processes ------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    src: Path
    tgt: Path
    first_line: int  # 1-based
    src_span: tuple[int, int]  # byte range
    tgt_span: tuple[int, int]
    with_text: bool


_WORKER: dict = {}  # this process's tokenizers and limits, set by `_start_worker`


def _start_worker(src_model: bytes, tgt_model: bytes, dtype: str, max_len: int | None,
                  max_ratio: float | None, dedup: bool) -> None:
    src = Tokenizer.from_bytes(src_model)
    tgt = src if tgt_model == src_model else Tokenizer.from_bytes(tgt_model)
    _WORKER.update(src=src, tgt=tgt, dtype=np.dtype(dtype), max_len=max_len, max_ratio=max_ratio, dedup=dedup)


def _pair_hash(src: str, tgt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{src}\n{tgt}".encode(), digest_size=8).digest(), "little")


def _encode(job: _Job) -> tuple[shards.Pairs, np.ndarray, list[int]]:
    """The kept pairs of a work item, each line's status (0 kept, EMPTY, TOO_LONG, RATIO) and, with dedup,
    the hashes of the kept pairs."""
    w = _WORKER
    src, tgt = _read(job.src, job.first_line, job.src_span), _read(job.tgt, job.first_line, job.tgt_span)
    status = np.zeros(len(src), np.uint8)
    full = np.array([i for i, (s, t) in enumerate(zip(src, tgt)) if s and t], dtype=np.int64)
    status[np.setdiff1d(np.arange(len(src)), full)] = EMPTY
    src_ids = w["src"].encode_arrays([src[i] for i in full])
    tgt_ids = w["tgt"].encode_arrays([tgt[i] for i in full])
    src_lens = np.fromiter(map(len, src_ids), np.int64, len(full))
    tgt_lens = np.fromiter(map(len, tgt_ids), np.int64, len(full))
    longer, shorter = np.maximum(src_lens, tgt_lens), np.minimum(src_lens, tgt_lens)
    drop = np.zeros(len(full), np.uint8)
    if w["max_ratio"] is not None:
        drop[longer > w["max_ratio"] * shorter] = RATIO
    if w["max_len"] is not None:
        drop[longer > w["max_len"] - 2] = TOO_LONG  # counted before the ratio
    status[full] = drop
    kept = drop == 0
    keep = full[kept]
    texts = ([src[i] for i in keep], [tgt[i] for i in keep])
    pairs = shards.Pairs(
        lines=keep + job.first_line,
        src=_joined(src_ids, kept, w["dtype"]), src_lens=src_lens[kept],
        tgt=_joined(tgt_ids, kept, w["dtype"]), tgt_lens=tgt_lens[kept],
        src_text=texts[0] if job.with_text else [], tgt_text=texts[1] if job.with_text else [],
    )
    hashes = [_pair_hash(s, t) for s, t in zip(*texts)] if w["dedup"] else []
    return pairs, status, hashes


def _joined(ids: list[np.ndarray], kept: np.ndarray, dtype: np.dtype) -> np.ndarray:
    chosen = [a for a, k in zip(ids, kept) if k]
    return np.concatenate(chosen).astype(dtype) if chosen else np.zeros(0, dtype)


@contextlib.contextmanager
def _encoders(workers: int, init: tuple) -> Iterator[Callable[[list[_Job]], Iterator]]:
    """run(jobs): the results of `_encode` for `jobs`, in order; in this process, or in a pool of `workers`
    with at most 2·workers items in flight (memory stays bounded when writing is slower than encoding)."""
    if workers == 1:
        _start_worker(*init)
        yield lambda jobs: map(_encode, jobs)
        return
    # fork where there is one: a spawned worker would import torch (with the package) before its first item
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _start_worker, init) as pool:
        def run(jobs: list[_Job]) -> Iterator:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.apply_async(_encode, (job,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield run


# --- the command -----------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    """`UserError` unless `out` is new, empty, or a data folder (nothing but files a preprocess writes)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {out}: exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK and not shards.is_ours(p.name))
        if foreign:
            raise UserError(f"`out` {out}: holds {foreign[0]!r}, which preprocess did not write; choose an empty "
                            "or new folder")


def _clear(out: Path) -> None:
    """Delete the manifest first (the folder is unfinished from then on), then what a preprocess wrote."""
    try:
        (out / shards.MANIFEST).unlink(missing_ok=True)
        for path in sorted(out.iterdir()):
            if shards.is_ours(path.name):
                path.unlink()
    except OSError as e:
        raise UserError(f"{out}: cannot delete an earlier preprocess's files: {e.strerror or e}") from None


def _tokenizers(cfg: PreprocessConfig, say: Callable[[str], None]) -> dict[str, bytes]:
    """{file name: model} of the vocabulary (one file, or src. and tgt. files with `separate_vocab`)."""
    if cfg.tokenizer_model is not None:
        return {"tokenizer.model": Tokenizer.load(cfg.tokenizer_model).to_bytes()}
    plans = {"tokenizer.model": (True, True)} if not cfg.separate_vocab else {
        "src.tokenizer.model": (True, False), "tgt.tokenizer.model": (False, True)}
    models = {}
    for name, sides in plans.items():
        start = time.perf_counter()
        tokenizer = Tokenizer.train(_training_sentences(*cfg.train, sides), cfg.vocab_size,
                                    model_type=cfg.tokenizer_type, byte_fallback=cfg.byte_fallback,
                                    sample_size=cfg.sample_size)
        say(f"{name}: a {tokenizer.vocab_size}-token {cfg.tokenizer_type} vocabulary from at most "
            f"{cfg.sample_size:,} sentences ({time.perf_counter() - start:.1f} s)")
        models[name] = tokenizer.to_bytes()
    return models


def _jobs(files: tuple[Path, Path], with_text: bool, chunk: int) -> tuple[int, list[_Job]]:
    (n_src, src_starts), (n_tgt, tgt_starts) = line_starts(files[0], chunk), line_starts(files[1], chunk)
    if n_src != n_tgt:
        raise UserError(f"{files[0]} has {n_src} lines but {files[1]} has {n_tgt}")
    return n_src, [_Job(files[0], files[1], k * chunk + 1, (src_starts[k], src_starts[k + 1]),
                        (tgt_starts[k], tgt_starts[k + 1]), with_text) for k in range(len(src_starts) - 1)]


def _write_split(out: Path, name: str, files: tuple[Path, Path], jobs: list[_Job], per_shard: int,
                 dtype: np.dtype, run: Callable, dedup: bool) -> tuple[dict, dict]:
    """(the split's manifest entry, its files) after encoding `jobs` and writing shards of `per_shard` jobs."""
    writer = shards.SplitWriter(out, name, dtype, with_text=name != "train")
    counts = dict.fromkeys(shards.REASONS, 0)
    seen: set[int] = set()
    for k, (pairs, status, hashes) in enumerate(run(jobs)):
        if k % per_shard == 0:
            if k:
                writer.end_shard()
            writer.begin_shard()
        for code, reason in ((EMPTY, "empty"), (TOO_LONG, "too_long"), (RATIO, "ratio")):
            counts[reason] += int((status == code).sum())
        if dedup:
            fresh = np.zeros(len(hashes), bool)
            for i, h in enumerate(hashes):
                fresh[i] = h not in seen
                seen.add(h)
            counts["duplicate"] += int((~fresh).sum())
            pairs = pairs.select(fresh)
        writer.add(pairs)
    if jobs:
        writer.end_shard()
    entry = writer.finish()
    if entry["pairs"] == 0:
        raise UserError(f"{files[0]}: no pair left after filtering ({shards.describe_dropped(counts)})")
    return entry | {"sources": [str(f) for f in files], "dropped": counts}, writer.files


def preprocess(cfg: PreprocessConfig, say: Callable[[str], None] = print) -> Path:
    """Write the data folder `cfg.out` (see the module docstring); returns it."""
    out = Path(cfg.out)
    _check_out(out)
    with locked_run(out, say=lambda _: None):  # its words on ^C are about training runs
        try:
            _preprocess(cfg, out, say)
        except KeyboardInterrupt:
            say(f"interrupted; {out} is unfinished (it has no manifest): run the same command again")
            raise
    return out


def _preprocess(cfg: PreprocessConfig, out: Path, say: Callable[[str], None]) -> None:
    chunk = min(CHUNK, cfg.shard_size)
    per_shard = -(-cfg.shard_size // chunk)
    given = {name: files for name, files in (("train", cfg.train), ("valid", cfg.valid), ("test", cfg.test))
             if files is not None}
    plans = {name: _jobs(files, name != "train", chunk) for name, files in given.items()}  # checks before writing
    _clear(out)
    models = _tokenizers(cfg, say)
    files = {}
    for name, model in models.items():
        files[name] = shards.atomic_write(out / name, [model])
    src_name, tgt_name = (list(models) * 2)[:2] if len(models) == 1 else list(models)
    vocab_size = max(Tokenizer.from_bytes(m).vocab_size for m in models.values())
    dtype = shards.id_dtype(vocab_size)
    splits = {}
    init = (models[src_name], models[tgt_name], dtype.str, cfg.max_len, cfg.max_ratio, cfg.dedup)
    with _encoders(cfg.workers, init) as run:
        for name, (lines, jobs) in plans.items():
            start = time.perf_counter()
            entry, written = _write_split(out, name, given[name], jobs, per_shard, dtype, run, cfg.dedup)
            seconds = time.perf_counter() - start
            splits[name] = entry | {"lines": lines}
            files |= written
            say(f"{name}: {lines:,} pairs read, {entry['pairs']:,} kept in {len(entry['shards'])} shard(s) "
                f"({seconds:.1f} s, {lines / max(seconds, 1e-9):,.0f} pairs/s); dropped: {shards.describe_dropped(entry['dropped'])}")
    shards.write_manifest(out, {
        "format": shards.FORMAT, "version": shards.VERSION, "vocab_size": vocab_size, "dtype": dtype.str,
        "tokenizer": {"src": src_name, "tgt": tgt_name}, "options": cfg.options(), "splits": splits,
        "files": files,
    })
    say(f"{out}: done; train with transformer train --data-bin {out}")
