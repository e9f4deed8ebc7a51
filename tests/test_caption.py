"""Image to text (model/captioner.py, tasks/caption.py): the Q-Former and Flamingo bridges to a frozen LM,
the plain encoder-decoder, caption decoding with the package's search and cache, and `transformer caption`."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from transformer.cli import main
from transformer.config import CaptionConfig, vision_preset
from transformer.images.captions import caption, compose
from transformer.images.data import bundled
from transformer.inference.captions import generate_ids
from transformer.model.captioner import QFormer, build_captioner, trained_parameters
from transformer.report.image_attention import caption_attention
from transformer.store.kinds import load_captioner
from transformer.tasks.caption import caption_ids, caption_loss
from transformer.store.kinds import load_vit
from transformer.store.modeldir import load_model_dir
from transformer.training.optim import OptimConfig, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
BRIDGES = ["qformer", "flamingo", "encoder-decoder"]


@pytest.fixture(scope="module")
def caption_lm(tmp_path_factory) -> Path:
    """A small character LM trained with `lm train` on 3,000 captions (about 10 s): the frozen LM. (A weaker one,
    d_model 32 and 150 steps, is hard to steer with a prefix: the Q-Former then needs thousands of steps.)"""
    root = tmp_path_factory.mktemp("caption_lm")
    rng = random.Random(0)
    text = "".join(caption([rng.randrange(10) for _ in range(rng.randint(2, 4))]) + "\n" for _ in range(3000))
    (root / "captions.txt").write_text(text, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["lm", "train", "--text", str(root / "captions.txt"), "--out", str(root / "lm"), "--preset", "tiny",
                     "--d-model", "64", "--n-heads", "4", "--d-ff", "128", "--layers", "2", "--dropout", "0",
                     "--block-size", "48", "--batch-size", "16", "--lr", "2e-3", "--warmup", "50", "--max-steps", "300",
                     "--valid-every", "300", "--eval-batches", "5", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "lm"


@pytest.fixture(scope="module")
def lm_parts(caption_lm):
    lm, cfg, tokenizer, _ = load_model_dir(caption_lm)
    return lm, cfg, tokenizer


def _config(lm_cfg, tokenizer, bridge: str, **changes) -> CaptionConfig:
    newline = tokenizer.piece_to_id("\n")
    vision = vision_preset("tiny", dropout=0.0, d_model=lm_cfg.d_model)  # of an 8x8 tile: a digit
    fields = dict(vision=vision, lm=lm_cfg, bridge=bridge, n_queries=16, bridge_layers=2, cross_every=1, max_len=24,
                  bos_id=newline, eos_id=newline, tiles=4)
    return CaptionConfig(**(fields | changes))


@pytest.fixture(scope="module")
def canvases():
    digits = bundled("digits")
    return compose(digits, 8, seed=0)


@pytest.mark.parametrize("n_patches", [1, 7, 40])
def test_qformer_gives_n_outputs_whatever_the_number_of_patches(n_patches):
    torch.manual_seed(0)
    qformer = QFormer(vision_preset("tiny").encoder_config(), n_queries=5, n_layers=4, cross_every=2)
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False, True, False]  # every other
    weights = {}
    out = qformer(torch.randn(3, n_patches, 32), weights)
    assert out.shape == (3, 5, 32)
    assert [tuple(w.shape) for w in weights["queries"]] == [(3, 2, 5, n_patches)] * 2


def test_flamingo_is_the_frozen_lm_at_the_start(lm_parts, canvases):
    """Gates at 0: the logits with the image are exactly the frozen LM's logits without it."""
    lm, lm_cfg, tokenizer = lm_parts
    torch.manual_seed(0)
    model = build_captioner(_config(lm_cfg, tokenizer, "flamingo"), lm).eval()
    images, captions = canvases
    tgt_in, _ = caption_ids(tokenizer, captions, model.cfg)
    with torch.no_grad():
        assert torch.equal(model(images, tgt_in), lm(tgt_in))
        assert not torch.equal(model.image_features(images), model.image_features(images.flip(-1)))  # not ignored...
        assert torch.equal(model(images.flip(-1), tgt_in), lm(tgt_in))  # ... but gated off


