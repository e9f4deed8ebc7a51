"""The Python interface (`transformer.load`, `transformer.train`): for each kind of model, trained tiny in the
test, what Python gives equals what the command line prints; the streams, scores and perplexities equal
their definitions computed by hand; bad input raises `transformer.Error` with one line."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformer
from transformer.cli import main
from transformer.corpora import multi30k_dir, tinyshakespeare_path

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _loop(out: Path, steps: int, **fields) -> transformer.LoopConfig:
    optim = transformer.OptimConfig(lr=3e-3, warmup=5, schedule="cosine")
    return transformer.LoopConfig(out=out, optim=optim, max_steps=steps, valid_every=steps, progress=False, **fields)


# ---- translation, ours and exported ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def translator(trained_translation_dir):
    return transformer.load(trained_translation_dir)


def test_load_gives_a_translator_with_its_parts(translator):
    assert isinstance(translator, transformer.Translator) and translator.engine == "torch"
    assert translator.config.arch == "encoder-decoder" and isinstance(translator.model, torch.nn.Module)
    assert translator.tokenizer.vocab_size == translator.config.vocab_size and translator.backend is None


@pytest.mark.parametrize("beam", [1, 3])
def test_translate_is_what_the_cli_prints(translator, trained_translation_dir, multi30k_valid_en, tmp_path, capsys,
                                          beam):
    lines = multi30k_valid_en[:25]
    (tmp_path / "in.en").write_text("\n".join(lines) + "\n", encoding="utf-8")
    printed = _cli(capsys, "translate", "--model", str(trained_translation_dir), "--input", str(tmp_path / "in.en"),
                   "--beam", str(beam), "--no-progress").splitlines()
    ours = translator.translate(lines, beam=beam)
    assert ours == printed and len(set(ours)) > 10  # not vacuous: different sentences
    assert translator.translate(lines[3], beam=beam) == printed[3]  # a str in, a str out
    assert list(translator.translate_iter(iter(lines), batch_size=7, beam=beam)) == printed


def test_score_is_the_sum_of_the_log_probabilities_by_hand(translator, multi30k_valid_en):
    sources = multi30k_valid_en[:6]
    targets = translator.translate(sources, beam=1)
    model, tok, cfg = translator.model, translator.tokenizer, translator.config
    targets[2] = "ein Hund läuft ."  # not the model's own
    scores = translator.score(sources, targets, batch_size=4)  # two batches, padded
    for source, target, score in zip(sources, targets, scores):
        x, y = tok.encode([source])[0], tok.encode([target])[0]
        with torch.no_grad():
            logits = model(torch.tensor([x + [cfg.eos_id]]), torch.tensor([[cfg.bos_id] + y]))[0]
        gold = y + [cfg.eos_id]
        by_hand = sum(float(torch.log_softmax(logits[t], -1)[g]) for t, g in enumerate(gold))
        assert score == pytest.approx(by_hand, abs=1e-4)
    assert len(set(scores)) == len(scores) and max(scores) < 0


def test_n_best_is_the_beam_ranked_and_its_log_probs_are_scores(translator, multi30k_valid_en):
    source = multi30k_valid_en[0]
    best = translator.n_best(source, n=3)
    assert len(best) == 3 and len({text for text, _ in best}) == 3
    assert best[0][0] == translator.translate(source, beam=3)
    for text, log_prob in best:
        assert log_prob == pytest.approx(translator.score([source], [text])[0], abs=1e-3)


def _count_decoded(monkeypatch) -> list[int]:
    """Spy on our searches: the number of sentences of each batch that `translate` and `n_best` decode."""
    from transformer.api import text as api_text
    from transformer.inference import translate as inference

    decoded: list[int] = []
    greedy_or_beam, beam = inference.translate_batch, api_text.beam_search
    monkeypatch.setattr(inference, "translate_batch", lambda m, src, cfg: decoded.append(len(src)) or
                        greedy_or_beam(m, src, cfg))
    monkeypatch.setattr(api_text, "beam_search", lambda m, src, cfg: decoded.append(len(src)) or beam(m, src, cfg))
    return decoded


@pytest.mark.parametrize("beam", [1, 3])
def test_empty_and_blank_texts_translate_to_empty_strings_without_decoding(translator, monkeypatch, beam):
    """Issue #31: the model would invent a sentence for an empty source (the lone EOS)."""
    texts = ["A dog runs.", "", "  ", "A cat sleeps."]
    alone = [translator.translate(texts[0], beam=beam), translator.translate(texts[3], beam=beam)]
    decoded = _count_decoded(monkeypatch)
    assert translator.translate(texts, beam=beam) == [alone[0], "", "", alone[1]] and all(alone)
    assert sum(decoded) == 2  # the two sentences, and not the empty ones
    decoded.clear()
    assert translator.translate(["", " \t "], beam=beam) == ["", ""] and translator.translate("", beam=beam) == ""
    assert list(translator.translate_iter(["", " "], batch_size=1, beam=beam)) == ["", ""]
    assert translator.n_best(" ", n=3) == [("", 0.0)]
    assert decoded == []


