"""Import of Marian / OPUS-MT checkpoints (`transformer import --from huggingface`), checked with the real library.

Nothing is downloaded: each test builds a small random `MarianMTModel` (d_model 16, two layers a side, a random
non-zero final_logits_bias) and a Marian tokenizer of two SentencePiece models trained on 400 Multi30k lines
(English source, German target) with vocab.json in Marian's layout (``</s>`` 0, ``<unk>`` 1, the pieces of
both, ``<pad>`` last), saves them with `save_pretrained`, and imports the folder. Checked: logits, greedy
generation (HF's `generate` with OPUS-MT's bad_words_ids [[pad]]), tokenization and decoding, scores, the
beam search against the CTranslate2 export, the round trip back to Marian, and the refusals.
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import sentencepiece as spm  # noqa: E402

import transformer  # noqa: E402
from transformer.cli import main  # noqa: E402
from transformer.corpora import multi30k_dir  # noqa: E402
from transformer.inference.search import SearchConfig, beam_search, greedy_search  # noqa: E402
from transformer.text.data import collate_source  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")]  # MarianTokenizer's advice

# Marian's options of each variant: OPUS-MT's (swish, scaled, tied), and the others our config expresses
OPUS_MT = {"activation_function": "swish", "scale_embedding": True}
VARIANTS = {
    "opus-mt": OPUS_MT,
    "relu-unscaled-unshared": {"activation_function": "relu", "scale_embedding": False,
                               "share_encoder_decoder_embeddings": False, "tie_word_embeddings": False},
    "gelu-new-untied-head": {"activation_function": "gelu_new", "scale_embedding": True, "tie_word_embeddings": False},
    "gelu-unscaled-tied": {"activation_function": "gelu", "scale_embedding": False},
}


def _lines(split: str, lang: str, n: int) -> list[str]:
    return (multi30k_dir() / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]


def _spm(lang: str) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines("train", lang, 400)), model_writer=model,
                                   vocab_size=150, model_type="unigram", character_coverage=0.98, num_threads=1,
                                   minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder of Hugging Face's MarianTokenizer: source.spm (en), target.spm (de), vocab.json."""
    root = tmp_path_factory.mktemp("spm")
    vocab = {"</s>": 0, "<unk>": 1}
    for lang in ("en", "de"):
        (root / f"{lang}.spm").write_bytes(_spm(lang))
        processor = spm.SentencePieceProcessor(model_file=str(root / f"{lang}.spm"))
        for i in range(processor.get_piece_size()):
            if not (processor.is_control(i) or processor.is_unknown(i)):
                vocab.setdefault(processor.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    out = root / "tokenizer"
    transformers.MarianTokenizer(str(root / "en.spm"), str(root / "de.spm"), str(root / "vocab.json"),
                                 source_lang="en", target_lang="de").save_pretrained(out)
    return out


def _marian(tokenizer_dir: Path, out: Path, pad_bias: float = 10.0, **options
            ) -> tuple[Path, "transformers.MarianMTModel"]:
    """A random MarianMTModel with `options` saved with the tokenizer to `out`, and the model (eval mode).

    The logits bias is random, the pad token's raised by `pad_bias`: by 10, a search that did not forbid
    pad would emit nothing else."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    v, pad = len(vocab), vocab["<pad>"]
    config = transformers.MarianConfig(**{
        "vocab_size": v, "decoder_vocab_size": v, "d_model": 16, "encoder_layers": 2, "decoder_layers": 2,
        "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
        "max_position_embeddings": 128, "pad_token_id": pad, "decoder_start_token_id": pad, "eos_token_id": 0,
        "forced_eos_token_id": None, "init_std": 0.3, "dropout": 0.1} | options)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 1.0)
        model.final_logits_bias[0, pad] += pad_bias
    model.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out, model


def _import(folder: Path, run: Path) -> Path:
    assert main(["import", str(folder), "--from", "huggingface", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def opus_mt(tokenizer_dir, tmp_path_factory):
    """(HF folder, HF model, our imported run directory) of the OPUS-MT variant."""
    root = tmp_path_factory.mktemp("opus")
    folder, model = _marian(tokenizer_dir, root / "hf", **OPUS_MT)
    return folder, model, _import(folder, root / "run")


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.MarianTokenizer.from_pretrained(tokenizer_dir)


def _batch(v: int, pad: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (src (3, 9) right-padded, tgt (3, 7) starting with the decoder start, pad) of real tokens."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(1, pad, (3, 9), generator=g), torch.randint(1, pad, (3, 7), generator=g)
    src[1, 6:], src[2, 3:] = pad, pad
    tgt[:, 0] = pad
    return src, tgt


def _logits(model, src: torch.Tensor, tgt: torch.Tensor, pad: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=tgt).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_marians(tokenizer_dir, tmp_path, variant):
    folder, hf_model = _marian(tokenizer_dir, tmp_path / "hf", **VARIANTS[variant])
    run = _import(folder, tmp_path / "run")
    translator = transformer.load(run, device="cpu")
    cfg, hf_cfg = translator.config, hf_model.config
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (hf_cfg.pad_token_id, hf_cfg.decoder_start_token_id, 0)
    assert cfg.scale_embedding == hf_cfg.scale_embedding and cfg.logits_bias
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings  # these random models tie all three or none
    src, tgt = _batch(cfg.vocab_size, cfg.pad_id)
    with torch.no_grad():
        ours = translator.model(src, tgt)
    assert (ours - _logits(hf_model, src, tgt, cfg.pad_id)).abs().max() < 1e-4


def test_the_run_directory_is_a_translation_model_with_the_languages(opus_mt, tmp_path, capsys):
    _, _, run = opus_mt
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["meta"]["marian"] == {"source_lang": "en", "target_lang": "de"}
    assert type(transformer.load(run)).__name__ == "Translator"
    source = tmp_path / "in.txt"
    source.write_text("A man rides a horse.\nTwo dogs play.\n", encoding="utf-8")
    assert main(["translate", "--model", str(run), "--input", str(source), "--beam", "1", "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def _sources(hf_tokenizer, n: int = 8) -> list[list[int]]:
    return [ids for ids in hf_tokenizer(_lines("valid", "en", n))["input_ids"]]  # each with its </s>


def test_greedy_is_marians_generate_with_pad_forbidden(opus_mt, hf_tokenizer):
    """Random models repeat themselves up to the maximum length (|source| + 50 tokens): 60 and more steps
    of equal choices, of which none is the pad token, which Marian would choose without bad_words_ids."""
    _, hf_model, run = opus_mt
    translator = transformer.load(run, device="cpu")
    pad = translator.config.pad_id
    lines = _lines("valid", "en", 8)
    src = collate_source(translator.tokenizer.encode(lines), pad, 0)
    greedy = greedy_search(translator.model, src, SearchConfig(beam=1))
    assert len({tuple(y) for y in greedy}) > 2  # not vacuous: different translations
    for source, ours, text in zip(_sources(hf_tokenizer), greedy, translator.translate(lines, beam=1)):
        limit = len(source) + 50  # our default maximum: |source| (its EOS counted) + 50 tokens
        out = hf_model.generate(torch.tensor([source]), num_beams=1, do_sample=False, bad_words_ids=[[pad]],
                                max_new_tokens=limit)[0, 1:].tolist()  # after the decoder start (pad)
        assert ours == (out[:-1] if out[-1] == 0 else out) and pad not in ours
        assert text == hf_tokenizer.decode(out, skip_special_tokens=True)
    unforbidden = hf_model.generate(torch.tensor([source]), num_beams=1, do_sample=False, max_new_tokens=3)
    assert unforbidden[0, 1:].tolist() == [pad] * 3


def test_beam_search_equals_the_ctranslate2_exports(tokenizer_dir, tmp_path):
    """On a model whose pad token is unlikely: CTranslate2 suppresses it before its softmax, we (as
    Hugging Face's bad_words_ids) after, which changes the beams' scores where pad is likely."""
    folder, _ = _marian(tokenizer_dir, tmp_path / "hf", pad_bias=-30.0, **OPUS_MT)
    run, ct2 = _import(folder, tmp_path / "run"), tmp_path / "ct2"
    assert main(["export", "--model", str(run), "--to", "ctranslate2", "--out", str(ct2)]) == 0
    ours, theirs = transformer.load(run, device="cpu"), transformer.load(ct2, device="cpu", threads=1)
    lines = _lines("valid", "en", 12)
    for beam in (1, 4):
        translations = ours.translate(lines, beam=beam)
        assert theirs.translate(lines, beam=beam) == translations and len(set(translations)) > 2
    targets = _lines("valid", "de", 12)
    assert theirs.score(lines, targets) == pytest.approx(ours.score(lines, targets), rel=1e-4)


def test_tokenization_and_decoding_are_marians(opus_mt, hf_tokenizer):
    tokenizer = transformer.load(opus_mt[2], device="cpu").tokenizer
    english, german = _lines("test2016", "en", 300), _lines("test2016", "de", 300)
    eos = hf_tokenizer.eos_token_id
    assert hf_tokenizer(english)["input_ids"] == [ids + [eos] for ids in tokenizer.encode(english)]
    targets = hf_tokenizer(text_target=german)["input_ids"]
    assert targets == [ids + [eos] for ids in tokenizer.encode_target(german)]
    assert any(hf_tokenizer.unk_token_id in ids for ids in targets)  # not vacuous: unknown characters
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, tokenizer.vocab_size, (50, 12), generator=g).tolist()  # every piece, specials too
    for ids in (targets, noise):
        assert tokenizer.decode(ids) == hf_tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_score_is_marians_summed_log_probability(opus_mt, hf_tokenizer):
    _, hf_model, run = opus_mt
    sources, targets = _lines("valid", "en", 6), _lines("valid", "de", 6)
    pad = hf_model.config.pad_token_id
    expected = []
    for source, target in zip(sources, targets):
        labels = hf_tokenizer(text_target=target)["input_ids"]  # the target's ids and </s>
        start = torch.tensor([[pad] + labels[:-1]])
        log_probs = _logits(hf_model, torch.tensor([hf_tokenizer(source)["input_ids"]]), start, pad)[0].log_softmax(-1)
        expected.append(log_probs[torch.arange(len(labels)), labels].sum().item())
    assert transformer.load(run, device="cpu").score(sources, targets) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("variant", ["opus-mt", "relu-unscaled-unshared"])
def test_exported_back_to_marian_it_computes_the_same(tokenizer_dir, hf_tokenizer, tmp_path, variant):
    folder, hf_model = _marian(tokenizer_dir, tmp_path / "hf", **VARIANTS[variant])
    run = _import(folder, tmp_path / "run")
    out = tmp_path / "back"
    assert main(["export", "--model", str(run), "--to", "huggingface", "--out", str(out)]) == 0
    again = transformers.MarianMTModel.from_pretrained(out).eval()
    assert again.config.activation_function == hf_model.config.activation_function
    assert again.config.decoder_start_token_id == hf_model.config.decoder_start_token_id
    pad = hf_model.config.pad_token_id
    src, tgt = _batch(hf_model.config.vocab_size, pad)
    assert (_logits(again, src, tgt, pad) - _logits(hf_model, src, tgt, pad)).abs().max() < 1e-4
    tokenizer = transformers.MarianTokenizer.from_pretrained(out)
    lines = _lines("valid", "en", 20)
    assert tokenizer(lines)["input_ids"] == hf_tokenizer(lines)["input_ids"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (pad, 0, 1)


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps(json.loads(file.read_text(encoding="utf-8")) | changes), encoding="utf-8")


def _bad_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.decoder.layers.1.fc1.weight"] = tensors["model.decoder.layers.1.fc1.weight"][:-1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change, named", [
    ({"normalize_before": True}, "normalize_before"),
    ({"add_final_layer_norm": True}, "add_final_layer_norm"),
    ({"normalize_embedding": True}, "normalize_embedding"),
    ({"layernorm_embedding": True}, "layernorm_embedding"),
    ({"static_position_embeddings": False}, "static_position_embeddings"),
    ({"activation_function": "tanh"}, "activation_function 'tanh'"),
    ({"d_model": 15}, "d_model 15"),
    ({"decoder_vocab_size": 7}, "decoder_vocab_size 7"),
    ({"decoder_attention_heads": 4}, "decoder_attention_heads 4"),
    ("separate_vocabs", "separate_vocabs"),
    ("shape", "model.decoder.layers.1.fc1.weight"),
])
def test_what_our_model_cannot_express_is_refused_on_one_line(tokenizer_dir, tmp_path, capsys, change, named):
    folder, _ = _marian(tokenizer_dir, tmp_path / "hf", **OPUS_MT)
    if change == "separate_vocabs":
        _edit_json(folder / "tokenizer_config.json", separate_vocabs=True)
    elif change == "shape":
        _bad_shape(folder)
    else:
        _edit_json(folder / "config.json", **change)
    capsys.readouterr()
    assert main(["import", str(folder), "--from", "huggingface", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_our_beam_search_never_emits_the_pad_token(opus_mt):
    """The pad token is the likeliest by far (its logits bias +10), and forbidden, as by HF's bad_words_ids."""
    translator = transformer.load(opus_mt[2], device="cpu")
    cfg = translator.config
    src = collate_source(translator.tokenizer.encode(_lines("valid", "en", 4)), cfg.pad_id, cfg.eos_id)
    for hyps in beam_search(translator.model, src, SearchConfig(beam=4, n_best=4)):
        assert len(hyps) == 4 and all(cfg.pad_id not in h.tokens for h in hyps)


def _log_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_fine_tuning_an_imported_model_resumes_exactly_and_exports(opus_mt, multi30k_sample, tmp_path):
    """`train --init` on the imported OPUS-MT model: it learns (the loss falls), a killed-and-resumed run
    gives the same losses as one straight run, and the result exports to Marian and CTranslate2, which
    translate as it does."""
    data = multi30k_sample(120, 12)

    def train(out: Path, steps: int, *extra: str) -> None:
        assert main(["train", "--data", str(data), "--src-lang", "en", "--tgt-lang", "de", "--out", str(out),
                     "--init", str(opus_mt[2]), "--max-tokens", "400", "--lr", "3e-3", "--warmup", "2",
                     "--schedule", "constant", "--log-every", "1", "--valid-every", "3", "--valid-bleu-lines", "4",
                     "--precision", "fp32",  # the same learning on every CPU (bf16 on AMX)
                     "--max-steps", str(steps), "--no-progress", "--seed", "4", *extra]) == 0

    train(tmp_path / "full", 6)
    train(tmp_path / "part", 3)
    train(tmp_path / "part", 6, "--resume")
    full, part = _log_losses(tmp_path / "full"), _log_losses(tmp_path / "part")
    assert sorted(part) == list(range(1, 7))
    for step in full:
        assert part[step] == pytest.approx(full[step], abs=1e-5), step
    assert full[6] < full[1]
    tuned = tmp_path / "full"
    assert main(["export", "--model", str(tuned), "--to", "huggingface", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", "--model", str(tuned), "--to", "ctranslate2", "--out", str(tmp_path / "ct2")]) == 0
    ours = transformer.load(tuned, device="cpu")
    lines = _lines("valid", "en", 6)
    assert transformer.load(tmp_path / "ct2", device="cpu", threads=1).translate(lines, beam=1) == \
        ours.translate(lines, beam=1)
    hf = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    src, tgt = _batch(ours.config.vocab_size, ours.config.pad_id)
    with torch.no_grad():
        expected = ours.model(src, tgt)
    torch.testing.assert_close(_logits(hf, src, tgt, ours.config.pad_id), expected, atol=1e-4, rtol=0)
