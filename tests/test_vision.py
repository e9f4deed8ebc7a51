"""The ViT (model/vision.py), image data (images/), ViT training and the `transformer vit` commands."""

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from transformer.cli import main
from transformer.config import vision_preset
from transformer.errors import UserError
from transformer.images.captions import caption, compose
from transformer.images.data import ImageSet, bundled, random_affine, read_folder, split
from transformer.model.layers import sinusoid_table
from transformer.model.vision import PatchEmbedding, build_vit, patches, sinusoid_table_2d
from transformer.report.image_attention import vit_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patches_are_the_image_blocks_row_by_row():
    images = torch.randn(2, 3, 8, 12)
    out = patches(images, 4)  # (B, N, C·P·P): 2 rows of 3 patches
    assert out.shape == (2, 6, 3 * 16)
    for k in range(6):
        r, c = divmod(k, 3)
        assert torch.equal(out[:, k], images[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(2, -1))
    embed = PatchEmbedding(vision_preset("tiny", image_height=8, image_width=12, channels=3))
    assert embed(images).shape == (2, 6, 32)


def test_2d_sinusoidal_positions_encode_row_and_column():
    table = sinusoid_table_2d(3, 5, 16)
    assert table.shape == (15, 16)
    for r in range(3):
        for c in range(5):
            assert torch.equal(table[5 * r + c, :8], sinusoid_table(3, 8)[r])
            assert torch.equal(table[5 * r + c, 8:], sinusoid_table(5, 8)[c])
    assert len({tuple(row.tolist()) for row in table}) == 15  # every patch its own position


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_cls_pooling_reads_the_first_token(positions):
    torch.manual_seed(0)
    cfg = vision_preset("tiny", positions=positions, dropout=0.0)
    model = build_vit(cfg).eval()
    images = torch.rand(3, 1, 8, 8)
    features = model.encoder(images)
    assert features.shape == (3, 1 + cfg.n_patches, cfg.d_model)  # [CLS] first
    assert torch.allclose(model(images), model.head(features[:, 0]), atol=1e-6)
    mean = build_vit(cfg.replace(pool="mean")).eval()
    assert mean.encoder(images).shape == (3, cfg.n_patches, cfg.d_model)
    assert mean(images).shape == (3, cfg.n_classes)


def test_positions_make_the_vit_see_where_patches_are():
    """Without positions self-attention is blind to order: moving patches leaves a mean-pooled ViT's output
    unchanged. With positions it changes."""
    torch.manual_seed(0)
    cfg = vision_preset("tiny", pool="mean", dropout=0.0, image_width=16)
    model = build_vit(cfg).eval()
    images = torch.rand(2, 1, 8, 16)
    swapped = torch.cat([images[..., 4:8], images[..., 0:4], images[..., 8:]], dim=-1)  # patches 0 and 1 trade places
    assert not torch.allclose(model(images), model(swapped), atol=1e-4)
    with torch.no_grad():
        model.encoder.positions.zero_()
    assert torch.allclose(model(images), model(swapped), atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_attention_maps_one_grid_per_layer(pool):
    torch.manual_seed(0)
    model = build_vit(vision_preset("tiny", pool=pool, image_width=16, dropout=0.0))
    maps, labels, label = vit_attention(model, torch.rand(1, 8, 16))
    assert maps.shape == (2, 2, 4) and labels == ["layer 1", "layer 2"] and 0 <= label < 10
    total = maps.sum(dim=(1, 2))  # the query's attention to the patches: all of it, less what [CLS] keeps
    assert ((total > 0) & (total <= 1 + 1e-5)).all()
    assert torch.allclose(total, torch.ones(2), atol=1e-5) == (pool == "mean")


def test_vision_config_errors():
    with pytest.raises(UserError, match="patch_size 3: must divide the image size 8x8"):
        vision_preset("tiny", patch_size=3)
    with pytest.raises(UserError, match="pool 'max'"):
        vision_preset("tiny", pool="max")
    with pytest.raises(UserError, match="unknown vision preset"):
        vision_preset("huge")


def test_vit_overfits_one_small_batch():
    torch.manual_seed(0)
    model = build_vit(vision_preset("tiny", dropout=0.0))
    images, labels = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (model(images).argmax(-1) == labels).all()


def _write_pngs(folder: Path, images: torch.Tensor, labels: list[str]) -> list[Path]:
    files = []
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        file = folder / label / f"{i}.png"
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(file)
        files.append(file)
    return files


def test_read_folder_reads_classes_and_pixels(tmp_path):
    images = torch.randint(0, 256, (5, 1, 8, 8)).float() / 255
    _write_pngs(tmp_path, images, ["cat", "dog", "cat", "emu", "dog"])
    data = read_folder(tmp_path)
    assert data.classes == ("cat", "dog", "emu")
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1, 2]
    # each image read back exactly (8-bit PNG) under its class
    for image, label in zip(images, ["cat", "dog", "cat", "emu", "dog"]):
        k = next(i for i in range(5) if torch.equal(data.images[i], image))
        assert data.classes[data.labels[k]] == label


def test_read_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        read_folder(tmp_path / "nope")
    with pytest.raises(UserError, match="no class subfolders"):
        read_folder(tmp_path)
    _write_pngs(tmp_path, torch.zeros(1, 1, 8, 8), ["a"])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"b/x.png: not an image Pillow can read"):
        read_folder(tmp_path)
    Image.new("L", (6, 8)).save(tmp_path / "b" / "x.png")
    with pytest.raises(UserError, match=r"x.png: 6x8 pixels; expected 8x8"):
        read_folder(tmp_path)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'transformer\[vision\]'"):
        bundled("digits")