def test_attention_gives_the_maps_as_tensors(translator, multi30k_valid_en):
    maps = translator.attention(multi30k_valid_en[0])
    assert maps.translation == translator.translate(multi30k_valid_en[0])
    heads, layers = translator.config.n_heads, translator.config.n_encoder_layers
    assert len(maps.weights["encoder"]) == layers
    assert maps.weights["cross"][0].shape == (heads, len(maps.tgt_out), len(maps.src))
    given = translator.attention(multi30k_valid_en[0], target="ein Mann .")
    assert given.translation == "ein Mann ." and torch.allclose(given.weights["cross"][-1].sum(-1), torch.ones(1))


def test_a_ctranslate2_export_translates_and_scores_as_ours(trained_translation_dir, translator, multi30k_valid_en,
                                                           tmp_path, capsys):
    pytest.importorskip("ctranslate2")
    folder = tmp_path / "ct2"
    assert main(["export", "--model", str(trained_translation_dir), "--to", "ctranslate2", "--out", str(folder)]) == 0
    exported = transformer.load(folder, threads=1)
    assert isinstance(exported, transformer.Translator) and exported.engine == "ctranslate2"
    lines = multi30k_valid_en[:20]
    (tmp_path / "in.en").write_text("\n".join(lines) + "\n", encoding="utf-8")
    printed = _cli(capsys, "translate", "--model", str(folder), "--input", str(tmp_path / "in.en"), "--beam", "1",
                   "--no-progress").splitlines()
    assert exported.translate(lines, beam=1) == printed == translator.translate(lines, beam=1)
    hyps = translator.translate(lines[:5], beam=1)
    assert exported.score(lines[:5], hyps) == pytest.approx(translator.score(lines[:5], hyps), abs=1e-3)
    with pytest.raises(transformer.Error, match="needs our PyTorch model"):
        exported.attention(lines[0])


# ---- language models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny character LM trained through `transformer.train` (40 steps on 20,000 characters)."""
    root = tmp_path_factory.mktemp("lm")
    (root / "input.txt").write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    cfg = transformer.LMConfig(text=root / "input.txt", loop=_loop(root / "run", 40), block_size=32, batch_size=8,
                               eval_batches=1)
    lines = []
    run = transformer.train(cfg, transformer.preset("tiny", dropout=0.0, max_len=32), say=lines.append)
    assert run == root / "run" and any("step" in line or "best" in line for line in lines)
    return run


def test_generate_is_what_lm_sample_prints_and_the_stream_joins_to_it(lm_dir, capsys):
    lm = transformer.load(lm_dir)
    assert isinstance(lm, transformer.LanguageModel)
    printed = _cli(capsys, "lm", "sample", "--model", str(lm_dir), "--prompt", "ROMEO:", "--tokens", "80",
                   "--seed", "3")
    whole = lm.generate("ROMEO:", max_new_tokens=80, seed=3, include_prompt=True)
    assert printed == (whole if whole.endswith("\n") else whole + "\n")
    text = lm.generate("ROMEO:", max_new_tokens=80, seed=3)
    assert whole == "ROMEO:" + text and len(text) >= 40
    pieces = list(lm.generate("ROMEO:", max_new_tokens=80, seed=3, stream=True))
    assert "".join(pieces) == text and len(pieces) >= 40  # piece by piece, as sampled
    past_block = lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=5, seed=1)  # slides past 32
    assert "".join(lm.generate("ROMEO:", max_new_tokens=100, temperature=0.8, top_k=5, seed=1, stream=True)) == past_block


