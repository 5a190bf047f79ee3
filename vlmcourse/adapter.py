"""The image adapter: what the frozen image tokens go through before the Q-Former's cross-attention reads them.

Stage 1 trains it with the Q-Former; stage 2 hands both on (``stage2.QFormerConnector``), so it lives here, below
both.
"""
from __future__ import annotations

import math

import torch
from torch import nn

POSITION_INITS = ("zeros", "sincos")


def sincos_2d(num_tokens: int, hidden_size: int) -> torch.Tensor:
    """(num_tokens, hidden_size) fixed 2-D sine-cosine position codes of a square grid (as in MAE): half the
    channels code the row, half the column, each at hidden_size/4 frequencies; entries in [-1, 1]."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or hidden_size % 4:
        raise ValueError(f"sincos positions need a square grid and a width divisible by 4, "
                         f"got {num_tokens} tokens of width {hidden_size}")
    freqs = 1.0 / 10000 ** (torch.arange(hidden_size // 4) / (hidden_size // 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def code(coord):
        angles = coord.flatten()[:, None].float() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1)


class ImageAdapter(nn.Module):
    """LayerNorm and a learned position embedding on the frozen image tokens.

    CNN features carry no position signal of their own, and their scale is far
    from BERT's: both would make cross-attention's early steps blind. The position embedding starts at zero
    (``position_init="zeros"``), so a short run hardly moves it, or at 2-D sine-cosine codes ("sincos"), so the
    cross-attention can tell the cells apart from its first step (where captions name positions).
    """

    def __init__(self, num_tokens: int, hidden_size: int, position_init: str = "zeros"):
        super().__init__()
        if position_init not in POSITION_INITS:
            raise ValueError(f"unknown position_init {position_init!r}: choose one of {POSITION_INITS}")
        self.norm = nn.LayerNorm(hidden_size)
        start = sincos_2d(num_tokens, hidden_size)[None] if position_init == "sincos" else \
            torch.zeros(1, num_tokens, hidden_size)
        self.position = nn.Parameter(start)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if image_embeds.shape[1:] != self.position.shape[1:]:
            raise ValueError(f"image_embeds must be (B, {self.position.shape[1]}, {self.position.shape[2]}), "
                             f"got {tuple(image_embeds.shape)}")
        return self.norm(image_embeds.to(self.position.dtype)) + self.position
