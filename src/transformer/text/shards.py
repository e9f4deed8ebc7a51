"""A preprocessed data folder: the token ids of parallel text in binary shards, read through memory maps.

`transformer preprocess` writes it once; `train --data-bin` reads it without tokenizing, with
memory that does not grow with the corpus (the idea of fairseq-preprocess and its mmap
datasets). The layout of a folder DIR::

    manifest.json              written last, atomically: a folder without it is unfinished, never read
    tokenizer.model            the sentencepiece model that made the ids (with separate vocabularies:
                               src.tokenizer.model and tgt.tokenizer.model)
    SPLIT.NNN.src.bin          the ids of shard NNN's kept source sentences, end to end, raw
    SPLIT.NNN.tgt.bin          little-endian uint16 (int32 when the vocabulary has over 65,536 ids)
    SPLIT.index.npy            (5, N) int64, a column per kept pair (`INDEX_ROWS`): its 1-based line
                               in the input files, source start, source length, target start, target
                               length; starts count tokens from the start of the split's first shard
    SPLIT.src.txt, .tgt.txt    valid and test only: the kept lines as text (BLEU needs references)

SPLIT is train, valid or test; a shard holds the pairs of a run of input lines. The manifest has
the vocabulary size, the dtype, the tokenizer files, the options, per split the input files, the
pairs read, kept and dropped (a count per reason) and the shards, and the size and sha256 of
every file. `DataFolder.open` checks the sizes and the checksums of every file (hashing reads the
files once: about a second for a WMT14-sized folder, measured in BENCHMARKS.md) and refuses a
folder that does not match with one line naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from transformer.errors import UserError
from transformer.files import atomic_write_blocks, cannot, fsync_dir, is_tmp_file, tmp_target

MANIFEST = "manifest.json"
FORMAT = "transformer-data-bin"
VERSION = 1
SPLITS = ("train", "valid", "test")
INDEX_ROWS = ("line", "src_start", "src_len", "tgt_start", "tgt_len")
LINE, SRC_START, SRC_LEN, TGT_START, TGT_LEN = range(len(INDEX_ROWS))
REASONS = ("empty", "too_long", "ratio", "duplicate")  # why preprocess drops a pair, in the order it asks
_TMP = ".tmp"


def describe_dropped(counts: dict[str, int]) -> str:
    """"empty 3, too long 1, ratio 0, duplicate 2" of {reason: pairs dropped}."""
    return ", ".join(f"{reason.replace('_', ' ')} {counts.get(reason, 0)}" for reason in REASONS)


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of the vocabulary fits in it, else int32 (little-endian, as stored)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def atomic_write(path: Path, blocks: Iterable[bytes]) -> dict:
    """`files.atomic_write_blocks`: its {"bytes", "sha256"} for the manifest."""
    size, digest = atomic_write_blocks(path, blocks)
    return {"bytes": size, "sha256": digest}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def is_ours(name: str) -> bool:
    """Whether `name` is a file that a preprocess writes (or its temporary), and may delete when it starts over."""
    name = tmp_target(name) if is_tmp_file(name) else name.removesuffix(_TMP)  # an index/text file's, a shard's
    return name in (MANIFEST, "tokenizer.model", "src.tokenizer.model", "tgt.tokenizer.model") or (
        name.split(".", 1)[0] in SPLITS and name.endswith((".bin", ".index.npy", ".src.txt", ".tgt.txt")))


@dataclass
class Pairs:
    """Kept pairs of a run of input lines: their line numbers (N,), the ids of every source sentence end to end
    with their lengths (N,), the same for the targets, and for valid and test their text."""

    lines: np.ndarray
    src: np.ndarray
    src_lens: np.ndarray
    tgt: np.ndarray
    tgt_lens: np.ndarray
    src_text: list[str] = field(default_factory=list)
    tgt_text: list[str] = field(default_factory=list)

    def select(self, keep: np.ndarray) -> "Pairs":
        """The pairs where the boolean mask `keep` (N,) is true."""
        texts = [[t for t, k in zip(text, keep) if k] for text in (self.src_text, self.tgt_text)]
        return Pairs(self.lines[keep], self.src[np.repeat(keep, self.src_lens)], self.src_lens[keep],
                     self.tgt[np.repeat(keep, self.tgt_lens)], self.tgt_lens[keep], *texts)


class SplitWriter:
    """Writes one split: shards of token ids (each under a temporary name until complete), then its index.

    `files` collects {name: {"bytes", "sha256"}} of what it wrote, for the manifest.
    """

    def __init__(self, root: Path, split: str, dtype: np.dtype, with_text: bool) -> None:
        self.root, self.split, self.dtype, self.with_text = root, split, dtype, with_text
        self.shards: list[dict] = []
        self.files: dict[str, dict] = {}
        self.parts: list[np.ndarray] = []  # (5, n) index columns of each added chunk
        self.text: tuple[list[str], list[str]] = ([], [])
        self.tokens = [0, 0]  # source and target tokens written so far
        self._open: list = []  # (file, sha256, temporary path) of the open shard's source and target
        self._shard: dict = {}  # the open shard's manifest entry

    def _name(self, side: str) -> str:
        return f"{self.split}.{len(self.shards):03d}.{side}.bin"

    def begin_shard(self) -> None:
        self._open = []
        for side in ("src", "tgt"):
            path = self.root / (self._name(side) + _TMP)
            try:
                self._open.append((open(path, "wb"), hashlib.sha256(), path))
            except OSError as e:
                raise cannot(path, "write", e) from None
        self._shard = {"src": self._name("src"), "tgt": self._name("tgt"), "pairs": 0, "src_tokens": 0,
                       "tgt_tokens": 0}

    def add(self, pairs: Pairs) -> None:
        """Append `pairs` to the open shard."""
        starts = []
        for k, (ids, lens) in enumerate(((pairs.src, pairs.src_lens), (pairs.tgt, pairs.tgt_lens))):
            data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
            f, digest, path = self._open[k]
            try:
                f.write(data)
            except OSError as e:
                raise cannot(path, "write", e) from None
            digest.update(data)
            starts.append(self.tokens[k] + np.cumsum(lens, dtype=np.int64) - lens)
            self.tokens[k] += int(lens.sum())
        self.parts.append(np.stack([pairs.lines.astype(np.int64), starts[0], pairs.src_lens.astype(np.int64),
                                    starts[1], pairs.tgt_lens.astype(np.int64)]))
        self._shard["pairs"] += len(pairs.lines)
        self._shard["src_tokens"] += int(pairs.src_lens.sum())
        self._shard["tgt_tokens"] += int(pairs.tgt_lens.sum())
        if self.with_text:
            self.text[0].extend(pairs.src_text)
            self.text[1].extend(pairs.tgt_text)

    def end_shard(self) -> None:
        """Make the open shard's files complete: fsync, then rename them to their names."""
        for f, digest, path in self._open:
            final = path.with_name(path.name.removesuffix(_TMP))
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(path, final)
            except OSError as e:
                raise cannot(final, "write", e) from None
            self.files[final.name] = {"bytes": final.stat().st_size, "sha256": digest.hexdigest()}
        fsync_dir(self.root)
        self.shards.append(self._shard)

    def _index_blocks(self, pairs: int) -> Iterator[bytes]:
        """The .npy file of the (5, pairs) index, row by row, without joining the chunks' columns in memory."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False,
                                                      "shape": (len(INDEX_ROWS), pairs)})
        yield header.getvalue()
        for row in range(len(INDEX_ROWS)):
            for part in self.parts:
                yield part[row].astype("<i8").tobytes()

    def finish(self) -> dict:
        """Write the index (and the text); the split's entry of the manifest, without its counts."""
        pairs = sum(part.shape[1] for part in self.parts)
        name = f"{self.split}.index.npy"
        self.files[name] = atomic_write(self.root / name, self._index_blocks(pairs))
        entry = {"pairs": pairs, "index": name, "shards": self.shards}
        if self.with_text:
            entry["text"] = {}
            for side, lines in zip(("src", "tgt"), self.text):
                entry["text"][side] = name = f"{self.split}.{side}.txt"
                self.files[name] = atomic_write(self.root / name, [(line + "\n").encode("utf-8") for line in lines])
        return entry