def test_perplexity_is_exp_of_the_loss(lm_dir):
    lm = transformer.load(lm_dir)
    text = "First Citizen:\nBefore we proceed"
    from transformer.inference.lm import encode_text

    ids = encode_text(lm.tokenizer, text)
    assert 2 < len(ids) <= lm.config.max_len
    with torch.no_grad():
        loss = F.cross_entropy(lm.model(ids[None, :-1])[0], ids[1:])
    assert lm.perplexity(text) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    long = tinyshakespeare_path().read_text(encoding="utf-8")[30000:30400]  # many blocks: windows
    assert 1 < lm.perplexity(long) < lm.config.vocab_size


# ---- masked LM -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    lines = (multi30k_dir() / "train.en").read_text(encoding="utf-8").splitlines()[:600]
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = transformer.MLMConfig(text=root / "train.txt", loop=_loop(root / "run", 20), vocab_size=300, batch_size=16,
                                max_len=32)
    return transformer.train(cfg, transformer.preset("tiny", dropout=0.0), say=lambda line: None)


def test_fill_is_what_mlm_fill_prints_and_embed_is_the_mean_hidden_state(mlm_dir, capsys):
    mlm = transformer.load(mlm_dir)
    assert isinstance(mlm, transformer.MaskedLM)
    sentence = "a man [MASK] a horse ."
    printed = _cli(capsys, "mlm", "fill", "--model", str(mlm_dir), sentence, "--n-best", "3").splitlines()
    fills = mlm.fill(sentence, n_best=3)
    assert printed == ["[MASK] 1: " + "  ".join(f"{w or '∅'} {p:.3f}" for w, p in fills[0])]
    vectors = mlm.embed(["a dog runs .", "two men sit on a bench ."])
    assert vectors.shape == (2, mlm.config.d_model)
    assert torch.allclose(mlm.embed("a dog runs ."), vectors[0], atol=1e-5)  # alone = in a padded batch
    ids = [5, *mlm.tokenizer.encode(["a dog runs ."])[0], 6]  # [CLS] ... [SEP]
    with torch.no_grad():
        by_hand = mlm.model.hidden(torch.tensor([ids]))[0].mean(0)
    assert torch.allclose(vectors[0], by_hand, atol=1e-5)


