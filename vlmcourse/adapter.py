"""The image adapter: what the frozen image tokens go through before the Q-Former's cross-attention reads them.

Stage 1 trains it with the Q-Former; stage 2 hands both on (``stage2.QFormerConnector``), so it lives here, below
both.
"""
from __future__ import annotations

import torch
from torch import nn


class ImageAdapter(nn.Module):
    """LayerNorm and a learned position embedding on the frozen image tokens.

    CNN features carry no position signal of their own, and their scale is far
    from BERT's: both would make cross-attention's early steps blind.
    """

    def __init__(self, num_tokens: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.shape[1:] != self.position.shape[1:]:
            raise ValueError(f"image_embeds must be (B, {self.position.shape[1]}, {self.position.shape[2]}), "
                             f"got {tuple(image_embeds.shape)}")
        return self.norm(image_embeds.to(self.position.dtype)) + self.position
