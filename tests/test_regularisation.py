"""Regularisation beyond the paper's dropout: activation dropout in the FFN (`--act-dropout`), the depth and
dropout flags of the model group (`--encoder-layers`, `--decoder-layers`, `--attn-dropout`), and BPE-dropout
of the training text (`--bpe-dropout`: `Tokenizer.encode_sampled`, `Segmentations`, training and resume)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer.cli import flags, main, parse
from transformer.config import preset
from transformer.model.captioner import GatedCrossAttention, QFormer
from transformer.model.dropout import effective_p
from transformer.model.layers import FeedForward
from transformer.model.models import build_model
from transformer.tasks import translation
from transformer.tasks.translation import EpochBatches, Segmentations, TranslationConfig, _load_corpus, _to_device
from transformer.text.data import collate
from transformer.text.tokenizer import Tokenizer
from transformer.training.checkpoint import list_checkpoints
from transformer.store.modeldir import load_model_dir
from transformer.training.loop import LoopConfig

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN = 200


@pytest.fixture(scope="module")
def data(multi30k_sample) -> Path:
    """The first 200 Multi30k en-de training pairs and 10 validation pairs, as plain files."""
    return multi30k_sample(N_TRAIN, 10)


@pytest.fixture(scope="module")
def tokenizer(data) -> Tokenizer:
    """A joint 400-piece BPE vocabulary of the training pairs, with byte fallback (as `train` makes it)."""
    lines = [s for lang in ("en", "de") for s in _lines(data / f"train.{lang}")]
    return Tokenizer.train(lines, 400, byte_fallback=True)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# --- activation dropout in the FFN ---------------------------------------------------------------


def test_act_dropout_zeroes_hidden_units_in_training_and_is_the_identity_in_eval() -> None:
    torch.manual_seed(0)
    plain = FeedForward(16, 64)
    ffn = FeedForward(16, 64, act_dropout=0.5)
    ffn.load_state_dict(plain.state_dict())  # no parameters of its own
    x = torch.randn(3, 5, 16)
    assert torch.equal(ffn.eval()(x), plain.eval()(x))

    seen: list[torch.Tensor] = []
    ffn.w2.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    y = ffn.train()(x)
    hidden = torch.relu(ffn.w1(x)).detach()
    (into_w2,) = seen
    assert torch.equal(y, ffn.w2(into_w2))
    kept = into_w2 != 0
    scale = 1 / (1 - effective_p(0.5))
    torch.testing.assert_close(into_w2[kept], hidden[kept] * scale)  # the kept units scaled, the rest zeroed
    dropped = (~kept & (hidden > 0)).sum().item() / (hidden > 0).sum().item()
    assert 0.35 < dropped < 0.65  # about half of ~480 active units (sigma 0.023)
    assert not torch.allclose(y, plain.train()(x))  # p = 0: no dropout module, in training too


def test_every_ffn_of_the_models_gets_act_dropout() -> None:
    cfg = preset("tiny", vocab_size=50, dropout=0.0, act_dropout=0.3)
    model = build_model(cfg)
    bridges = [QFormer(cfg, n_queries=3, n_layers=2, cross_every=1), GatedCrossAttention(cfg)]
    ffns = [m for module in (model, *bridges) for m in module.modules() if isinstance(m, FeedForward)]
    assert len(ffns) == cfg.n_encoder_layers + cfg.n_decoder_layers + 3
    assert all(f.dropout is not None and f.dropout.p == 0.3 for f in ffns)
    assert all(f.dropout is None for f in build_model(cfg.replace(act_dropout=0.0)).modules()
               if isinstance(f, FeedForward))


def test_act_dropout_changes_training_outputs_only() -> None:
    cfg = preset("tiny", vocab_size=50, dropout=0.0, act_dropout=0.3)
    torch.manual_seed(1)
    model = build_model(cfg)
    plain = build_model(cfg.replace(act_dropout=0.0))
    plain.load_state_dict(model.state_dict())
    src, tgt = torch.randint(4, 50, (2, 7)), torch.randint(4, 50, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(src, tgt), plain.eval()(src, tgt))
        torch.manual_seed(2)
        trained = model.train()(src, tgt)
        torch.manual_seed(2)
        assert not torch.allclose(trained, plain.train()(src, tgt))


def test_the_huggingface_export_carries_act_dropout() -> None:
    pytest.importorskip("transformers")
    from transformer.export.huggingface import marian_config

    for p in (0.0, 0.25):
        hf = marian_config(preset("tiny", vocab_size=50, act_dropout=p, attn_dropout=0.15))
        assert (hf.activation_dropout, hf.attention_dropout) == (p, 0.15)


# --- the model flags -------------------------------------------------------------------------------


def _model_flags(*extra: str):
    return flags.model_config(parse(["train", "--preset", "tiny", *extra]))


def test_encoder_and_decoder_layers_override_layers_in_any_order() -> None:
    tiny = preset("tiny")
    default = _model_flags()
    assert (default.n_encoder_layers, default.n_decoder_layers) == (tiny.n_encoder_layers, tiny.n_decoder_layers)
    assert (default.attn_dropout, default.act_dropout) == (tiny.attn_dropout, tiny.act_dropout) == (0.0, 0.0)
    for extra, depths in ((["--layers", "3", "--encoder-layers", "5"], (5, 3)),
                          (["--encoder-layers", "5", "--layers", "3"], (5, 3)),
                          (["--decoder-layers", "1"], (tiny.n_encoder_layers, 1)),
                          (["--layers", "4", "--decoder-layers", "1", "--encoder-layers", "6"], (6, 1))):
        cfg = _model_flags(*extra)
        assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == depths, extra


def test_attn_and_act_dropout_flags_land_in_the_config() -> None:
    cfg = _model_flags("--attn-dropout", "0.2", "--act-dropout", "0.3", "--dropout", "0.05")
    assert (cfg.attn_dropout, cfg.act_dropout, cfg.dropout) == (0.2, 0.3, 0.05)


def _one_line_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("flag, value", [("--act-dropout", "1"), ("--attn-dropout", "-0.1"),
                                         ("--encoder-layers", "0"), ("--decoder-layers", "two"),
                                         ("--bpe-dropout", "1")])
def test_out_of_range_values_are_one_line(flag, value, tmp_path, capsys) -> None:
    err = _one_line_error(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), flag, value], capsys)
    assert err.startswith("transformer translation train: error: ") and flag in err
    assert not (tmp_path / "run").exists()


# --- BPE-dropout: the sampled segmentation ---------------------------------------------------------


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def any_tokenizer(request, data, tokenizer) -> Tokenizer:
    if request.param == "bpe":
        return tokenizer
    lines = [s for lang in ("en", "de") for s in _lines(data / f"train.{lang}")]
    return Tokenizer.train(lines, 400, model_type="unigram", byte_fallback=True)


def test_encode_sampled_is_a_function_of_the_seed_and_spells_the_same_text(any_tokenizer, data) -> None:
    texts = _lines(data / "train.en")
    first = any_tokenizer.encode_sampled(texts, 0.1, 5)
    any_tokenizer.encode_sampled(texts[:7], 0.1, 9)  # a call in between leaves no trace
    assert any_tokenizer.encode_sampled(texts, 0.1, 5) == first
    other = any_tokenizer.encode_sampled(texts, 0.1, 6)
    usual = any_tokenizer.encode(texts)
    assert sum(a != b for a, b in zip(first, other)) > len(texts) // 2
    assert sum(a != b for a, b in zip(first, usual)) > len(texts) // 2
    assert any_tokenizer.decode(first) == any_tokenizer.decode(usual)  # the text, runs of spaces as one


def test_bpe_dropout_makes_more_pieces_and_p_0_is_the_usual_segmentation(tokenizer, data) -> None:
    texts = _lines(data / "train.de")
    usual = tokenizer.encode(texts)
    assert tokenizer.encode_sampled(texts, 0.0, 3) == usual
    sampled = tokenizer.encode_sampled(texts, 0.1, 3)
    # Skipping merges mostly lengthens a text; another path through the merges can end shorter, rarely.
    assert sum(len(s) >= len(u) for s, u in zip(sampled, usual)) >= 0.95 * len(usual)
    assert sum(map(len, sampled)) > 1.05 * sum(map(len, usual))


# --- BPE-dropout: each epoch's pairs and batches -------------------------------------------------


def _corpus(data: Path, tokenizer: Tokenizer, tmp_path: Path, max_tokens: int = 1000) -> translation.Corpus:
    cfg = TranslationConfig(data / "train.en", data / "train.de", None, None, loop=LoopConfig(out=tmp_path, seed=3),
                            max_tokens=max_tokens)
    return _load_corpus(data / "train.en", data / "train.de", tokenizer, 256, cfg, True, lambda _: None)


def test_each_epoch_is_segmented_anew_and_the_same_again_from_scratch(data, tokenizer, tmp_path) -> None:
    corpus = _corpus(data, tokenizer, tmp_path)
    assert len(corpus.src) == N_TRAIN
    walked = Segmentations(corpus, tokenizer, 0.1, 256, 1000, seed=3)
    epochs = [tuple(map(list, walked.pairs(e))) for e in range(3)]
    fresh = Segmentations(corpus, tokenizer, 0.1, 256, 1000, seed=3)  # a resumed process: epoch 2 first
    assert tuple(map(list, fresh.pairs(2))) == epochs[2] and tuple(map(list, fresh.pairs(0))) == epochs[0]
    assert tuple(map(list, walked.pairs(1))) == epochs[1]  # asked again after epoch 2
    for (src, tgt), (other_src, _) in zip(epochs, epochs[1:]):
        assert sum(a != b for a, b in zip(src, other_src)) > N_TRAIN // 2
        assert sum(a != b for a, b in zip(src, corpus.src)) > N_TRAIN // 2
        assert tokenizer.decode(src) == tokenizer.decode(corpus.src)
        assert tokenizer.decode(tgt) == tokenizer.decode(corpus.tgt)
    reseeded = Segmentations(corpus, tokenizer, 0.1, 256, 1000, seed=4).pairs(0)[0]
    assert sum(a != b for a, b in zip(reseeded, epochs[0][0])) > N_TRAIN // 2


def test_a_sampled_pair_too_long_for_the_limit_keeps_its_usual_segmentation(data, tokenizer, tmp_path) -> None:
    corpus = _corpus(data, tokenizer, tmp_path)
    longest = max(max(len(s), len(t)) for s, t in zip(corpus.src, corpus.tgt))
    loose = Segmentations(corpus, tokenizer, 0.1, 256, 10_000, seed=3)
    tight = Segmentations(corpus, tokenizer, 0.1, 256, longest + 1, seed=3)  # every usual pair just fits
    assert tight.limit == longest
    fell_back = 0
    for e in (0, 1):
        pairs = zip(*loose.pairs(e), *tight.pairs(e), corpus.src, corpus.tgt)
        for sampled_src, sampled_tgt, src, tgt, usual_src, usual_tgt in pairs:
            assert max(len(src), len(tgt)) <= longest
            if max(len(sampled_src), len(sampled_tgt)) <= longest:
                assert (src, tgt) == (sampled_src, sampled_tgt)
            else:
                assert (src, tgt) == (usual_src, usual_tgt)
                fell_back += 1
    assert fell_back > 0
    narrow = Segmentations(corpus, tokenizer, 0.1, longest + 2, 10_000, seed=3)  # the same through max_len
    assert narrow.limit == longest and narrow.pairs(1) == tight.pairs(1)


def test_each_epochs_batches_hold_every_pair_once_within_max_tokens(data, tokenizer, tmp_path) -> None:
    corpus = _corpus(data, tokenizer, tmp_path, max_tokens=600)
    segmentations = Segmentations(corpus, tokenizer, 0.1, 256, 600, seed=3)
    orders = []
    for e in range(3):
        src, tgt = segmentations.pairs(e)
        batches = segmentations.arrays(e)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(N_TRAIN))
        for batch in batches:
            assert len(batch) * max(max(len(src[i]), len(tgt[i])) + 1 for i in batch) <= 600
        orders.append(np.concatenate(batches))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again = Segmentations(corpus, tokenizer, 0.1, 256, 600, seed=3).arrays(1)
    assert all(np.array_equal(a, b) for a, b in zip(again, segmentations.arrays(1), strict=True))


def test_epoch_batches_and_to_device_follow_the_epoch_of_each_batch(data, tokenizer, tmp_path) -> None:
    corpus = _corpus(data, tokenizer, tmp_path)
    segmentations = Segmentations(corpus, tokenizer, 0.1, 256, 1000, seed=3)
    first, second = segmentations.arrays(0), segmentations.arrays(1)
    batches = EpochBatches(segmentations)
    assert np.array_equal(batches[len(first) + 1], second[1]) and batches.epoch == 1
    assert np.array_equal(batches[2], first[2]) and batches.epoch == 0  # a fresh walk from epoch 0
    assert batches.steps_in(2, 1) == len(first) + len(second)
    idx = second[0].tolist()
    src, tgt = segmentations.pairs(1)
    expected = collate([src[i] for i in idx], [tgt[i] for i in idx])
    ids = preset("tiny")  # the special ids of every vocabulary trained here
    got = _to_device(corpus, idx, torch.device("cpu"), ids, segmentations, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    usual = collate([corpus.src[i] for i in idx], [corpus.tgt[i] for i in idx])
    assert not torch.equal(got[0], usual[0])
    assert all(torch.equal(a, b) for a, b in zip(_to_device(corpus, idx, torch.device("cpu"), ids), usual))


# --- BPE-dropout: training from the command line ---------------------------------------------------


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--vocab-size", "400",
            "--max-tokens", "1000", "--warmup", "10", "--lr-scale", "2", "--log-every", "1", "--valid-every", "100",
            "--valid-bleu-lines", "2", "--no-progress", "--seed", "3", *extra]


def _record_training_batches(monkeypatch) -> list[tuple[int, list[int], list[list[int]]]]:
    """(epoch, pair indices, source ids as the model gets them) of each training batch, validation left out."""
    seen: list[tuple[int, list[int], list[list[int]]]] = []
    real = translation._to_device

    def recording(corpus, idx, device, ids, segmentations=None, epoch=0):
        batch = real(corpus, idx, device, ids, segmentations, epoch)
        if segmentations is not None:
            rows = [[t for t in row if t != Tokenizer.PAD][:-1] for row in batch[0].tolist()]  # less EOS
            seen.append((epoch, [int(i) for i in idx], rows))
        return batch

    monkeypatch.setattr(translation, "_to_device", recording)
    return seen


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_train_with_bpe_dropout_feeds_each_epoch_a_new_segmentation(data, tmp_path, monkeypatch, capsys) -> None:
    seen = _record_training_batches(monkeypatch)
    out = tmp_path / "run"
    assert main(_train_args(data, out, "--bpe-dropout", "0.1", "--max-epochs", "2", "--act-dropout", "0.1",
                            "--attn-dropout", "0.05", "--encoder-layers", "1")) == 0
    assert "BPE-dropout 0.1" in capsys.readouterr().err
    _, cfg, tokenizer, meta = load_model_dir(out)
    assert (cfg.act_dropout, cfg.attn_dropout, cfg.n_encoder_layers, cfg.n_decoder_layers) == (0.1, 0.05, 1, 2)
    assert meta["translation"]["bpe_dropout"] == 0.1
    assert len(_losses(out)) == len(seen)  # --max-epochs: one step per batch of the two epochs

    texts = _lines(data / "train.en")
    usual = tokenizer.encode(texts)
    by_epoch: dict[int, dict[int, list[int]]] = {}
    for epoch, idx, rows in seen:
        for i, ids in zip(idx, rows, strict=True):
            assert i not in by_epoch.setdefault(epoch, {})
            by_epoch[epoch][i] = ids
    assert sorted(by_epoch) == [0, 1] and all(sorted(pairs) == list(range(N_TRAIN)) for pairs in by_epoch.values())
    for pairs in by_epoch.values():
        assert tokenizer.decode([pairs[i] for i in range(N_TRAIN)]) == tokenizer.decode(usual)
        assert sum(pairs[i] != usual[i] for i in range(N_TRAIN)) > N_TRAIN // 2
    assert sum(by_epoch[0][i] != by_epoch[1][i] for i in range(N_TRAIN)) > N_TRAIN // 2


def test_a_resumed_run_with_bpe_dropout_ends_as_an_uninterrupted_one(data, tmp_path, monkeypatch, capsys) -> None:
    seen = _record_training_batches(monkeypatch)
    regularised = ("--bpe-dropout", "0.1", "--act-dropout", "0.1")
    full = tmp_path / "full"
    assert main(_train_args(data, full, *regularised, "--max-steps", "28")) == 0
    epochs = [epoch for epoch, _, _ in seen]
    assert epochs[14] >= 1 and epochs[-1] > epochs[14]  # killed inside a later epoch, resumed across another
    part = tmp_path / "part"
    assert main(_train_args(data, part, *regularised, "--max-steps", "15")) == 0
    for flag, value in (("--bpe-dropout", "0.2"), ("--act-dropout", "0.2")):
        capsys.readouterr()
        assert main(_train_args(data, part, *regularised, "--max-steps", "28", "--resume", flag, value)) == 2
        assert f"--resume: {flag} would be" in capsys.readouterr().err
    assert main(_train_args(data, part, *regularised, "--max-steps", "28", "--resume")) == 0
    expected, got = _losses(full), _losses(part)
    assert sorted(got) == list(range(1, 29))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    last = [list_checkpoints(run)[-1] for run in (full, part)]  # the runs' tops hold their best models
    assert [c.name for c in last] == ["step_00000028"] * 2
    (model, *_), (resumed, *_) = map(load_model_dir, last)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_bpe_dropout_with_data_bin_is_one_line(tmp_path, capsys) -> None:
    err = _one_line_error(["train", "--data-bin", str(tmp_path / "bin"), "--out", str(tmp_path / "run"),
                           "--preset", "tiny", "--bpe-dropout", "0.1"], capsys)
    assert err.startswith("transformer translation train: error: --bpe-dropout") and "--data-bin" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task, flag", [("lm", "--encoder-layers"), ("mlm", "--decoder-layers")])
def test_a_depth_flag_for_a_stack_the_task_lacks_is_one_line(task, flag, tmp_path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("a few words\n" * 20)
    out = tmp_path / "run"
    assert main([task, "train", "--text", str(text), "--out", str(out), "--preset", "tiny", flag, "2",
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "has no" in err[0], err
    assert not out.exists()
