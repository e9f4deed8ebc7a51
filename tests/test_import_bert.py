"""Import of BERT (`BertForMaskedLM`, `BertForPreTraining`) into our `EncoderOnly`: logits, next-sentence logits,
tokenization, `fill` and `transformer mlm fill` equal Hugging Face's, on tiny random models (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import transformer  # noqa: E402
from transformer.cli import main  # noqa: E402
from transformer.corpora import multi30k_dir  # noqa: E402
from transformer.errors import UserError  # noqa: E402
from transformer.pretrained import build, convert_folder  # noqa: E402
from transformer.store.modeldir import load_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _lines(start: int, stop: int) -> list[str]:
    return (multi30k_dir() / "train.en").read_text(encoding="utf-8").splitlines()[start:stop]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A lowercasing WordPiece of 400 tokens trained on 300 Multi30k lines, as BERT's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(_lines(0, 300), trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIALS))
    return transformers.BertTokenizerFast(tokenizer_object=backend, do_lower_case=True)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the initialisation (a swapped or transposed tensor shows), LayerNorm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    scales = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name in scales else 0.3 * noise)
    return model.eval()


def save_random(folder: Path, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """The Hugging Face `model`, randomised, saved with `tokenizer` into `folder`; the model (eval)."""
    randomise(model).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def save_bert(folder: Path, tokenizer, head: str = "BertForPreTraining", **options) -> torch.nn.Module:
    """A tiny random BERT with `head`, saved with `tokenizer` into `folder`; the Hugging Face model (eval)."""
    config = transformers.BertConfig(vocab_size=len(tokenizer), **(SHAPE | options))
    return save_random(folder, getattr(transformers, head)(config), tokenizer)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory, hf_tokenizer):
    """(folder, Hugging Face model) of a BertForPreTraining: MLM and next-sentence heads."""
    folder = tmp_path_factory.mktemp("bert") / "pretraining"
    return folder, save_bert(folder, hf_tokenizer)


def _inputs(vocab: int, seed: int = 1) -> torch.Tensor:
    """(3, 12) ids, right-padded with [PAD] = 0 (rows of 12, 8 and 5 tokens), [CLS] first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    ids[:, 0] = 2
    ids[1, 8:] = 0
    ids[2, 5:] = 0
    return ids


@pytest.mark.parametrize("given_segments", [False, True])
def test_pretraining_logits_equal(pretraining, given_segments):
    folder, hf = pretraining
    converted = convert_folder(folder)
    assert converted.kind == "mlm" and converted.config.next_sentence and converted.config.tie_embeddings
    ours = build(converted)
    ids = _inputs(converted.config.vocab_size)
    segments = (torch.arange(12) >= 6).long().expand(3, 12) if given_segments else torch.zeros_like(ids)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long(), token_type_ids=segments)
        h = ours.hidden(ids, segments=segments if given_segments else None)
        logits, nsp = ours.logits(h), ours.next_sentence(h)
    assert (logits - theirs.prediction_logits).abs().max() < 1e-4
    assert (nsp - theirs.seq_relationship_logits).abs().max() < 1e-4
    assert theirs.prediction_logits.std() > 1  # not vacuous: logits of some size


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm_logits_equal(tmp_path, hf_tokenizer, tied):
    hf = save_bert(tmp_path, hf_tokenizer, "BertForMaskedLM", tie_word_embeddings=tied)
    converted = convert_folder(tmp_path)
    assert not converted.config.next_sentence and converted.config.tie_embeddings == tied
    ours = build(converted)
    assert ours.pooler is None
    ids = _inputs(converted.config.vocab_size, seed=2)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits
        assert (ours(ids) - theirs).abs().max() < 1e-4


def _ours(folder: Path):
    from transformer.text.tokenizer import Tokenizer

    return Tokenizer.from_bytes(convert_folder(folder).tokenizer)


