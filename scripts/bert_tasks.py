"""The two classification tasks of the BERT results (issue 33), built from text that ships here, and their
scikit-learn baseline (TF-IDF + logistic regression).

    python scripts/bert_tasks.py build OUT            # writes OUT/{pairs,speakers}/{train,valid,test}.tsv
    python scripts/bert_tasks.py baseline OUT         # the baseline's accuracy and macro-F1 on valid and test

**pairs** (a text pair: is B a translation of A?), from Multi30k English-German. Each English sentence gives
one positive (its own German sentence, label ``yes``) and one negative (``no``): for even line numbers a
random German sentence of the same split, for odd ones a *hard* one, the German sentence of the split that
shares the most capitalised words (German nouns) with the true translation, the closest in length among
those. Train: the first 10,000 training sentences (20,000 pairs); valid: Multi30k valid (2,028); test:
test2016 (2,000). Seed 0.

**speakers** (a single text: who says this speech?), from Tiny Shakespeare: the speeches (blocks between
blank lines, the first line the speaker's name) of the 8 speakers with the most speeches, the name line
removed and the lines joined by a space; split 70/15/15 per speaker after a seeded shuffle (seed 0).

**Pre-training text** (OUT/pretrain/, documents separated by blank lines, for `mlm train` with or without
`--nsp`): for pairs, Multi30k train and valid as documents of two sentences, an English one and its German
translation; for speakers, Tiny Shakespeare's speeches without the speaker's line, those of the task's valid
and test splits left out, the last 5% of them for validation.

Choices were made on valid only; test is read once per model for the table. scripts/bert_results.sh runs
the whole comparison.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from transformer.corpora import multi30k_dir, tinyshakespeare_path

SEED = 0
N_TRAIN_PAIRS = 10_000
N_SPEAKERS = 8


def _lines(split: str, lang: str) -> list[str]:
    return [line.strip() for line in (multi30k_dir() / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()]


def _nouns(sentence: str) -> set[str]:
    return {w for w in re.findall(r"\w+", sentence) if w[:1].isupper()}


def _hard_negative(i: int, german: list[str], nouns: list[set[str]], index: dict[str, list[int]]) -> int:
    """The line j != i of `german` sharing the most capitalised words with line i, closest in length."""
    shared = Counter(j for w in nouns[i] for j in index[w] if j != i)
    if not shared:
        return (i + 1) % len(german)
    best = max(shared.values())
    length = len(german[i].split())
    return min((j for j, n in shared.items() if n == best), key=lambda j: (abs(len(german[j].split()) - length), j))


def pair_split(split: str, limit: int | None, rng: random.Random) -> list[tuple[str, str, str]]:
    english, german = _lines(split, "en")[:limit], _lines(split, "de")[:limit]
    nouns = [_nouns(s) for s in german]
    index: dict[str, list[int]] = defaultdict(list)
    for j, words in enumerate(nouns):
        for w in words:
            index[w].append(j)
    rows = []
    for i, (en, de) in enumerate(zip(english, german)):
        rows.append((en, de, "yes"))
        if i % 2 == 0:
            j = rng.choice([k for k in (rng.randrange(len(german)) for _ in range(3)) if k != i] or [(i + 1) % len(german)])
        else:
            j = _hard_negative(i, german, nouns, index)
        rows.append((en, german[j], "no"))
    return rows


def speaker_splits(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    text = tinyshakespeare_path().read_text(encoding="utf-8")
    speeches = [block.strip().split("\n") for block in text.split("\n\n") if block.strip()]
    by_name: dict[str, list[str]] = defaultdict(list)
    for lines in speeches:
        if len(lines) > 1 and lines[0].endswith(":"):
            by_name[lines[0][:-1]].append(" ".join(line.strip() for line in lines[1:]))
    top = sorted(by_name, key=lambda name: (-len(by_name[name]), name))[:N_SPEAKERS]
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "valid": [], "test": []}
    for name in top:
        texts = by_name[name][:]
        rng.shuffle(texts)
        n_valid = n_test = round(0.15 * len(texts))
        splits["test"] += [(t, name) for t in texts[:n_test]]
        splits["valid"] += [(t, name) for t in texts[n_test : n_test + n_valid]]
        splits["train"] += [(t, name) for t in texts[n_test + n_valid :]]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def _write(path: Path, rows: list[tuple[str, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r.replace("\t", " ") for r in row) + "\n" for row in rows), encoding="utf-8")


def pretraining_text(out: Path, speakers: dict[str, list[tuple[str, str]]]) -> None:
    """OUT/pretrain/{m30k,shake}_{train,valid}.txt (module docstring)."""
    for split, name in (("train", "train"), ("valid", "valid")):
        docs = [f"{a}\n{b}" for a, b in zip(_lines(split, "en"), _lines(split, "de"))]
        _write_text(out / "pretrain" / f"m30k_{name}.txt", docs)
    held = {text for split in ("valid", "test") for text, _ in speakers[split]}
    text = tinyshakespeare_path().read_text(encoding="utf-8")
    kept = []
    for block in (b.strip().split("\n") for b in text.split("\n\n") if b.strip()):
        body = [line.strip() for line in (block[1:] if block[0].endswith(":") else block)]
        if body and " ".join(body) not in held:
            kept.append("\n".join(body))
    cut = int(len(kept) * 0.95)
    _write_text(out / "pretrain" / "shake_train.txt", kept[:cut])
    _write_text(out / "pretrain" / "shake_valid.txt", kept[cut:])


def _write_text(path: Path, documents: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")


def build(out: Path) -> None:
    rng = random.Random(SEED)
    for split, name, limit in (("train", "train", N_TRAIN_PAIRS), ("valid", "valid", None), ("test2016", "test", None)):
        _write(out / "pairs" / f"{name}.tsv", pair_split(split, limit, rng))
    speakers = speaker_splits(random.Random(SEED))
    for name, rows in speakers.items():
        _write(out / "speakers" / f"{name}.tsv", rows)
    pretraining_text(out, speakers)
    for task in ("pairs", "speakers"):
        sizes = {s: len((out / task / f"{s}.tsv").read_text(encoding="utf-8").splitlines()) for s in ("train", "valid", "test")}
        print(task, sizes)


def _read(path: Path) -> tuple[list[list[str]], list[str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    return [row[:-1] for row in rows], [row[-1] for row in rows]


def baseline(out: Path) -> None:
    """TF-IDF + logistic regression. Single texts: word 1-2-grams. Pairs: the character 2-4-gram TF-IDF of A,
    of B, and their element-wise product (the n-grams both share: names, numbers, cognates)."""
    import time

    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    for task in ("pairs", "speakers"):
        start = time.perf_counter()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = (_read(out / task / f"{s}.tsv")
                                                                    for s in ("train", "valid", "test"))
        if task == "pairs":
            vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
            vec.fit([t for row in train_x for t in row])

            def features(rows):
                a, b = vec.transform([r[0] for r in rows]), vec.transform([r[1] for r in rows])
                return hstack([a, b, a.multiply(b)]).tocsr()
        else:
            vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
            vec.fit([row[0] for row in train_x])

            def features(rows):
                return vec.transform([r[0] for r in rows])

        model = LogisticRegression(max_iter=2000, C=10.0).fit(features(train_x), train_y)
        seconds = time.perf_counter() - start
        for split, x, y in (("valid", valid_x, valid_y), ("test", test_x, test_y)):
            pred = model.predict(features(x))
            print(f"{task} {split}: accuracy {accuracy_score(y, pred):.4f}, macro-F1 "
                  f"{f1_score(y, pred, average='macro'):.4f} ({seconds:.1f} s to fit)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "baseline"):
        sys.exit(__doc__)
    {"build": build, "baseline": baseline}[sys.argv[1]](Path(sys.argv[2]))