# ---- images ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    Image = pytest.importorskip("PIL.Image")
    from transformer.images.data import bundled

    root, digits = tmp_path_factory.mktemp("digits"), bundled("digits")
    for i in range(60):
        folder = root / str(int(digits.labels[i]))
        folder.mkdir(exist_ok=True)
        Image.fromarray((digits.images[i, 0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    return root


def test_predict_is_what_vit_predict_prints(digit_folder, tmp_path, capsys):
    from PIL import Image

    cfg = transformer.ViTConfig(loop=_loop(tmp_path / "vit", 10), images=digit_folder, batch_size=8)
    assert transformer.train(cfg, "tiny", say=lambda line: None) == tmp_path / "vit"  # as `vit train` would
    files = sorted(digit_folder.rglob("*.png"))[:12]
    printed = _cli(capsys, "vit", "predict", "--model", str(tmp_path / "vit"), *map(str, files)).splitlines()
    vit = transformer.load(tmp_path / "vit")
    assert isinstance(vit, transformer.ImageClassifier) and vit.tokenizer is None
    ours = vit.predict(files)
    assert [f"{f}\t{label}\t{p:.3f}" for f, (label, p) in zip(files, ours)] == printed
    with Image.open(files[0]) as image:  # a PIL image, alone (a batch of one: float rounding apart)
        label, prob = vit.predict(image)
    assert label == ours[0][0] and prob == pytest.approx(ours[0][1], abs=1e-5)


def test_caption_is_what_caption_generate_prints(digit_folder, tmp_path, capsys):
    from PIL import Image

    from transformer.images.captions import caption

    captions = tmp_path / "captions.txt"
    captions.write_text("".join(caption([d % 10, (d * 7) % 10]) + "\n" for d in range(200)), encoding="utf-8")
    assert main(["lm", "train", "--text", str(captions), "--out", str(tmp_path / "lm"), "--preset", "tiny",
                 "--block-size", "64", "--batch-size", "8", "--max-steps", "10", "--valid-every", "10",
                 "--eval-batches", "1", "--no-progress"]) == 0
    assert main(["caption", "train", "--lm", str(tmp_path / "lm"), "--images", str(digit_folder), "--out",
                 str(tmp_path / "cap"), "--max-steps", "5", "--valid-every", "5", "--batch-size", "8",
                 "--no-progress"]) == 0
    captioner = transformer.load(tmp_path / "cap")
    assert isinstance(captioner, transformer.Captioner)
    height, width = captioner.config.image_size
    files = []
    for i in range(3):
        image = Image.new("L", (width, height), color=40 * i)
        image.paste(255, (i, i, i + 4, i + 4))
        files.append(tmp_path / f"canvas{i}.png")
        image.save(files[-1])
    printed = _cli(capsys, "caption", "generate", "--model", str(tmp_path / "cap"), *map(str, files)).splitlines()
    assert [f"{f}\t{text}" for f, text in zip(files, captioner.caption(files))] == printed


# ---- bad input, the surface --------------------------------------------------------------------------


def test_bad_input_raises_one_line_errors(translator, trained_translation_dir, lm_dir, tmp_path, capsys):
    cases = [
        (lambda: transformer.load(tmp_path / "missing"), "no such directory"),
        (lambda: transformer.load(tmp_path), "is not a model directory"),
        (lambda: translator.translate([]), "`texts`: the list is empty"),
        (lambda: translator.translate(["a man .", 7]), "`texts`[1]: not a str (int)"),
        (lambda: translator.translate(7), "`texts`: give a str or a list of str, not int"),
        (lambda: translator.translate("a man", beam=0), "beam"),
        (lambda: translator.score(["a"], ["b", "c"]), "`sources` has 1 texts, `targets` 2"),
        (lambda: transformer.load(lm_dir).generate(""), "the prompt is empty"),
        (lambda: transformer.load(trained_translation_dir, engine="ctranslate2"), "not an exported CTranslate2 folder"),
        (lambda: transformer.load(lm_dir, quantize="int8"), "are for translation models"),
        (lambda: transformer.train("config"), "not a task's config (str)"),
    ]
    for call, words in cases:
        with pytest.raises(transformer.Error) as error:
            call()
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    from transformer.api.load import load_as

    with pytest.raises(transformer.UserError, match="not a translation model; it holds a language model"):
        load_as(transformer.Translator, lm_dir)
    (tmp_path / "in.en").write_text("A man.\n", encoding="utf-8")
    assert main(["translate", "--model", str(lm_dir), "--input", str(tmp_path / "in.en")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a translation model" in err


def test_the_cli_shows_flags_where_python_names_settings(tmp_path, capsys):
    from transformer.training.optim import OptimConfig

    with pytest.raises(transformer.Error, match=r"^`warmup` -1: must be >= 0$"):
        OptimConfig(warmup=-1)
    text = tmp_path / "t.txt"
    text.write_text("hello\n" * 50, encoding="utf-8")
    assert main(["lm", "train", "--text", str(text), "--out", str(tmp_path / "r"), "--vocab", "char",
                 "--valid-fraction", "0.5", "--max-steps", "1", "--no-progress", "--preset", "tiny"]) == 0
    capsys.readouterr()
    assert main(["lm", "train", "--text", str(text), "--out", str(tmp_path / "r"), "--max-steps", "1",
                 "--no-progress", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, or choose another --out" in err and "`" not in err


def test_the_public_surface_is_exactly_the_interface():
    assert set(transformer.__all__) == {
        "load", "train", "Translator", "LanguageModel", "MaskedLM", "TextClassifier", "ImageClassifier", "Captioner",
        "Error",
        "UserError", "ModelConfig", "VisionConfig", "preset", "vision_preset", "PRESETS", "TranslationConfig",
        "LMConfig", "MLMConfig", "ViTConfig", "CaptionTrainConfig", "ClassifyConfig", "LoopConfig", "OptimConfig"}
    for name in transformer.__all__:
        value = getattr(transformer, name)
        assert isinstance(value, dict) or value.__doc__, name
    assert issubclass(transformer.UserError, transformer.Error)
    with pytest.raises(AttributeError):
        transformer.build_model  # noqa: B018 - internal now
    fresh = subprocess.run([sys.executable, "-c", "import sys, transformer; print(sorted(dir(transformer)));"
                            "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    names, torch_imported = fresh.stdout.splitlines()
    assert set(transformer.__all__) <= set(ast.literal_eval(names))  # dir() lists the names not yet imported
    assert torch_imported == "False"  # `import transformer` imports nothing heavy until a name is used