def write_manifest(root: Path, manifest: dict) -> None:
    """The last write of a preprocess: from this moment the folder is complete."""
    atomic_write(root / MANIFEST, [(json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")])


# --- reading -------------------------------------------------------------------------------


class Side(Sequence):
    """The sentences of one side of a split, as lists of ids: side[i] is the i-th pair's (or, with `keep`,
    the keep[i]-th pair's). Ids are read from the memory-mapped shards when asked for."""

    def __init__(self, index: np.ndarray, shards: list[np.ndarray], row: int, keep: np.ndarray | None = None) -> None:
        self.starts, self.lens = index[row], index[row + 1]  # memory-mapped rows: nothing read yet
        self.shards, self.keep = shards, keep
        self.shard_starts = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.lens)

    def __getitem__(self, i):
        j = int(self.keep[i]) if self.keep is not None else i
        start, n = int(self.starts[j]), int(self.lens[j])
        k = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        first = start - int(self.shard_starts[k])
        return self.shards[k][first : first + n].tolist()


@dataclass(frozen=True)
class Split:
    """A split of a data folder: its index (5, N), memory-mapped, and its shards."""

    name: str
    index: np.ndarray
    src_shards: list[np.ndarray]
    tgt_shards: list[np.ndarray]
    sources: tuple[str, str]  # the input files, as preprocess was given them
    text: tuple[Path, Path] | None

    def __len__(self) -> int:
        return self.index.shape[1]

    @property
    def lines(self) -> np.ndarray:
        return self.index[LINE]

    @property
    def src_lens(self) -> np.ndarray:
        return self.index[SRC_LEN]

    @property
    def tgt_lens(self) -> np.ndarray:
        return self.index[TGT_LEN]

    def src(self, keep: np.ndarray | None = None) -> Side:
        return Side(self.index, self.src_shards, SRC_START, keep)

    def tgt(self, keep: np.ndarray | None = None) -> Side:
        return Side(self.index, self.tgt_shards, TGT_START, keep)


def _check_file(root: Path, name: str, expected: dict, checksum: bool) -> None:
    path = root / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: missing (the manifest lists it); run transformer preprocess again") from None
    except OSError as e:
        raise cannot(path, "read", e) from None
    if size != expected["bytes"]:
        raise UserError(f"{path}: {size} bytes, but the manifest says {expected['bytes']}: truncated or replaced; "
                        "run transformer preprocess again")
    if checksum and sha256_file(path) != expected["sha256"]:
        raise UserError(f"{path}: sha256 differs from the manifest's: the file is corrupt or from another "
                        "preprocess; run transformer preprocess again")


class DataFolder:
    """A finished, verified data folder (see the module docstring); `open` it."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root, self.manifest = root, manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.vocab_size: int = manifest["vocab_size"]

    @classmethod
    def open(cls, root: str | Path, checksums: bool = True) -> "DataFolder":
        """The folder `root`, after checking that every file has the size (and `checksums`: the sha256) that its
        manifest records. `UserError` naming the file otherwise, or when the manifest is missing (an unfinished
        or interrupted preprocess)."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{root}: no {MANIFEST}, so not a finished data folder (a preprocess was interrupted, "
                            "or this is another folder); run transformer preprocess again") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path}: not a readable manifest ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{path}: not a manifest of transformer preprocess")
        if manifest.get("version") != VERSION:
            raise UserError(f"{path}: version {manifest.get('version')}, but this transformer reads version {VERSION}")
        try:
            for name, expected in manifest["files"].items():
                _check_file(root, name, expected, checksums)
            return cls(root, manifest)
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: incomplete manifest (no {e})") from None

    def tokenizer_paths(self) -> tuple[Path, Path]:
        """The source and target tokenizer models (the same file for a joint vocabulary)."""
        names = self.manifest["tokenizer"]
        return self.root / names["src"], self.root / names["tgt"]

    def counts(self, split: str) -> dict:
        """{"lines", "pairs", "dropped": {reason: count}} of `split`."""
        entry = self.manifest["splits"][split]
        return {"lines": entry["lines"], "pairs": entry["pairs"], "dropped": entry["dropped"]}

    def describe(self, split: str) -> str:
        """`split`'s counts in words: "train: 2,000 of 2,003 pairs (dropped: empty 3, too long 0, ...)"."""
        c = self.counts(split)
        return f"{split}: {c['pairs']:,} of {c['lines']:,} pairs (dropped: {describe_dropped(c['dropped'])})"

    def has(self, split: str) -> bool:
        return split in self.manifest["splits"]

    def split(self, name: str) -> Split:
        """The split `name`, its index and shards memory-mapped (read-only)."""
        if not self.has(name):
            raise UserError(f"{self.root}: no {name} split (preprocess was given no {name} files)")
        entry = self.manifest["splits"][name]
        index = np.load(self.root / entry["index"], mmap_mode="r")
        if index.shape != (len(INDEX_ROWS), entry["pairs"]):
            raise UserError(f"{self.root / entry['index']}: shape {index.shape}, but the manifest has "
                            f"{entry['pairs']} pairs")
        shards = {"src": [], "tgt": []}
        for shard in entry["shards"]:
            for side in shards:
                path = self.root / shard[side]
                if path.stat().st_size != shard[f"{side}_tokens"] * self.dtype.itemsize:
                    raise UserError(f"{path}: {path.stat().st_size} bytes do not hold the manifest's "
                                    f"{shard[f'{side}_tokens']} {self.dtype.name} ids")
                shards[side].append(np.memmap(path, dtype=self.dtype, mode="r") if shard[f"{side}_tokens"]
                                    else np.zeros(0, self.dtype))
        text = entry.get("text")
        return Split(name, index, shards["src"], shards["tgt"], tuple(entry["sources"]),
                     (self.root / text["src"], self.root / text["tgt"]) if text else None)