@pytest.mark.parametrize("bridge", ["qformer", "flamingo"])
def test_a_training_step_leaves_the_frozen_lm_bit_identical(lm_parts, canvases, bridge):
    lm, lm_cfg, tokenizer = lm_parts
    torch.manual_seed(0)
    model = build_captioner(_config(lm_cfg, tokenizer, bridge), lm).train()
    assert not model.lm.training  # frozen: no dropout either
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    bridge_before = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    optimizer, _ = make_optimizer(model, OptimConfig(lr=1e-2, warmup=0, weight_decay=0.1).resolve(32, None))
    images, captions = canvases
    loss, n = caption_loss(model, (images, *caption_ids(tokenizer, captions, model.cfg)))
    (loss / n).backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.lm.state_dict().items())
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, bridge_before[k])]
    assert any(k.startswith("vision.") for k in changed) and any("gate" in k or "qformer" in k for k in changed)
    assert trained_parameters(model) == sum(v.numel() for v in bridge_before.values()) < sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("bridge", BRIDGES)
def test_cached_caption_decoding_equals_full_recomputation(lm_parts, canvases, bridge):
    lm, lm_cfg, tokenizer = lm_parts
    torch.manual_seed(1)
    model = build_captioner(_config(lm_cfg, tokenizer, bridge), lm).eval()
    for module in model.modules():  # open the gates, so that the image matters
        if hasattr(module, "gate_attn"):
            torch.nn.init.constant_(module.gate_attn, 0.7), torch.nn.init.constant_(module.gate_ffn, -0.4)
    images, captions = canvases
    tgt_in, _ = caption_ids(tokenizer, captions, model.cfg)
    with torch.no_grad():
        full = model(images, tgt_in)  # (B, T, V)
        memory, mask = model.encode(images)
        cache = model.new_cache()
        steps = [model.project(model.decode(tgt_in[:, t : t + 1], memory, mask, cache)) for t in range(tgt_in.size(1))]
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        # the package's greedy search (cache) against greedy by full recomputation at every step
        searched = generate_ids(model, images)
        for image, ids in zip(images, searched):
            tokens = [model.cfg.bos_id]
            while len(tokens) < model.cfg.max_len:
                word = int(model(image[None], torch.tensor([tokens]))[0, -1].argmax())
                if word == model.cfg.eos_id:
                    break
                tokens.append(word)
            assert ids == tokens[1:]


@pytest.mark.parametrize("bridge", BRIDGES)
def test_each_captioner_overfits_one_small_batch(lm_parts, canvases, bridge):
    lm, lm_cfg, tokenizer = lm_parts
    torch.manual_seed(0)
    model = build_captioner(_config(lm_cfg, tokenizer, bridge), lm)
    images, captions = canvases
    batch = (images, *caption_ids(tokenizer, captions, model.cfg))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(1200):
        loss, n = caption_loss(model.train(), batch)
        optimizer.zero_grad()
        (loss / n).backward()
        optimizer.step()
        if step % 50 == 49 and tokenizer.decode(generate_ids(model.eval(), images)) == captions:
            break
    with torch.no_grad():
        assert tokenizer.decode(generate_ids(model.eval(), images)) == captions


@pytest.mark.parametrize("bridge", BRIDGES)
def test_caption_attention_covers_the_canvas_tile_by_tile(lm_parts, canvases, bridge):
    """One map per generated token (and the end) over the whole canvas: a distribution over its patches. The
    Q-Former's (to the queries, then from the queries to the patches) holds only the share of the LM's
    attention that goes to the prefix, not to the caption so far."""
    lm, lm_cfg, tokenizer = lm_parts
    torch.manual_seed(0)
    model = build_captioner(_config(lm_cfg, tokenizer, bridge), lm).eval()
    images, _ = canvases
    maps, labels, text = caption_attention(model, tokenizer, images[0])
    ids = generate_ids(model, images[:1])[0]
    assert maps.shape == (len(ids) + 1, 2, 8) and len(labels) == len(ids) + 1  # 4 tiles of 2 x 2 patches
    assert text == tokenizer.decode([ids])[0]
    total = maps.sum(dim=(1, 2))
    if bridge == "qformer":
        assert ((total > 0) & (total < 1 + 1e-5)).all()
    else:
        assert torch.allclose(total, torch.ones(len(ids) + 1), atol=1e-5)


