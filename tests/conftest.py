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


@pytest.fixture(scope="session")
def untrained_model_dir(tmp_path_factory) -> Path:
    """A tiny untrained translation model directory (a small vocabulary, one layer each side)."""
    from transformer.config import preset
    from transformer.model.models import build_model
    from transformer.text.tokenizer import Tokenizer
    from transformer.training.checkpoint import save_model_dir

    tokenizer = Tokenizer.train(["a man rides a horse .", "ein mann reitet ein pferd ."] * 20, 40)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, n_encoder_layers=1, n_decoder_layers=1)
    path = tmp_path_factory.mktemp("models") / "model"
    save_model_dir(path, build_model(cfg), cfg, tokenizer.to_bytes())
    return path
