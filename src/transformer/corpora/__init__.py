"""Corpora shipped inside the package, so that the quick start needs no download.

``multi30k/`` holds the Multi30k Task 1 English-German splits (``train``, ``valid``,
``test2016``, each as ``.en`` and ``.de``); its README gives the source, the citation
and the licence terms (research and educational use only). ``tinyshakespeare/input.txt``
is Tiny Shakespeare (public domain text), for the character-level language model.
"""

from importlib.resources import files
from pathlib import Path


def multi30k_dir() -> Path:
    """The folder holding the vendored Multi30k files, e.g. ``multi30k_dir() / "train.de"``."""
    return Path(str(files(__name__) / "multi30k"))


def tinyshakespeare_path() -> Path:
    """The vendored Tiny Shakespeare text (1,115,394 bytes), for `transformer lm train --text`."""
    return Path(str(files(__name__) / "tinyshakespeare" / "input.txt"))
