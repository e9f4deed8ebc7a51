"""A BERT-style encoder with a classifier on top: texts and text pairs in, label logits out.

Fine-tuning as Devlin et al. (2019), section 4 (and Figure 4 a, b): the pre-trained embeddings and
encoder layers of an `EncoderOnly` (not its masked-LM head), and one new linear layer on a vector of
the whole sequence, with dropout before it. The vector (`pool`):

- ``cls``: the encoder's output at [CLS] (position 0). When the pre-trained model has BERT's pooler
  (`ModelConfig.next_sentence`: dense and tanh on [CLS], trained by next-sentence prediction), its
  output, as BERT classifies;
- ``mean``: the mean of the encoder's outputs over the real tokens ([CLS] and [SEP] included, padding not).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.model.attention import padding_mask
from transformer.model.dropout import Dropout
from transformer.model.models import Embedding, Encoder, EncoderOnly, init_weights

POOLS = ("cls", "mean")


class EncoderClassifier(nn.Module):
    """Embeddings, encoder, [BERT's pooler,] dropout, a linear head: (B, T) ids -> (B, n_labels) logits.

    The submodules carry `EncoderOnly`'s names (`embed`, `encoder`, `pooler`), so that the weights of a
    pre-trained encoder load by name (`from_encoder`).
    """

    def __init__(self, cfg: ModelConfig, n_labels: int, pool: str = "cls") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: choose cls or mean")
        self.cfg, self.pool, self.n_labels = cfg, pool, n_labels
        self.embed = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.next_sentence and pool == "cls" else None
        self.dropout = Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, n_labels)
        self.frozen = False  # a linear probe: the encoder neither trains nor drops out (`freeze_encoder`)

    def features(self, tokens: Tensor, segments: Tensor | None = None) -> Tensor:
        """tokens (B, T), segments (B, T) or None (all 0) -> the pooled vector (B, d_model)."""
        h = self.encoder(self.embed(tokens, segments=segments), padding_mask(tokens, self.cfg.pad_id))  # (B, T, d)
        if self.pool == "mean":
            keep = (tokens != self.cfg.pad_id).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            return (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return torch.tanh(self.pooler(h[:, 0])) if self.pooler is not None else h[:, 0]

    def forward(self, tokens: Tensor, segments: Tensor | None = None) -> Tensor:
        """tokens (B, T), segments (B, T) or None -> logits (B, n_labels)."""
        return self.head(self.dropout(self.features(tokens, segments)))

    def encoder_modules(self) -> list[nn.Module]:
        """What the pre-trained model gave: the embeddings, the encoder layers, and the pooler if any."""
        return [m for m in (self.embed, self.encoder, self.pooler) if m is not None]

    def freeze_encoder(self) -> None:
        """Train the head only (a linear probe on the pre-trained features, which stay in eval mode)."""
        self.frozen = True
        for module in self.encoder_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EncoderClassifier":
        super().train(mode)
        if self.frozen:
            for module in self.encoder_modules():
                module.eval()
        return self


def from_encoder(encoder: EncoderOnly, n_labels: int, pool: str = "cls", dropout: float | None = None
                 ) -> EncoderClassifier:
    """A classifier holding the weights of `encoder`'s embeddings, layers (and pooler), with a new head
    (Xavier-uniform, zero bias: `init_weights`); the masked-LM head and next-sentence classifier are left.
    `dropout`: instead of the encoder's (`ModelConfig.dropout`, also the one before the head)."""
    cfg = encoder.cfg if dropout is None else encoder.cfg.replace(dropout=dropout)
    model = EncoderClassifier(cfg, n_labels, pool)
    init_weights(model)
    own = model.state_dict()
    weights = {k: v for k, v in encoder.state_dict().items() if k in own and not k.startswith("head.")}
    missing = [k for k in own if k not in weights and not k.startswith("head.")]
    if missing:
        raise ValueError(f"the encoder lacks {missing[:3]}")
    model.load_state_dict(weights, strict=False)
    return model.to(next(encoder.parameters()).device)
