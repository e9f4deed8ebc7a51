"""Import of Hugging Face ViT classifiers (`ViTForImageClassification`) into our `ViT`.

Tiny random checkpoints written with `save_pretrained` (nothing is downloaded); the imported model
must give Hugging Face's logits, and the model directory must load and predict like one of ours.
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformer.cli import main  # noqa: E402
from transformer.errors import UserError  # noqa: E402
from transformer.pretrained import build, convert_folder  # noqa: E402

NAMES = ["cat", "dog", "bird", "fish", "frog"]


def _config(**changes) -> "transformers.ViTConfig":
    shape = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 37, "num_channels": 3, "id2label": dict(enumerate(NAMES)),
             "label2id": {n: i for i, n in enumerate(NAMES)}}
    return transformers.ViTConfig(**(shape | changes))


def _save(path, model_class=None, processor: dict | None = None, **changes):
    """A random HF ViT saved to `path` (with a preprocessor_config.json when `processor` is given); the model."""
    torch.manual_seed(0)
    model = (model_class or transformers.ViTForImageClassification)(_config(**changes)).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() > 1:  # weights of std 0.2, not 0.02: the image, not the [CLS] token, decides the class
                p.mul_(10)
    model.save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


def _hf_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def _ours(path) -> torch.nn.Module:
    return build(convert_folder(path))


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("channels", [3, 1])
def test_logits_equal_huggingface(tmp_path, channels):
    hf = _save(tmp_path, num_channels=channels)
    x = torch.rand(4, channels, 32, 32)
    with torch.no_grad():
        ours = _ours(tmp_path)(x)
    assert (ours - _hf_logits(hf, x)).abs().max() < 1e-4


def test_weights_are_copied_exactly_without_qkv_bias(tmp_path):
    from safetensors.torch import load_file

    hf = _save(tmp_path, qkv_bias=False, hidden_act="gelu_new")
    converted = convert_folder(tmp_path)
    state, theirs = converted.state, load_file(tmp_path / "model.safetensors")  # the checkpoint's names
    assert not any(name.endswith("query.bias") for name in theirs)
    assert converted.config.activation == "gelu_tanh" and converted.config.layer_norm_eps == 1e-12
    assert torch.equal(state["encoder.patch_embed.proj.weight"],
                       theirs["vit.embeddings.patch_embeddings.projection.weight"].reshape(32, -1))
    fused = state["encoder.encoder.layers.1.self_attn.in_proj.weight"]
    assert torch.equal(fused[32:64], theirs["vit.encoder.layer.1.attention.attention.key.weight"])
    assert torch.equal(state["encoder.encoder.layers.1.self_attn.in_proj.bias"], torch.zeros(96))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (build(converted)(x) - _hf_logits(hf, x)).abs().max() < 1e-4


def test_processor_normalisation_is_folded_into_the_patches(tmp_path):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    hf = _save(tmp_path, processor={"image_processor_type": "ViTImageProcessor", "do_rescale": True,
                                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
                                    "image_std": std, "size": {"height": 32, "width": 32}})
    x = torch.rand(3, 3, 32, 32)  # ours: pixels / 255
    normalised = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        assert (_ours(tmp_path)(x) - _hf_logits(hf, normalised)).abs().max() < 1e-4
    record = convert_folder(tmp_path).meta["vit"]["preprocessing"]
    assert record["processor"]["image_mean"] == mean and len(record["folded"]["scale"]) == 3


def test_load_and_predict_like_the_huggingface_processor(tmp_path, capsys):
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    import transformer
    from transformer.api.vision import ImageClassifier

    hf = _save(tmp_path / "hf")
    with warnings.catch_warnings():  # no torchvision: the Pillow backend, said in a warning
        warnings.simplefilter("ignore")
        processor = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "as a vit model" in capsys.readouterr().err
    classifier = transformer.load(tmp_path / "run")
    assert isinstance(classifier, ImageClassifier) and classifier.classes == NAMES

    rng = np.random.default_rng(0)
    images = [pil.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    logits = _hf_logits(hf, processor(images=images, return_tensors="pt").pixel_values)
    assert len(set(logits.argmax(-1).tolist())) > 1  # not one class for all
    predicted = classifier.predict(images)
    assert [name for name, _ in predicted] == [NAMES[i] for i in logits.argmax(-1).tolist()]
    probs = logits.softmax(-1).max(-1).values.tolist()
    assert [p for _, p in predicted] == pytest.approx(probs, abs=1e-4)

    file = tmp_path / "image.png"
    images[0].save(file)
    assert main(["vit", "predict", "--model", str(tmp_path / "run"), str(file)]) == 0
    assert capsys.readouterr().out.split("\t")[1] == predicted[0][0]


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu': the activations imported are gelu, "),
    ({"image_size": 30}, "image_size 30: not a whole number of patches of 8x8"),
    ({"patch_size": [8, 4]}, r"patch_size \[8, 4\]: our ViT takes square patches only"),
    ({"num_attention_heads": 5}, "d_model=32 is not divisible by n_heads=5"),
])
def test_refuses_options(tmp_path, changes, message):
    _save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message) as error:
        convert_folder(tmp_path)
    assert "\n" not in str(error.value)


def test_refuses_checkpoints_without_a_classifier(tmp_path):
    _save(tmp_path / "bare", transformers.ViTModel)
    with pytest.raises(UserError, match="a ViTModel without a classification head") as error:
        convert_folder(tmp_path / "bare")
    assert "\n" not in str(error.value)
    _save(tmp_path / "mim", transformers.ViTForMaskedImageModeling)
    with pytest.raises(UserError, match="ViTForMaskedImageModeling checkpoint"):
        convert_folder(tmp_path / "mim")


def test_refuses_wrong_shapes_and_processors(tmp_path):
    from safetensors.torch import load_file, save_file

    _save(tmp_path, processor={"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    with pytest.raises(UserError, match=r"image_mean \[0.5, 0.5\]: expected 3 number\(s\), one per channel"):
        convert_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["vit.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(36, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"tensor vit.encoder.layer.1.intermediate.dense.weight has shape \(36, 32\)"):
        convert_folder(tmp_path)
