"""Fixtures shared by the test files."""

from pathlib import Path

import pytest

from transformer.corpora import multi30k_dir


@pytest.fixture(scope="session")
def multi30k_sample(tmp_path_factory):
    """make(n_train, n_valid): a folder holding the first lines of Multi30k's train and valid en/de files."""

    def make(n_train: int, n_valid: int) -> Path:
        root = tmp_path_factory.mktemp("multi30k")
        for split, n in (("train", n_train), ("valid", n_valid)):
            for lang in ("en", "de"):
                lines = (multi30k_dir() / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
                (root / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return root

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and on a busy 2-core machine two threads are much slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
