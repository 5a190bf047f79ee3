"""Connectors: what turns the frozen image encoder's patch tokens into the few vectors a soft prompt is made of.

- ``QFormerConnector``: the Q-Former's query outputs (BLIP-2), through the image adapter;
- ``MeanPoolConnector``, ``LinearConnector``: the baselines of notebook 06 (pooled cells; every patch, LLaVA's
  linear projector);
- ``PrecomputedConnector``: stands in for a frozen connector whose outputs were computed once;
- beyond BLIP-2 (notebook 08), each in its own file: ``flamingo.PerceiverResampler``, ``llava.MLPConnector``,
  ``instructblip.InstructQFormerConnector`` (``connector_from_config`` builds them by type, see ``ELSEWHERE``).

Each has ``num_tokens`` and ``to_config()``; ``connector_from_config`` rebuilds one (with fresh weights) from it,
as ``SoftPromptCaptioner.from_pretrained`` does (stage2.py).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from .adapter import ImageAdapter
from .qformer import QFormer, QFormerConfig


class MeanPoolConnector(nn.Module):
    """Baseline connector: average-pool the patch grid to a small grid, one token per cell."""

    def __init__(self, grid_size: tuple[int, int], pooled: int = 1):
        super().__init__()
        self.grid_size, self.pooled = tuple(grid_size), pooled
        self.num_tokens = pooled * pooled

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        h, w = self.grid_size
        b, n, d = image_embeds.shape
        if n != h * w:
            raise ValueError(f"expected {h * w} patch tokens for a {h}x{w} grid, got {n}")
        grid = image_embeds.transpose(1, 2).reshape(b, d, h, w)
        return nn.functional.adaptive_avg_pool2d(grid, self.pooled).flatten(2).transpose(1, 2)

    def to_config(self) -> dict:
        return {"type": "meanpool", "grid_size": list(self.grid_size), "pooled": self.pooled}


class LinearConnector(nn.Module):
    """LLaVA's linear projector (notebook 06's baseline): every patch token goes to the LLM through one linear layer,
    the captioner's ``proj``; the connector itself hands the patches on as they are (``llava.MLPConnector`` puts a
    Linear and a GELU before ``proj`` instead)."""

    def __init__(self, num_patches: int):
        super().__init__()
        self.num_tokens = num_patches

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds

    def to_config(self) -> dict:
        return {"type": "linear", "num_patches": self.num_tokens}


class PrecomputedConnector(nn.Module):
    """Stands in for a *frozen* connector whose outputs were computed once (``connector_outputs``).

    Its input is already the connector output (B, Q, C); it only checks the shape.
    """

    def __init__(self, num_tokens: int, size: int):
        super().__init__()
        self.num_tokens, self.size = num_tokens, size

    def forward(self, connector_output: torch.Tensor) -> torch.Tensor:
        if tuple(connector_output.shape[1:]) != (self.num_tokens, self.size):
            raise ValueError(f"expected precomputed connector outputs (B, {self.num_tokens}, {self.size}), "
                             f"got {tuple(connector_output.shape)}: pass connector_outputs(...), not image features")
        return connector_output

    def to_config(self) -> dict:
        return {"type": "precomputed", "num_tokens": self.num_tokens, "size": self.size}


class QFormerConnector(nn.Module):
    """The Q-Former's query outputs (B, Q, H): the image seen through Q learned questions."""

    def __init__(self, qformer: nn.Module, image_norm: nn.Module | None = None):
        super().__init__()
        self.qformer, self.image_norm = qformer, image_norm
        self.num_tokens = qformer.config.num_query_tokens

    def forward(self, image_embeds: torch.Tensor, **text) -> torch.Tensor:
        """``text``: the Q-Former's text inputs (input_ids, attention_mask, mask_type), for connectors whose
        queries also read text (instructblip.py); BLIP-2's read the image alone."""
        if self.image_norm is not None:
            image_embeds = self.image_norm(image_embeds)
        return self.qformer(image_embeds=image_embeds, **text).query_output

    def to_config(self) -> dict:
        norm = self.image_norm
        if norm is None:
            norm_config = None
        elif isinstance(norm, ImageAdapter):
            norm_config = {"type": "image_adapter", "num_tokens": norm.position.shape[1],
                           "hidden_size": norm.position.shape[2]}
        elif isinstance(norm, nn.LayerNorm):
            norm_config = {"type": "layernorm", "size": norm.normalized_shape[0], "eps": norm.eps}
        else:
            raise TypeError(f"cannot save an image_norm of type {type(norm).__name__}: "
                            f"use adapter.ImageAdapter, nn.LayerNorm or None")
        return {"type": "qformer", "qformer": self.qformer.config.to_dict(), "image_norm": norm_config}


# type -> (module, class) of the connectors beyond BLIP-2 (notebook 08); each class has ``from_config``
ELSEWHERE = {"resampler": ("flamingo", "PerceiverResampler"), "mlp": ("llava", "MLPConnector"),
             "instruct_qformer": ("instructblip", "InstructQFormerConnector")}


# the names models saved before 7 December 2026 carry (the same connectors, renamed after LLaVA's "linear" and "mlp")
LEGACY_TYPES = {"patch": "linear", "patch_mlp": "mlp"}


def connector_from_config(config: dict) -> nn.Module:
    """A connector with fresh weights, built from ``connector.to_config()`` (``from_pretrained`` loads them)."""
    kind = LEGACY_TYPES.get(config.get("type"), config.get("type"))
    if kind == "meanpool":
        return MeanPoolConnector(tuple(config["grid_size"]), config["pooled"])
    if kind == "linear":
        return LinearConnector(config["num_patches"])
    if kind == "precomputed":
        return PrecomputedConnector(config["num_tokens"], config["size"])
    if kind == "qformer":
        norm, norm_config = None, config.get("image_norm")
        if norm_config and norm_config["type"] == "image_adapter":
            norm = ImageAdapter(norm_config["num_tokens"], norm_config["hidden_size"])
        elif norm_config and norm_config["type"] == "layernorm":
            norm = nn.LayerNorm(norm_config["size"], eps=norm_config["eps"])
        elif norm_config:
            raise ValueError(f"unknown image_norm type {norm_config['type']!r}")
        return QFormerConnector(QFormer(QFormerConfig(**config["qformer"])), norm)
    if kind in ELSEWHERE:     # notebook 08's connectors live in their own files, which import this one
        module, name = ELSEWHERE[kind]
        return getattr(importlib.import_module(f".{module}", __package__), name).from_config(config)
    raise ValueError(f"unknown connector type {kind!r}: expected qformer, meanpool, linear, precomputed "
                     f"or {', '.join(ELSEWHERE)}")
