"""Export to CTranslate2, checked with the real library: the exported model computes what ours computes.

On a tiny model trained in the session (`trained_translation_dir`) and the sentences of its
validation file: greedy and beam tokens equal ours, `score_batch` log-probabilities equal ours
within 1e-4, the LM through `ctranslate2.Generator` continues as ours, int8 stays close, and what
CTranslate2 cannot express is refused on one line with exit status 2.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2")
sentencepiece = pytest.importorskip("sentencepiece")

from transformer.cli import main  # noqa: E402
from transformer.cli.common import say_flags  # noqa: E402
from transformer.config import preset  # noqa: E402
from transformer.corpora import tinyshakespeare_path  # noqa: E402
from transformer.device import cpu_flags  # noqa: E402
from transformer.export.ctranslate2 import TransformerConverter  # noqa: E402
from transformer.inference.ctranslate2 import (  # noqa: E402
    CTranslate2Translator,
    backend_line,
    cpu_vendor,
)
from transformer.inference.runtime import DecodingModel  # noqa: E402
from transformer.inference.sampling import sample  # noqa: E402
from transformer.inference.search import (  # noqa: E402
    SearchConfig,
    beam_search,
    greedy_search,
    max_lengths,
)
from transformer.model.models import build_model  # noqa: E402
from transformer.store.kinds import is_ctranslate2_dir  # noqa: E402
from transformer.store.modeldir import load_model_dir, save_model_dir  # noqa: E402
from transformer.text.data import collate_source  # noqa: E402
from transformer.text.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _export(model_dir: Path, out: Path, *extra: str) -> Path:
    assert main(["export", "--model", str(model_dir), "--to", "ctranslate2", "--out", str(out), *extra]) == 0
    return out


def _log_probs(folder: Path, tokenizer: Tokenizer, sources: list[list[int]],
               targets: list[list[int]]) -> list[list[float]]:
    """CTranslate2's `score_batch`: per target token, then EOS, its log-probability given the source."""
    translator = ctranslate2.Translator(str(folder), intra_threads=1)
    piece = tokenizer.id_to_piece
    results = translator.score_batch([[piece(i) for i in x] for x in sources], [[piece(i) for i in y] for y in targets])
    return [r.log_probs for r in results]


@pytest.fixture(scope="module")
def trained(trained_translation_dir, multi30k_valid_en):
    """(model, tokenizer, source ids, our greedy ids) of the trained tiny model on its validation sentences."""
    model, _, tokenizer, _ = load_model_dir(trained_translation_dir)
    ids = tokenizer.encode(multi30k_valid_en)
    src = collate_source(ids)
    greedy = greedy_search(model, src, SearchConfig(beam=1))
    limits = max_lengths(model, src, SearchConfig(beam=1)).tolist()
    # not vacuous: the translations differ, and nearly all end with EOS before the length limit
    assert len({tuple(g) for g in greedy}) >= 0.9 * len(greedy)
    assert sum(len(g) < limit for g, limit in zip(greedy, limits)) >= 0.9 * len(greedy)
    return model, tokenizer, ids, greedy


@pytest.fixture(scope="module")
def exported(trained_translation_dir, tmp_path_factory) -> Path:
    return _export(trained_translation_dir, tmp_path_factory.mktemp("ct2") / "float32")


def test_the_folder_holds_the_model_the_vocabulary_and_the_tokenizer(exported, trained):
    _, tokenizer, _, _ = trained
    assert is_ctranslate2_dir(exported)
    for name in ("model.bin", "config.json", "shared_vocabulary.json", "tokenizer.model", "transformer.json"):
        assert (exported / name).is_file(), name
    assert (exported / "tokenizer.model").read_bytes() == tokenizer.to_bytes()


def test_greedy_gives_exactly_our_tokens(exported, trained):
    _, _, ids, greedy = trained
    theirs = CTranslate2Translator(exported, threads=1).translate_ids(ids, SearchConfig(beam=1))
    assert theirs == greedy


def test_score_batch_log_probs_equal_ours(exported, trained):
    model, tokenizer, ids, greedy = trained
    for x, y, log_probs in zip(ids, greedy, _log_probs(exported, tokenizer, ids, greedy)):
        with torch.no_grad():
            logits = model(torch.tensor([x + [model.cfg.eos_id]]), torch.tensor([[model.cfg.bos_id] + y]))
        gold = torch.tensor(y + [model.cfg.eos_id])
        ours = torch.log_softmax(logits[0], dim=-1)[torch.arange(len(gold)), gold]  # (T,) with the EOS
        assert torch.allclose(torch.tensor(log_probs), ours, atol=1e-4), (x, y)