def _check_tokenization(ours, hf_tokenizer, texts: list[str]) -> None:
    cls, sep = hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id
    ids = ours.encode(texts)
    assert [[cls, *row, sep] for row in ids] == hf_tokenizer(texts)["input_ids"]
    assert ours.decode(ids) == hf_tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_tokenization_equal(pretraining, hf_tokenizer):
    """Unseen lines, special tokens in the text, accents and capitals; and the tokenizer kept through
    the model directory's bytes."""
    texts = _lines(1000, 1300) + ["A man [MASK] a horse.", "[CLS] Zoë's CAFÉ [SEP] ü", "[mask] is not [MASK]"]
    ours = _ours(pretraining[0])
    _check_tokenization(ours, hf_tokenizer, texts)
    assert ours.encode(["a [MASK] ."])[0][1] == ours.piece_to_id("[MASK]") == hf_tokenizer.mask_token_id


def test_tokenizer_from_vocab_txt(tmp_path, pretraining, hf_tokenizer):
    """Without tokenizer.json, the WordPiece of vocab.txt and tokenizer_config.json tokenizes the same."""
    folder = tmp_path / "bert"
    shutil.copytree(pretraining[0], folder)
    (folder / "tokenizer.json").unlink()
    vocab = sorted(hf_tokenizer.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    _check_tokenization(_ours(folder), hf_tokenizer, _lines(1000, 1300) + ["A man [MASK] a horse."])


@pytest.fixture(scope="module")
def imported(pretraining, tmp_path_factory):
    """Our model directory written by `transformer import` from the BertForPreTraining folder."""
    out = tmp_path_factory.mktemp("ours") / "bert"
    assert main(["import", str(pretraining[0]), "--out", str(out)]) == 0
    return out


def _hf_fill(hf, hf_tokenizer, text: str, k: int) -> list[tuple[int, float]]:
    """Hugging Face's top `k` (id, probability) at the first [MASK] of `text` ([CLS] text [SEP])."""
    encoded = hf_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**encoded).prediction_logits[0]
    position = int((encoded["input_ids"][0] == hf_tokenizer.mask_token_id).nonzero()[0])
    p, idx = logits[position].softmax(-1).topk(k)
    return list(zip(idx.tolist(), p.tolist()))


def test_fill_through_load(imported, pretraining, hf_tokenizer):
    model = transformer.load(imported)
    assert isinstance(model, transformer.MaskedLM)
    _, _, _, meta = load_model_dir(imported)
    assert meta["mlm"]["family"] == "bert" and meta["imported_from"]["format"] == "huggingface"
    for text in ["a man [MASK] a horse .", "Two dogs are [MASK] in the snow."]:
        ours = model.fill(text, n_best=5)[0]
        theirs = _hf_fill(pretraining[1], hf_tokenizer, text, 5)
        assert [word for word, _ in ours] == [hf_tokenizer.decode([i]) for i, _ in theirs]
        assert [p for _, p in ours] == pytest.approx([p for _, p in theirs], rel=1e-3)
    assert model.embed(["a man rides a horse .", "two dogs"]).shape == (2, 32)


def test_cli_fill_prints_top_token(imported, pretraining, hf_tokenizer, capsys):
    text = "a woman [MASK] on a bench ."
    capsys.readouterr()
    assert main(["mlm", "fill", "--model", str(imported), text, "--n-best", "3"]) == 0
    line = capsys.readouterr().out.strip()
    top, p = _hf_fill(pretraining[1], hf_tokenizer, text, 1)[0]
    assert line.startswith(f"[MASK] 1: {hf_tokenizer.decode([top])} {p:.3f}")


