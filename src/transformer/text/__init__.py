"""Text: the sentencepiece tokenizer, reading files with clear errors, batching by length."""