@pytest.mark.parametrize(("beam", "alpha"), [(4, 0.0), (4, 0.6), (8, 1.0)])
def test_beam_gives_our_translations(exported, trained, beam, alpha):
    """CTranslate2's `beam` best (asked with length_penalty alpha/2, never 0: then its search stops as ours)
    re-ranked with our GNMT rule (inference/ctranslate2.py) are our beam search's translations. (With
    length_penalty alpha instead, beam 8 at alpha 1.0 lost one sentence here: more than 8 hypotheses
    finished, and CTranslate2's 8 best by log P / n left out the empty one that ours ranks first.)"""
    model, _, ids, _ = trained
    search = SearchConfig(beam=beam, alpha=alpha)
    ours = [hyps[0].tokens for hyps in beam_search(model, collate_source(ids), search)]
    theirs = CTranslate2Translator(exported, threads=1).translate_ids(ids, search)
    assert theirs == ours


@pytest.fixture(scope="module")
def int8_exported(trained_translation_dir, tmp_path_factory) -> Path:
    return _export(trained_translation_dir, tmp_path_factory.mktemp("ct2") / "int8", "--quantization", "int8")


def test_int8_export_agrees_more_than_our_own_int8(trained, int8_exported, exported):
    """int8 weights change the greedy output of this fragile tiny model on many sentences (its translations
    are long runs of half-learnt pieces with close log-probs). Of the 60, our own int8 (`DecodingModel`)
    keeps 21 on the Xeon and 27 on the AMD EPYC. The export with int8 weights in [-127, 127] kept 37 on
    the Xeon (Intel MKL) and 0 on the EPYC (oneDNN, whose AVX2 kernel saturates: issue #29); in
    [-64, 64], as now, it keeps 29 on the EPYC (not yet measured on the Xeon). Here, on either CPU: the
    export is stored in int8, keeps our greedy output at least as often as our own int8, and its
    log-probabilities of our translations stay within 0.05 of float32 on average (EPYC: 0.020 now,
    0.17 before)."""
    model, tokenizer, ids, greedy = trained
    assert json.loads((int8_exported / "transformer.json").read_text())["int8_max"] == 64
    assert (int8_exported / "model.bin").stat().st_size < 0.5 * (exported / "model.bin").stat().st_size
    theirs = CTranslate2Translator(int8_exported, threads=1).translate_ids(ids, SearchConfig(beam=1))
    torch_int8 = greedy_search(DecodingModel(model, quantize="int8"), collate_source(ids), SearchConfig(beam=1))
    agree = sum(a == b for a, b in zip(theirs, greedy))
    assert agree >= sum(a == b for a, b in zip(torch_int8, greedy))
    int8, fp32 = _log_probs(int8_exported, tokenizer, ids, greedy), _log_probs(exported, tokenizer, ids, greedy)
    gaps = [abs(a - b) for q, e in zip(int8, fp32) for a, b in zip(q, e)]
    assert sum(gaps) / len(gaps) < 0.05


_SCORE = """
import json, sys
from transformer.inference.ctranslate2 import CTranslate2Translator
translator = CTranslate2Translator(sys.argv[1], threads=1)
sources, targets = json.loads(sys.argv[2])
results = translator.translator.score_batch(sources, targets)
print(json.dumps({"backend": translator.backend, "log_probs": [r.log_probs for r in results]}))
"""


