"""`transformer import`: what every family shares, the folder reader's refusals and the command's.

The families' parity with Hugging Face is in test_import_marian.py, test_import_bert.py,
test_import_gpt2.py and test_import_vit.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transformer.cli import main
from transformer.errors import UserError
from transformer.pretrained import convert_folder
from transformer.pretrained.folder import HFFolder


def _folder(path: Path, config: dict | str | None, tensors: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / "model.safetensors"))
    return path


def _error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("config, tensors, message", [
    (None, None, "config.json: no such file (a Hugging Face model folder has one)"),
    ("{not json", None, "config.json: cannot read"),
    ("[1, 2]", None, "config.json: not a JSON object"),
    ({"model_type": "t5"}, {"x": torch.zeros(1)}, "model_type 't5' cannot be imported; the families are marian, "
                                                   "bert, gpt2, vit"),
    ({"model_type": "llama"}, {"x": torch.zeros(1)}, "model_type 'llama' cannot be imported"),
    ({"model_type": "gpt2"}, None, "no weights (model.safetensors, model.safetensors.index.json or "
                                   "pytorch_model.bin)"),
])
def test_the_folder_is_refused_in_one_line(tmp_path, capsys, config, tensors, message):
    hf = _folder(tmp_path / "hf", config, tensors)
    err = _error(["import", "--from", "huggingface", str(hf), "--out", str(tmp_path / "out")], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def test_damaged_weights_and_shards(tmp_path):
    hf = _folder(tmp_path / "hf", {"model_type": "gpt2"})
    (hf / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
        HFFolder.open(hf)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "part-1.safetensors"}}))
    with pytest.raises(UserError, match="part-1.safetensors: no such file"):
        HFFolder.open(hf)
    save_file({"a": torch.ones(2)}, str(hf / "part-1.safetensors"))
    assert torch.equal(HFFolder.open(hf).tensor("a", (2,)), torch.ones(2))
    with pytest.raises(UserError, match=r"tensor a has shape \(2,\), the config says \(3,\)"):
        HFFolder.open(hf).tensor("a", (3,))
    with pytest.raises(UserError, match="no tensor b in the weights"):
        HFFolder.open(hf).tensor("b")


def test_pytorch_model_bin_is_read_without_unpickling_code(tmp_path):
    hf = _folder(tmp_path / "hf", {"model_type": "gpt2"})
    torch.save({"a": torch.arange(3.0)}, hf / "pytorch_model.bin")
    assert torch.equal(HFFolder.open(hf).tensors["a"], torch.arange(3.0))

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"a": Evil()}, hf / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: cannot read"):
        HFFolder.open(hf)


def test_the_output_folder_must_be_new_or_empty(tmp_path, capsys):
    hf = _folder(tmp_path / "hf", {"model_type": "t5"}, {"x": torch.zeros(1)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _error(["import", str(hf), "--out", str(out)], capsys)
    assert f"--out {out}: already exists and is not an empty folder" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_a_hugging_face_folder_given_where_a_model_directory_is_needed(tmp_path, capsys):
    hf = _folder(tmp_path / "hf", {"model_type": "bert"}, {"x": torch.zeros(1)})
    data = _folder(tmp_path / "data", None)
    for split in ("train", "valid"):
        for lang, text in (("en", "A man."), ("de", "Ein Mann.")):
            (data / f"{split}.{lang}").write_text(text + "\n")
    err = _error(["train", "--data", str(data), "--src-lang", "en", "--tgt-lang", "de", "--out",
                  str(tmp_path / "run"), "--init", str(hf), "--no-progress"], capsys)
    assert f"{hf}: a Hugging Face folder, not a model directory; convert it with `transformer import" in err


def test_convert_folder_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nothing'}: no such directory"):
        convert_folder(tmp_path / "nothing")
