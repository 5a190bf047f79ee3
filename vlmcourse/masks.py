"""Who may look at whom: the Q-Former's three self-attention masks, one per stage-1 objective.

Queries come first, then the text. ``"itc"`` (contrastive): queries see queries, text sees text; ``"itm"``
(matching): everything sees everything; ``"itg"`` (generation): queries see queries, text sees the queries and
the text up to itself (causal). Nobody reads padding.
"""
from __future__ import annotations

import torch

__all__ = ["MASK_TYPES", "self_attention_mask"]

MASK_TYPES = ("itc", "itm", "itg")


def self_attention_mask(mask_type: str, num_query_tokens: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Who may attend to whom in the Q-Former's self-attention.

    Args:
        mask_type: ``"itc"``, ``"itm"`` or ``"itg"`` (``None`` means ``"itm"``).
        num_query_tokens: Q, the number of query positions at the front.
        attention_mask: (B, T) text padding mask, 1/True = real token.

    Returns:
        (B, Q+T, Q+T) bool, ``mask[b, i, j]`` is True when position i may attend
        to position j. Rows and columns are ordered queries first, then text.
        Padding columns are always False (nobody reads padding).
    """
    if mask_type is None:
        mask_type = "itm"
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES} or None, got {mask_type!r}")
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, text_len), got shape {tuple(attention_mask.shape)}")
    B, T = attention_mask.shape
    Q = num_query_tokens
    device = attention_mask.device
    is_query = torch.arange(Q + T, device=device) < Q  # (Q+T,)

    if mask_type == "itm":
        # Bi-directional: queries and text exchange information freely.
        allowed = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
    elif mask_type == "itc":
        # Uni-modal: two separate encoders sharing weights. Queries never see the
        # text, so the image feature cannot cheat by reading the caption.
        allowed = is_query[:, None] == is_query[None, :]
    else:  # "itg"
        # Queries see only queries (they must summarise the image without the
        # answer); text sees every query and the text up to itself (causal).
        pos = torch.arange(Q + T, device=device)
        allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))

    # Padding: queries are always real; text columns follow attention_mask.
    real = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), attention_mask.bool()], dim=1)
    return allowed[None, :, :] & real[:, None, :]