def _digit_folder(root: Path, n: int) -> Path:
    digits = bundled("digits")
    for i in range(n):
        folder = root / str(int(digits.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i, 0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    return root


def test_caption_commands_end_to_end(caption_lm, tmp_path, capsys):
    folder = _digit_folder(tmp_path / "digits", 100)
    out = tmp_path / "run"
    assert main(["caption", "train", "--lm", str(caption_lm), "--images", str(folder), "--bridge", "flamingo",
                 "--out", str(out), "--max-steps", "20", "--valid-every", "20", "--batch-size", "8", "--no-progress",
                 "--cross-every", "1"]) == 0
    model, cfg, meta = load_captioner(out)
    assert cfg.bridge == "flamingo" and meta["caption"]["bridge"] == "flamingo"
    canvas = tmp_path / "canvas.png"
    images, _ = compose(bundled("digits"), 1, seed=5)
    Image.fromarray((images[0, 0] * 255).round().byte().numpy(), mode="L").save(canvas)
    capsys.readouterr()
    assert main(["caption", "generate", "--model", str(out), str(canvas), "--images", str(folder),
                 "--canvases", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{canvas}\t") and lines[-1].startswith("exact match ")
    assert lines[-1].endswith("on 20 held-out canvases")
    picture = tmp_path / "attention.png"
    assert main(["caption", "attention", "--model", str(out), str(canvas), "--out", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_caption_over_a_trained_vit_keeps_it_frozen(caption_lm, tmp_path):
    folder = _digit_folder(tmp_path / "digits", 100)
    assert main(["vit", "train", "--images", str(folder), "--out", str(tmp_path / "vit"), "--max-steps", "10",
                 "--valid-every", "10", "--batch-size", "8", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["caption", "train", "--lm", str(caption_lm), "--vit", str(tmp_path / "vit"), "--images", str(folder),
                 "--bridge", "qformer", "--n-queries", "8", "--out", str(out), "--max-steps", "10",
                 "--valid-every", "10", "--batch-size", "8", "--no-progress"]) == 0
    model, cfg, _ = load_captioner(out)
    vit, _, _ = load_vit(tmp_path / "vit")
    assert cfg.freeze_vision and cfg.tiles == 4 and cfg.image_size == (8, 32)
    assert all(torch.equal(a, b) for a, b in zip(model.vision.state_dict().values(), vit.encoder.state_dict().values()))
    assert trained_parameters(model) < sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in vit.encoder.parameters()) + 1


def test_caption_train_resume_continues_the_run_with_the_lm_frozen(caption_lm, tmp_path, capsys):
    folder = _digit_folder(tmp_path / "digits", 100)
    out = tmp_path / "run"
    args = ["caption", "train", "--lm", str(caption_lm), "--images", str(folder), "--bridge", "qformer",
            "--n-queries", "4", "--out", str(out), "--valid-every", "5", "--batch-size", "4", "--no-progress",
            "--decay-steps", "10"]
    assert main(args + ["--max-steps", "5"]) == 0
    assert main(args + ["--max-steps", "10"]) == 2  # a second run into the same folder is refused
    assert "already holds a training run" in capsys.readouterr().err
    assert main(args + ["--max-steps", "10", "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert (out / "checkpoints" / "step_00000010").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 10 and 5 in steps
    lm, _, _, _ = load_model_dir(caption_lm)
    model, _, _ = load_captioner(out / "checkpoints" / "step_00000010")
    assert all(torch.equal(a, b) for a, b in zip(model.lm.state_dict().values(), lm.state_dict().values()))


def test_caption_command_errors(caption_lm, tmp_path, capsys):
    assert main(["caption", "train", "--out", str(tmp_path / "r")]) == 2
    assert "--lm is required" in capsys.readouterr().err
    folder = tmp_path / "animals"
    (folder / "cat").mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "cat" / "a.png")
    assert main(["caption", "train", "--lm", str(caption_lm), "--images", str(folder), "--out", str(tmp_path / "r")]) == 2
    assert "captions need digit classes" in capsys.readouterr().err
    assert main(["caption", "train", "--lm", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    small = tmp_path / "wide.png"
    Image.new("L", (8, 8)).save(small)
    assert main(["caption", "generate", "--model", str(caption_lm), str(small)]) == 2
    assert "not a captioner; it holds a language model" in capsys.readouterr().err
