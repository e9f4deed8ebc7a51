"""The Python interface: `load` any model the package writes and use it (`Translator`, `LanguageModel`,
`MaskedLM`, `ImageClassifier`, `Captioner`), or `train` one; `transformer/__init__.py` re-exports it."""
