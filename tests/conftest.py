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
    from transformer.store.modeldir import save_model_dir

    tokenizer = Tokenizer.train(["a man rides a horse .", "ein mann reitet ein pferd ."] * 20, 40)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, n_encoder_layers=1, n_decoder_layers=1)
    path = tmp_path_factory.mktemp("models") / "model"
    save_model_dir(path, build_model(cfg), cfg, tokenizer.to_bytes())
    return path


@pytest.fixture(scope="session")
def trained_translation_dir(multi30k_sample, tmp_path_factory) -> Path:
    """A tiny en->de model trained 300 steps on 500 Multi30k pairs (about 6 s on one thread), byte fallback on.

    Its greedy translations of the first 60 Multi30k validation sentences (`multi30k_valid_en`)
    differ from each other and end with EOS, so that tests of exact agreement with another
    runtime (the exports) are not vacuous.
    """
    import torch

    from transformer.cli import main

    data = multi30k_sample(500, 60)
    out = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "600",
                     "--max-tokens", "800", "--warmup", "40", "--lr", "3e-3", "--dropout", "0", "--max-steps", "300",
                     "--valid-every", "300", "--valid-bleu-lines", "10", "--log-every", "100", "--no-progress",
                     "--seed", "3"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def multi30k_valid_en() -> list[str]:
    """The first 60 English sentences of Multi30k valid: the validation file of `trained_translation_dir`."""
    return (multi30k_dir() / "valid.en").read_text(encoding="utf-8").splitlines()[:60]


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny untrained decoder-only language model directory (two layers, 128 positions, a BPE vocabulary of
    200 learnt from Tiny Shakespeare). Untrained, its sampled text varies, so that equalities are not vacuous."""
    import torch

    from transformer.config import preset
    from transformer.corpora import tinyshakespeare_path
    from transformer.model.models import build_model
    from transformer.store.modeldir import save_model_dir
    from transformer.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(tinyshakespeare_path().read_text(encoding="utf-8").splitlines()[:3000], 200)
    cfg = preset("tiny", arch="decoder", vocab_size=tokenizer.vocab_size, n_encoder_layers=0, n_decoder_layers=2,
                 max_len=128, dropout=0.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "lm"
    save_model_dir(path, build_model(cfg), cfg, tokenizer.to_bytes())
    return path
