"""Using a trained model: greedy and beam search, sampling, the fast-decoding runtime, text in and out."""
