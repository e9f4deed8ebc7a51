"""An image classifier (ViT) as images in, classes out."""

from __future__ import annotations

import torch

from transformer.model.vision import ViT


@torch.no_grad()
def predict(model: ViT, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, C, H, W) -> (predicted class (N,), its probability (N,))."""
    device = next(model.parameters()).device
    probs = torch.cat([model(images[i : i + batch_size].to(device)).float().softmax(-1).cpu()
                       for i in range(0, len(images), batch_size)])
    best = probs.max(dim=-1)
    return best.indices, best.values