def edited(source: Path, folder: Path, **options) -> Path:
    """A copy of the folder `source` with config.json's `options` replaced."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text()) | options
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_refused(source: Path, folder: Path, key: str, value, why: str) -> None:
    """Converting a copy of `source` with config.json's `key` = `value` is a one-line `UserError` naming
    both and saying `why`."""
    with pytest.raises(UserError) as refused:
        convert_folder(edited(source, folder, **{key: value}))
    message = str(refused.value)
    assert "\n" not in message and f"{key} {value!r}: " in message and why in message


@pytest.mark.parametrize("key, value, why", [
    ("position_embedding_type", "relative_key", "only absolute"), ("is_decoder", True, "causal BERT"),
    ("add_cross_attention", True, "no cross-attention"), ("hidden_act", "relu", "erf-GELU"),
    ("hidden_act", "gelu_new", "erf-GELU"), ("hidden_act", "mish", "the activations imported are"),
])
def test_refused_options(tmp_path, pretraining, key, value, why):
    assert_refused(pretraining[0], tmp_path / "bert", key, value, why)


def test_refused_tensors(tmp_path, pretraining, hf_tokenizer):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "shape"
    shutil.copytree(pretraining[0], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "bert.encoder.layer.1.attention.self.key.weight"
    tensors[name] = tensors[name][:, :16].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=f"tensor {name} has shape \\(32, 16\\), the config says \\(32, 32\\)"):
        convert_folder(folder)

    bare = tmp_path / "bare"  # a BertModel: no masked-LM head
    transformers.BertModel(transformers.BertConfig(vocab_size=len(hf_tokenizer), **SHAPE)).save_pretrained(bare)
    hf_tokenizer.save_pretrained(bare)
    with pytest.raises(UserError, match="no masked-LM head"):
        convert_folder(bare)

    broken = tmp_path / "broken"
    shutil.copytree(pretraining[0], broken)
    (broken / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer.json: cannot read: not a tokenizers document"):
        convert_folder(broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer \\(tokenizer.json, or BERT's vocab.txt\\)"):
        convert_folder(broken)

    small = edited(pretraining[0], tmp_path / "small", vocab_size=100)
    with pytest.raises(UserError, match=f"the tokenizer has {len(hf_tokenizer)} tokens, the model's vocab_size is 100"):
        convert_folder(small)


def test_mlm_train_fine_tunes_the_imported_model(imported, tmp_path):
    """`mlm train --init` on the imported BERT masks with its WordPiece ids ([MASK], specials never chosen)
    and trains: the validation loss on masked tokens falls."""
    from transformer.store.modeldir import load_model_dir
    from transformer.tasks.mlm import specials

    _, cfg, tokenizer, _ = load_model_dir(imported)
    ids = specials(tokenizer, cfg.pad_id)
    assert ids.mask == tokenizer.piece_to_id("[MASK]") and ids.first_regular > max(ids.mask, ids.cls, ids.sep)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_lines(0, 300)) + "\n", encoding="utf-8")
    out = tmp_path / "ft"
    assert main(["mlm", "train", "--text", str(text), "--out", str(out), "--init", str(imported),
                 "--batch-size", "16", "--lr", "3e-3", "--warmup", "2", "--max-steps", "12", "--valid-every", "6",
                 "--no-progress", "--precision", "fp32"]) == 0  # the same learning on every CPU (bf16 on AMX)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    valid = [r["loss"] for r in records if r["kind"] == "valid"]
    assert len(valid) == 2 and valid[1] < valid[0]


def test_classify_fine_tunes_the_imported_model_on_pairs(imported, tmp_path):
    """`classify train` on the imported BERT: its WordPiece [CLS]/[SEP], its two segments for a pair, and
    BERT's pooler under the head; the run predicts through `transformer.load`."""
    rows = [f"{a}\t{b}\t{'same' if i % 2 == 0 else 'other'}" for i, (a, b) in
            enumerate(zip(_lines(0, 80), _lines(0, 80)[::-1]))]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "clf"
    assert main(["classify", "train", "--model", str(imported), "--train", str(tmp_path / "train.tsv"),
                 "--out", str(out), "--max-steps", "4", "--valid-every", "4", "--no-progress"]) == 0
    classifier = transformer.load(out)
    assert classifier.pairs and classifier.model.pooler is not None and classifier.config.n_segments == 2
    label, probability = classifier.predict((_lines(0, 1)[0], _lines(1, 2)[0]))
    assert label in ("same", "other") and 0.5 <= probability <= 1.0
