"""Corpora shipped inside the package, so that the quick start needs no download.

``multi30k/`` holds the Multi30k Task 1 English-German splits (``train``, ``valid``,
``test2016``, each as ``.en`` and ``.de``); its README gives the source, the citation
and the licence terms (research and educational use only).
"""

from importlib.resources import files
from pathlib import Path


def multi30k_dir() -> Path:
    """The folder holding the vendored Multi30k files, e.g. ``multi30k_dir() / "train.de"``."""
    return Path(str(files(__name__) / "multi30k"))