def test_bundled_sets_and_the_fixed_split():
    digits = bundled("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and float(digits.images.max()) == 1.0
    parts = split(len(digits), (0.2, 0.1))
    assert [len(p) for p in parts] == [359, 180, 1258]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(1797))  # disjoint, complete
    assert all(torch.equal(a, b) for a, b in zip(parts, split(len(digits), (0.2, 0.1))))  # fixed


def test_random_affine_moves_turns_and_scales_within_the_limits():
    generator = torch.Generator().manual_seed(0)
    dot = torch.zeros(64, 1, 9, 9)
    dot[:, 0, 4, 4] = 1.0
    assert torch.equal(random_affine(dot, generator, 0, 0, 0), dot)  # nothing asked: unchanged
    moved = random_affine(dot, generator, shift=2)
    rows, cols = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    mass = moved[:, 0].sum((1, 2))
    centre_r, centre_c = (moved[:, 0] * rows).sum((1, 2)) / mass, (moved[:, 0] * cols).sum((1, 2)) / mass
    assert torch.allclose(mass, torch.ones(64), atol=1e-5)  # a shift keeps the dot whole
    assert ((centre_r - 4).abs() <= 2 + 1e-5).all() and ((centre_c - 4).abs() <= 2 + 1e-5).all()
    assert centre_r.std() > 0.5 and centre_c.std() > 0.5  # and it does move
    bar = torch.zeros(64, 1, 9, 9)
    bar[:, 0, 1:8, 4] = 1.0  # vertical; turned by up to 90 degrees it leans, but stays centred
    turned = random_affine(bar, generator, shift=0, rotate=90)
    assert torch.allclose(turned[:, 0, 4, 4], torch.ones(64))
    assert (turned[:, 0, :, 4].sum(1) < 7 - 0.5).float().mean() > 0.5  # most lean off the column
def test_composed_canvases_show_their_captions():
    digits = ImageSet(torch.arange(10).float().view(10, 1, 1, 1).expand(10, 1, 2, 2) / 10 + 0.05,
                      torch.arange(10), tuple(str(i) for i in range(10)))  # digit d: a 2x2 block of value d/10 + .05
    canvases, captions = compose(digits, 50, seed=0)
    assert canvases.shape == (50, 1, 2, 8)
    for canvas, text in zip(canvases, captions):
        shown = [round(float(canvas[0, 0, 2 * k]) * 10 - 0.5) for k in range(4) if canvas[0, 0, 2 * k] > 0]
        assert text == caption(shown)
    assert caption([7, 2]) == "a 7 left of a 2" and caption([4, 1, 9]) == "three digits: 4 1 9"
    assert {len(c.split(":")[-1].split()) for c in captions if ":" in c} == {3, 4}


def test_vit_commands_end_to_end(tmp_path, capsys):
    digits = bundled("digits")
    files = _write_pngs(tmp_path / "images", digits.images[:60], [str(int(y)) for y in digits.labels[:60]])
    out = tmp_path / "run"
    assert main(["vit", "train", "--images", str(tmp_path / "images"), "--out", str(out), "--max-steps", "30",
                 "--valid-every", "30", "--no-progress", "--batch-size", "16", "--pool", "mean", "--decay-steps", "40"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "log.jsonl").is_file()
    capsys.readouterr()
    assert main(["vit", "predict", "--model", str(out), str(files[0]), str(files[1]),
                 "--images", str(tmp_path / "images")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{files[0]}\t") and lines[0].split("\t")[1] in "0123456789"
    assert lines[-1].startswith("accuracy ") and "on 60 images" in lines[-1]
    picture = tmp_path / "maps" / "vit.png"
    assert main(["vit", "attention", "--model", str(out), str(files[0]), "--out", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run into the same folder is refused; --resume continues it
    assert main(["vit", "train", "--images", str(tmp_path / "images"), "--out", str(out), "--max-steps", "30"]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["vit", "train", "--images", str(tmp_path / "images"), "--out", str(out), "--max-steps", "40",
                 "--valid-every", "30", "--no-progress", "--batch-size", "16", "--pool", "mean", "--decay-steps", "40",
                 "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err and (out / "checkpoints" / "step_00000040").is_dir()


def test_vit_command_errors(tmp_path, capsys):
    assert main(["vit", "train", "--out", str(tmp_path / "run")]) == 2
    assert "--images DIR or --bundled NAME" in capsys.readouterr().err
    assert main(["vit", "predict", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a model directory" in err and len(err.splitlines()) == 1
    assert main(["vit", "train", "--bundled", "digits", "--patch-size", "3", "--out", str(tmp_path / "r")]) == 2
    assert "patch_size 3: must divide" in capsys.readouterr().err
