"""LLaVA's connectors: every patch token goes to the LLM, through a linear projection or a 2-layer MLP.

LLaVA (Liu et al., 2023) has no Q-Former: each of the N patch tokens becomes one soft prompt, and only a
projection stands between the image encoder and the LLM. LLaVA-1.5 made that projection a 2-layer MLP
(Linear, GELU, Linear). ``SoftPromptCaptioner`` already ends with a linear projection (``proj``), so

- "linear": ``connectors.LinearConnector`` (the patches as they are) followed by ``proj``;
- "mlp": ``MLPConnector`` (the MLP's first Linear and its GELU) followed by ``proj`` (its second Linear).

``llava_connector(kind, ...)`` returns the connector and the width ``proj`` then reads::

    connector, size = llava_connector("mlp", num_patches=49, image_size=1280, llm_hidden_size=576)
    model = SoftPromptCaptioner(connector, size, llm)
"""
from __future__ import annotations

import torch
from torch import nn

from .adapter import ImageAdapter
from .connectors import LinearConnector

KINDS = ("linear", "mlp")


class MLPConnector(nn.Module):
    """Every patch token through Linear(image_size, hidden_size) and GELU: the first half of LLaVA-1.5's MLP.

    ``image_adapter=True``: the patches first go through the Q-Former's ``adapter.ImageAdapter`` (LayerNorm, plus a
    learned position embedding that starts at 2-D sin-cos codes). LLaVA's CLIP ViT hands over patches that are
    layer-normed and know where they are; a CNN's grid features are neither, and the LLM would have to learn each
    patch's place from the order of the soft prompts alone."""

    def __init__(self, num_patches: int, image_size: int, hidden_size: int, image_adapter: bool = False):
        super().__init__()
        self.num_tokens = num_patches
        self.adapter = ImageAdapter(num_patches, image_size, "sincos") if image_adapter else None
        self.fc = nn.Linear(image_size, hidden_size)
        self.act = nn.GELU()

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        if tuple(image_embeds.shape[1:]) != (self.num_tokens, self.fc.in_features):
            raise ValueError(f"image_embeds must be (B, {self.num_tokens}, {self.fc.in_features}), "
                             f"got {tuple(image_embeds.shape)}")
        x = image_embeds.to(self.fc.weight.dtype)
        return self.act(self.fc(x if self.adapter is None else self.adapter(x)))

    def to_config(self) -> dict:
        return {"type": "mlp", "num_patches": self.num_tokens, "image_size": self.fc.in_features,
                "hidden_size": self.fc.out_features, "image_adapter": self.adapter is not None}

    @classmethod
    def from_config(cls, config: dict) -> "MLPConnector":
        return cls(config["num_patches"], config["image_size"], config["hidden_size"],
                   config.get("image_adapter", False))


def llava_connector(kind: str, num_patches: int, image_size: int, llm_hidden_size: int,
                    image_adapter: bool = False) -> tuple[nn.Module, int]:
    """(connector, connector_size) for ``SoftPromptCaptioner(connector, connector_size, llm)``.

    "linear": the patches themselves (width ``image_size``); the captioner's ``proj`` is the whole projection.
    "mlp": the MLP's first layer and GELU, as wide as the LLM (as in LLaVA-1.5); ``proj`` is its second layer;
    ``image_adapter``: LayerNorm and positions first (``MLPConnector``).
    """
    if kind == "linear":
        if image_adapter:
            raise ValueError("image_adapter is an option of the 'mlp' connector")
        return LinearConnector(num_patches), image_size
    if kind == "mlp":
        return MLPConnector(num_patches, image_size, llm_hidden_size, image_adapter), llm_hidden_size
    raise ValueError(f"unknown LLaVA connector {kind!r}: choose one of {KINDS}")


def projection_parameters(kind: str, image_size: int, llm_hidden_size: int) -> int:
    """Trainable parameters of the projection: D*H + H (linear), and H*H + H more for the MLP's second layer."""
    if kind not in KINDS:
        raise ValueError(f"unknown LLaVA connector {kind!r}: choose one of {KINDS}")
    linear = image_size * llm_hidden_size + llm_hidden_size
    return linear if kind == "linear" else linear + llm_hidden_size * llm_hidden_size + llm_hidden_size