def _score_in_a_new_process(folder: Path, use_mkl: str | None, pieces: list) -> tuple[dict, str]:
    """(what `_SCORE` prints, CTranslate2's log) in a new Python that loads `folder` with CT2_USE_MKL=`use_mkl`
    (None: unset) and CT2_VERBOSE=1: CTranslate2 reads both when it is imported."""
    env = {k: v for k, v in os.environ.items() if k != "CT2_USE_MKL"} | {"CT2_VERBOSE": "1"}
    if use_mkl is not None:
        env["CT2_USE_MKL"] = use_mkl
    done = subprocess.run([sys.executable, "-c", _SCORE, str(folder), json.dumps(pieces)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.mark.skipif(cpu_vendor() is None, reason="CTranslate2 has two int8 backends on x86 CPUs only")
def test_both_int8_backends_compute_the_same_and_the_line_names_the_one_that_runs(int8_exported, trained):
    """With int8 weights in [-64, 64], oneDNN's int8 (CT2_USE_MKL=0) and Intel MKL's (=1) compute the same
    products: their log-probabilities agree to float rounding, on any CPU (EPYC: identical). With
    [-127, 127] weights they differed by up to 2.5 on the AMD EPYC. The backend line is the one CTranslate2 logs, also when
    CT2_USE_MKL is unset (its own choice: MKL on Intel CPUs, oneDNN on the others)."""
    _, tokenizer, ids, greedy = trained
    pieces = [[[tokenizer.id_to_piece(i) for i in x] for x in rows] for rows in (ids[:20], greedy[:20])]
    runs = {}
    for use_mkl in (None, "0", "1"):
        runs[use_mkl], log = _score_in_a_new_process(int8_exported, use_mkl, pieces)
        logged = {"MKL": "Intel MKL", "DNNL": "oneDNN"}[log.split("GEMM_S8 backend: ")[1].split()[0]]
        assert f"CTranslate2 int8 on {logged} (" in runs[use_mkl]["backend"], (runs[use_mkl]["backend"], log)
    assert "oneDNN" in runs["0"]["backend"] and "Intel MKL" in runs["1"]["backend"]
    onednn, mkl = (sum(runs[k]["log_probs"], []) for k in ("0", "1"))
    assert max(abs(a - b) for a, b in zip(onednn, mkl)) < 1e-3


def test_the_backend_line_warns_only_where_int8_can_saturate():
    amd, intel, avx2, vnni = "AuthenticAMD", "GenuineIntel", {"avx2"}, {"avx2", "avx512_vnni"}
    warns = "saturates"
    assert backend_line(amd, avx2, None, exact_grid=True) == "CTranslate2 int8 on oneDNN (CTranslate2's choice on AuthenticAMD)"
    assert warns in backend_line(amd, avx2, None, exact_grid=False)  # an older export, or a float32 one run as int8
    assert warns in backend_line(intel, avx2, "0", exact_grid=False)  # oneDNN on an Intel CPU without VNNI too
    assert warns not in backend_line(amd, vnni, None, exact_grid=False)  # VNNI adds in 32 bits
    assert backend_line(amd, avx2, "1", exact_grid=False) == "CTranslate2 int8 on Intel MKL (CT2_USE_MKL=1)"
    assert backend_line(intel, avx2, None, exact_grid=False) == "CTranslate2 int8 on Intel MKL (CTranslate2's choice on GenuineIntel)"
    assert backend_line(amd, avx2, "true", exact_grid=False).startswith("CTranslate2 int8 on Intel MKL")


def test_translate_says_which_int8_backend_runs(int8_exported, exported, multi30k_valid_en, tmp_path, capsys):
    """On stderr, once; not for float32. A float32 folder run as int8 is quantized by CTranslate2 on load,
    to [-127, 127]: the line says so where that saturates."""
    source = tmp_path / "in.en"
    source.write_text("\n".join(multi30k_valid_en[:3]) + "\n", encoding="utf-8")
    vendor, flags = cpu_vendor(), cpu_flags()
    mkl = os.environ.get("CT2_USE_MKL") or None
    lines = [say_flags(backend_line(vendor, flags, mkl, exact_grid=exact)) for exact in (True, False)]  # as flags
    for folder, extra, line in ((int8_exported, [], lines[0]), (exported, [], None),
                                (exported, ["--quantize", "int8"], lines[1])):
        assert main(["translate", "--model", str(folder), "--input", str(source), "--beam", "1", "--no-progress",
                     *extra]) == 0
        err = capsys.readouterr().err
        assert (err.count(line) == 1 if line else "CTranslate2 int8" not in err), err


def test_the_int8_weights_lie_on_the_grid_of_64_and_the_emulation_rounds_as_the_export_does(trained):
    """The export's int8 weights (int8 value / scale, layer by layer) are each row rounded to 64 / max|row|
    steps, within [-64, 64] (inference/ctranslate2.py says why); benchmarks/int8_bound.py's `round_rows`
    emulates that grid (levels=64), and CTranslate2's own converter's (127)."""
    model, tokenizer, _, _ = trained
    spec_file = importlib.util.spec_from_file_location("int8_bound", ROOT / "benchmarks" / "int8_bound.py")
    bound = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(bound)
    spec = TransformerConverter(model, [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)])._load()
    spec.validate()
    spec.optimize("int8")
    pairs = [(spec.encoder.layer[0].self_attention.linear[0], model.encoder.layers[0].self_attn.in_proj),
             (spec.encoder.layer[0].ffn.linear_0, model.encoder.layers[0].ffn.w1),
             (spec.decoder.layer[-1].ffn.linear_1, model.decoder.layers[-1].ffn.w2),
             (spec.decoder.embeddings, model.tgt_embed.tokens)]  # the tied matrix, stored once
    for theirs, ours in pairs:
        weight, scale = torch.from_numpy(theirs.weight.numpy()), torch.from_numpy(theirs.weight_scale.numpy())
        assert weight.dtype == torch.int8 and weight.abs().max() == 64
        emulated = bound.round_rows(ours.weight.detach(), levels=64)
        assert torch.allclose(weight.float() / scale[:, None], emulated, rtol=0, atol=1e-6)
        assert not torch.equal(emulated, ours.weight.detach())  # the rounding did something


def test_translate_and_evaluate_take_the_exported_folder(exported, trained_translation_dir, multi30k_valid_en,
                                                         tmp_path, capsys):
    source = tmp_path / "valid.en"
    source.write_text("\n".join(multi30k_valid_en[:20]) + "\n", encoding="utf-8")
    outputs = {}
    for name, model, extra in (("ours", trained_translation_dir, ()), ("auto", exported, ()),
                               ("engine", exported, ("--engine", "ctranslate2"))):
        outputs[name] = tmp_path / f"{name}.hyp"
        assert main(["translate", "--model", str(model), "--input", str(source), "--output", str(outputs[name]),
                     "--beam", "1", "--no-progress", *extra]) == 0
    texts = {name: path.read_text(encoding="utf-8") for name, path in outputs.items()}
    assert texts["auto"] == texts["ours"] == texts["engine"]
    assert main(["evaluate", "--model", str(exported), "--input", str(source), "--ref", str(outputs["ours"]),
                 "--beam", "1", "--json", "--no-progress"]) == 0
    assert '"bleu": 100.0' in capsys.readouterr().out


def test_empty_and_blank_lines_are_not_decoded_and_translate_to_empty_lines(exported, trained_translation_dir,
                                                                             multi30k_valid_en, monkeypatch):
    """Issue #31: through the Python interface and the server's engine, as ours; no empty source reaches
    CTranslate2."""
    import transformer
    from transformer.serve.engine import CTranslate2Engine

    translator, search = CTranslate2Translator(exported, threads=1), SearchConfig(beam=1)
    lines = [multi30k_valid_en[0], "", "  ", multi30k_valid_en[1]]
    alone = [translator.translate([line], search)[0] for line in (lines[0], lines[3])]
    sources, translate_ids = [], translator.translate_ids
    monkeypatch.setattr(translator, "translate_ids",
                        lambda ids, *a, **k: sources.extend(ids) or translate_ids(ids, *a, **k))
    assert translator.translate(lines, search) == [alone[0], "", "", alone[1]] and all(alone)
    assert sources == translator.tokenizer.encode([lines[0], lines[3]])
    sources.clear()
    assert CTranslate2Engine(translator, search, "ct2").translate_batch(["", " "], 1, 0.6) == ["", ""]
    assert sources == []
    expected = [alone[0], "", "", alone[1]]
    assert transformer.load(exported, threads=1).translate(lines, beam=1) == expected
    assert transformer.load(trained_translation_dir).translate(lines, beam=1) == expected  # ours


def test_the_readme_lines_translate_with_ctranslate2_and_sentencepiece_alone(exported, trained, multi30k_valid_en):
    """The five lines of docs/export.md (greedy here, to compare with our greedy)."""
    model_dir = str(exported)
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{model_dir}/tokenizer.model")
    translator = ctranslate2.Translator(model_dir, intra_threads=1)
    results = translator.translate_batch(sp.encode(multi30k_valid_en, out_type=str), beam_size=1,
                                         max_decoding_length=256)
    texts = [sp.decode(r.hypotheses[0]) for r in results]
    _, tokenizer, ids, greedy = trained
    ended = [i for i, (x, y) in enumerate(zip(ids, greedy)) if len(y) < len(x) + 1 + 50]  # ours stopped at EOS
    assert len(ended) >= 0.9 * len(ids)
    assert [texts[i] for i in ended] == [tokenizer.decode(greedy)[i] for i in ended]


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory) -> Path:
    """A tiny character LM trained 150 steps on the first 20,000 characters of Tiny Shakespeare."""
    text = tmp_path_factory.mktemp("lm") / "input.txt"
    text.write_text(tinyshakespeare_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = text.parent / "run"
    assert main(["lm", "train", "--text", str(text), "--out", str(out), "--preset", "tiny", "--block-size", "64",
                 "--batch-size", "16", "--max-steps", "150", "--lr", "3e-3", "--warmup", "20", "--dropout", "0",
                 "--valid-every", "150", "--eval-batches", "2", "--no-progress"]) == 0
    return out


def test_the_lm_through_the_generator_continues_as_ours(trained_lm, tmp_path):
    out = _export(trained_lm, tmp_path / "lm")
    model, cfg, tokenizer, _ = load_model_dir(trained_lm)
    generator = ctranslate2.Generator(str(out), intra_threads=1)
    prompts = ["First Citizen:\n", "ROMEO:\nWhat", "The king", "\n"]
    continuations = []
    for prompt in prompts:
        ids = tokenizer.encode([prompt])[0]
        n = cfg.max_len - len(ids)
        ours = sample(model, torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
        result = generator.generate_batch([[tokenizer.id_to_piece(i) for i in ids]], max_length=n, sampling_topk=1,
                                          include_prompt_in_result=False, end_token=[])[0]
        theirs = [tokenizer.piece_to_id(p) for p in result.sequences[0]]
        assert theirs == ours, prompt
        continuations.append(tuple(ours))
    assert len(set(continuations)) == len(prompts)  # not vacuous: the prompts lead to different text


def _model_dir(tmp_path: Path, **fields) -> Path:
    tokenizer = Tokenizer.train(["a man rides a horse .", "ein mann reitet ein pferd ."] * 20, 40)
    cfg = preset("tiny", **{"vocab_size": tokenizer.vocab_size, "n_encoder_layers": 1, "n_decoder_layers": 1} | fields)
    path = tmp_path / "model"
    save_model_dir(path, build_model(cfg), cfg, tokenizer.to_bytes())
    return path


@pytest.mark.parametrize("fields, feature", [
    ({"attn_window": 4}, "windowed attention (attn_window 4)"),
    ({"arch": "encoder", "n_decoder_layers": 0}, "encoder-only"),
])
def test_what_ctranslate2_cannot_express_is_refused_on_one_line(tmp_path, capsys, fields, feature):
    model = _model_dir(tmp_path, **fields)
    assert main(["export", "--model", str(model), "--to", "ctranslate2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert feature in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_pre_norm_untied_learned_position_models_export_exactly(tmp_path):
    """The spec says pre-norm (with its final LayerNorms), three separate matrices when untied, and the
    learned position table as it is."""
    model_dir = _model_dir(tmp_path, norm_first=True, tie_embeddings=False, positions="learned", dropout=0.0)
    out = _export(model_dir, tmp_path / "out")
    model, _, tokenizer, _ = load_model_dir(model_dir)
    x, y = tokenizer.encode(["a man rides a horse ."])[0], tokenizer.encode(["ein mann reitet"])[0]
    log_probs = _log_probs(out, tokenizer, [x], [y])[0]
    with torch.no_grad():
        logits = model(torch.tensor([x + [3]]), torch.tensor([[2] + y]))
    ours = torch.log_softmax(logits[0], dim=-1)[torch.arange(len(y) + 1), torch.tensor(y + [3])]
    assert torch.allclose(torch.tensor(log_probs), ours, atol=1e-4)


def test_bad_export_requests_are_one_line_errors(exported, trained_translation_dir, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "missing"), "--to", "ctranslate2", "--out", str(tmp_path / "a")], "missing"),
        (["--model", str(trained_translation_dir), "--to", "ctranslate2", "--out", str(exported)], "not empty"),
        (["--model", str(trained_translation_dir), "--to", "onnx", "--out", str(tmp_path / "b")], "--to"),
        (["--model", str(trained_translation_dir), "--to", "ctranslate2", "--out", str(tmp_path / "c"),
          "--quantization", "int4"], "--quantization"),
        (["--model", str(trained_translation_dir), "--to", "huggingface", "--out", str(tmp_path / "d"),
          "--quantization", "int8"], "--quantization"),
    ]
    for args, words in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    source = tmp_path / "in.en"
    source.write_text("A man.\n", encoding="utf-8")
    assert main(["translate", "--model", str(trained_translation_dir), "--engine", "ctranslate2",
                 "--input", str(source)]) == 2
    assert "not an exported CTranslate2 folder" in capsys.readouterr().err


def test_a_failed_export_leaves_no_folder(trained_translation_dir, tmp_path, capsys, monkeypatch):
    """The disk fills up halfway through CTranslate2's write: one line, exit 2, no --out, no temporary folder."""
    from transformer.export import ctranslate2 as exporter

    def convert(self, output_dir, **kwargs):
        (Path(output_dir) / "model.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter.TransformerConverter, "convert", convert)
    assert main(["export", "--model", str(trained_translation_dir), "--to", "ctranslate2",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
