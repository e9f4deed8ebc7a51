"""Import of GPT-2 (`GPT2LMHeadModel`) into our `DecoderOnly`: logits, greedy generation, tokenization and
perplexity equal Hugging Face's, on tiny random models (no downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import transformer  # noqa: E402
from transformer.cli import main  # noqa: E402
from transformer.corpora import tinyshakespeare_path  # noqa: E402
from transformer.errors import UserError  # noqa: E402
from transformer.inference.lm import continuation_ids  # noqa: E402
from transformer.pretrained import build, convert_folder  # noqa: E402
from transformer.store.modeldir import load_model_dir  # noqa: E402
from transformer.text.tokenizer import Tokenizer  # noqa: E402

from test_import_bert import assert_refused, edited, save_random  # noqa: E402  (tiny random checkpoints)

pytestmark = pytest.mark.usefixtures("one_thread")

END = "<|endoftext|>"
SHAPE = dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)


def _text() -> str:
    return tinyshakespeare_path().read_text(encoding="utf-8")


def _lines(start: int, stop: int) -> list[str]:
    return _text().splitlines()[start:stop]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A byte-level BPE of 500 tokens trained on Tiny Shakespeare's first speeches (newlines kept, so that
    runs of newlines are merged), as GPT-2's tokenizer; its end of text is id 0."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    speeches = _text()[:40000].split("\n\n")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=[END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([s + "\n\n\n" for s in speeches], trainer)
    return transformers.GPT2TokenizerFast(tokenizer_object=backend, bos_token=END, eos_token=END, unk_token=END)


def save_gpt2(folder: Path, tokenizer, **options) -> torch.nn.Module:
    """A tiny random GPT-2 saved with `tokenizer` into `folder`; the Hugging Face model (eval)."""
    eos = tokenizer.eos_token_id
    config = transformers.GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                                     **(SHAPE | options))
    return save_random(folder, transformers.GPT2LMHeadModel(config), tokenizer)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, hf_tokenizer):
    """(folder, Hugging Face model) of a tiny GPT2LMHeadModel with tied embeddings."""
    folder = tmp_path_factory.mktemp("gpt2") / "hf"
    return folder, save_gpt2(folder, hf_tokenizer)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal(tmp_path, gpt2, hf_tokenizer, tied):
    folder, hf = gpt2 if tied else (tmp_path, save_gpt2(tmp_path, hf_tokenizer, tie_word_embeddings=False, n_inner=48))
    converted = convert_folder(folder)
    cfg = converted.config
    assert converted.kind == "lm" and cfg.norm_first and cfg.tie_embeddings == tied
    assert cfg.pad_id == cfg.bos_id == cfg.eos_id == hf_tokenizer.eos_token_id and cfg.d_ff == (128 if tied else 48)
    ours = build(converted)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (3, 40), generator=g)
    lengths = [40, 25, 7]
    for row, n in enumerate(lengths):
        ids[row, n:] = cfg.pad_id  # right padding: the causal mask keeps it from the real tokens
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(torch.arange(40) < torch.tensor(lengths)[:, None]).long()).logits
        logits = ours(ids)
    for row, n in enumerate(lengths):
        assert (logits[row, :n] - theirs[row, :n]).abs().max() < 1e-4
    assert theirs.std() > 1  # not vacuous: logits of some size


def test_tokenization_equal(gpt2, hf_tokenizer):
    """Unseen lines (the end of text inside some), and a text with runs of newlines encoded whole."""
    ours = Tokenizer.from_bytes(convert_folder(gpt2[0]).tokenizer)
    texts = _lines(20000, 20300) + [f"First Citizen:{END}Speak,  speak.\n\n\n", "naïve café ☃ 日本\t\n"]
    ids = ours.encode(texts)
    assert ids == hf_tokenizer(texts)["input_ids"]
    assert ours.decode(ids) == hf_tokenizer.batch_decode(ids, skip_special_tokens=True)
    assert ours.encode([END])[0] == [hf_tokenizer.eos_token_id] and hf_tokenizer.eos_token_id in ours.special_ids
    newlines = hf_tokenizer.convert_tokens_to_ids("ĊĊ")  # "\n\n": one token
    assert newlines != hf_tokenizer.unk_token_id and newlines in ours.encode(["Speak.\n\n\nYou"])[0]


def test_tokenizer_from_vocab_and_merges(tmp_path, gpt2, hf_tokenizer):
    """Without tokenizer.json, the byte-level BPE of vocab.json and merges.txt tokenizes the same."""
    folder = tmp_path / "gpt2"
    shutil.copytree(gpt2[0], folder)
    (folder / "tokenizer.json").unlink()
    hf_tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json, merges.txt
    ours = Tokenizer.from_bytes(convert_folder(folder).tokenizer)
    texts = _lines(20000, 20300) + [f"Speak.{END}\n\n\nYou"]
    assert ours.encode(texts) == hf_tokenizer(texts)["input_ids"]


@pytest.fixture(scope="module")
def imported(gpt2, tmp_path_factory):
    """Our model directory written by `transformer import` from the GPT-2 folder."""
    out = tmp_path_factory.mktemp("ours") / "gpt2"
    assert main(["import", str(gpt2[0]), "--out", str(out)]) == 0
    return out


def test_greedy_generation_equal(imported, gpt2, hf_tokenizer):
    model = transformer.load(imported)
    assert isinstance(model, transformer.LanguageModel)
    _, _, _, meta = load_model_dir(imported)
    assert meta["lm"]["family"] == "gpt2" and meta["imported_from"]["format"] == "huggingface"
    hf = gpt2[1]
    for prompt in ["First Citizen:\nBefore we proceed", "MENENIUS:\n"]:
        ids = hf_tokenizer(prompt)["input_ids"]
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=40, do_sample=False, num_beams=1, eos_token_id=None,
                               pad_token_id=hf_tokenizer.eos_token_id)[0, len(ids):].tolist()
        assert list(continuation_ids(model.model, ids, 40, temperature=0)) == expected
        assert len(set(expected)) > 3  # not vacuous: more than one token repeated
        text = model.generate(prompt, max_new_tokens=40, temperature=0, include_prompt=True)
        assert text == hf_tokenizer.decode(ids + expected, skip_special_tokens=True)


def test_perplexity_equal(imported, gpt2, hf_tokenizer, capsys):
    model = transformer.load(imported)
    text = "\n".join(_lines(100, 104)) + "\n\n"  # under the block of 128 tokens: one window
    ids = torch.tensor([hf_tokenizer(text)["input_ids"]])
    assert 20 < ids.size(1) < 128
    with torch.no_grad():
        expected = float(torch.exp(gpt2[1](ids, labels=ids).loss))
    assert model.perplexity(text) == pytest.approx(expected, rel=1e-3)

    capsys.readouterr()
    assert main(["lm", "sample", "--model", str(imported), "--prompt", "MENENIUS:", "--tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("MENENIUS:")


@pytest.mark.parametrize("key, value, why", [
    ("scale_attn_by_inverse_layer_idx", True, "not scaled by the layer"),
    ("reorder_and_upcast_attn", True, "not reordered or upcast"),
    ("add_cross_attention", True, "no cross-attention"), ("scale_attn_weights", False, "sqrt(d_k)"),
    ("activation_function", "quick_gelu", "the activations imported are"),
])
def test_refused_options(tmp_path, gpt2, key, value, why):
    assert_refused(gpt2[0], tmp_path / "gpt2", key, value, why)


def test_refused_tensors(tmp_path, gpt2):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "shape"
    shutil.copytree(gpt2[0], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"  # a Conv1D weight stored (out, in): the transposed shape
    tensors[name] = tensors[name].t().contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError) as refused:
        convert_folder(folder)
    assert str(refused.value).endswith(f"tensor {name} has shape (96, 32), the config says (32, 96)")

    untied = edited(gpt2[0], tmp_path / "untied", tie_word_embeddings=False)  # and no lm_head.weight stored
    with pytest.raises(UserError, match="no tensor lm_head.weight"):
        convert_folder(untied)


def test_lm_train_fine_tunes_the_imported_model(imported, tmp_path):
    """`lm train --init` on the imported GPT-2: windows of --block-size within its block, its own byte-level
    BPE, and the validation loss falls from the imported model's."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_lines(0, 400)) + "\n", encoding="utf-8")
    out = tmp_path / "ft"
    assert main(["lm", "train", "--text", str(text), "--out", str(out), "--init", str(imported), "--block-size",
                 "32", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--max-steps", "12",
                 "--valid-every", "6", "--eval-batches", "2", "--no-progress",
                 "--precision", "fp32"]) == 0  # the same learning on every CPU (bf16 on AMX)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    valid = [r["loss"] for r in records if r["kind"] == "valid"]
    first = [r["loss"] for r in records if r["kind"] == "train"][0]
    assert len(valid) == 2 and valid[-1] < first
    assert (out / "tokenizer.model").read_bytes() == (imported / "tokenizer.model").read_bytes()


def test_a_gpt2_folder_is_served_over_the_openai_api(gpt2, hf_tokenizer):
    """`transformer serve` on the Hugging Face folder itself: the greedy completion of Hugging Face's generate,
    detokenized piece by piece through the byte-level BPE."""
    from serve_process import ServeProcess

    folder, hf = gpt2
    prompt = "First Citizen:\nBefore we proceed"
    ids = hf_tokenizer(prompt)["input_ids"]
    expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=30, do_sample=False, num_beams=1, eos_token_id=None,
                           pad_token_id=hf_tokenizer.eos_token_id)[0].tolist()
    whole, base = hf_tokenizer.decode(expected, skip_special_tokens=True), hf_tokenizer.decode(ids)
    server = ServeProcess(folder, "--batch-size", "4")
    try:
        answer = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": folder.name, "prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == whole[len(base):]
        assert answer.json()["usage"]["prompt_tokens"] == len(ids)
    finally:
        server.stop()
