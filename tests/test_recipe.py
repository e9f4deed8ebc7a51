"""Named recipes (`transformer train --recipe small-data`): their values under a --config file's and the command
line's, and the quick start trained with its own."""

from pathlib import Path

import pytest

from transformer.cli import flags, main, parse
from transformer.cli.translation import RECIPES, _train_config
from transformer.tasks import translation

BASE = ["train", "--data", "d", "--out", "o"]


def test_the_recipe_gives_its_values_to_the_model_and_the_run() -> None:
    args = parse([*BASE, "--recipe", "small-data"])
    recipe = RECIPES["small-data"]
    model, cfg = flags.model_config(args), _train_config(args)
    assert model.d_model == 256 and model.dropout == recipe["dropout"]
    assert (cfg.vocab_size, cfg.max_tokens) == (recipe["vocab_size"], recipe["max_tokens"])
    loop = cfg.loop
    assert (loop.max_steps, loop.max_minutes, loop.valid_every, loop.keep_last) == (
        recipe["max_steps"], recipe["max_minutes"], recipe["valid_every"], recipe["keep_last"])
    assert (loop.optim.warmup, loop.optim.lr_scale) == (recipe["warmup"], recipe["lr_scale"])


def test_without_a_recipe_the_paper_defaults_stay() -> None:
    args = parse(BASE)
    assert (args.warmup, args.max_steps, args.dropout, args.max_tokens) == (4000, None, None, 4096)


def test_the_command_line_and_a_config_file_override_the_recipe(tmp_path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('recipe = "small-data"\nwarmup = 123\ndropout = 0.25\n')
    args = parse([*BASE, "--config", str(config), "--dropout", "0.3"])
    assert args.warmup == 123  # the file's value over the recipe's 800
    assert args.dropout == 0.3  # the command line's over both
    assert args.max_steps == RECIPES["small-data"]["max_steps"]  # the recipe's, named in the file


def test_an_unknown_recipe_is_one_line(capsys) -> None:
    assert main([*BASE, "--recipe", "big-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe" in err[0] and "small-data" in err[0]


def test_the_quick_start_trains_its_recipe(tmp_path, monkeypatch) -> None:
    """The quick start is `train --recipe quickstart` (small-data with dropout 0.1 and 400 warm-up updates)
    with its own time budget (stopped before training)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg, model_cfg, say=print):
        seen.update(cfg=cfg, model=model_cfg)
        raise Stop

    monkeypatch.setattr(translation, "train", fake_train)
    with pytest.raises(Stop):
        main(["translation", "quickstart", "--out", str(tmp_path / "q"), "--minutes", "3"])
    recipe = parse([*BASE, "--recipe", "quickstart"])
    assert seen["model"] == flags.model_config(recipe) and seen["model"].dropout == 0.1
    cfg, loop = seen["cfg"], seen["cfg"].loop
    assert loop.max_minutes == 3 and loop.out == Path(tmp_path / "q") and loop.optim.warmup == 400
    quick = RECIPES["quickstart"]
    assert (cfg.vocab_size, cfg.max_tokens, loop.optim, loop.valid_every) == (
        quick["vocab_size"], quick["max_tokens"], _train_config(recipe).loop.optim, quick["valid_every"])
    # the hour's recipe but for what 10 minutes change
    assert {k: v for k, v in quick.items() if RECIPES["small-data"][k] != v}.keys() == {
        "dropout", "warmup", "max_minutes", "keep_last"}
