"""The tasks: translation, GPT-style LM, BERT-style MLM. Each gives the training loop its data, loss and validation."""
