"""A Vision Transformer (ViT) in one readable file.

An image becomes a sequence of tokens in four steps:

    pixel_values (B, C, H, W)
      -> patches          (B, N, P*P*C)   cut into an h x w grid of P x P patches, N = h*w
      -> patch tokens     (B, N, D)       one linear layer per patch (= a stride-P convolution)
      -> + [CLS], + pos   (B, N+1, D)     a learned summary token and "where am I" vectors
      -> transformer      (B, N+1, D)     pre-LayerNorm blocks: attention, then an MLP

The layers follow Hugging Face's `transformers.ViTModel` exactly, so
`reference.load_hf_vit(hf_model)` copies its weights (with an explicit key
mapping) and gives the same outputs. Cutting images into patches is in
patches.py, the notebook's figures in plots.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .patches import check_images

__all__ = ["ViTConfig", "ViTOutput", "PatchEmbedding", "sincos_2d_position_embedding", "position_similarity",
           "ViTEmbeddings", "Attention", "MLP", "Block", "ViT"]


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclass
class ViTConfig:
    """Sizes of a ViT, with the names Hugging Face's `ViTConfig` uses.

    The defaults are ViT-B/16: 224 px images, 16 px patches, 768-d tokens.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # "gelu" (exact, as HF ViT), "gelu_tanh" or "quick_gelu" (CLIP)
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    position_embedding: str = "learned"  # "learned" or "sincos" (fixed 2-D sine-cosine)
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}: "
                f"use an image_size that is a multiple of {self.patch_size}, "
                f"e.g. {self.image_size // self.patch_size * self.patch_size}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must split evenly into "
                f"num_attention_heads={self.num_attention_heads} heads."
            )
        if self.position_embedding not in ("learned", "sincos"):
            raise ValueError(f"position_embedding must be 'learned' or 'sincos', got {self.position_embedding!r}.")
        if self.position_embedding == "sincos" and self.hidden_size % 4:
            raise ValueError(
                f"2-D sin-cos position embeddings need hidden_size divisible by 4, got {self.hidden_size}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}.")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def seq_length(self) -> int:
        """Tokens the transformer sees: one per patch, plus [CLS]."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "ViTConfig":
        """Our config from a `transformers.ViTConfig` (or any config with the same fields)."""
        kwargs = {}
        for f in fields(cls):
            if hasattr(hf_config, f.name):
                value = getattr(hf_config, f.name)
                if f.name in ("image_size", "patch_size") and not isinstance(value, int):
                    if len(set(value)) != 1:
                        raise ValueError(f"Only square {f.name} is supported, got {value}.")
                    value = value[0]
                kwargs[f.name] = value
        if kwargs.get("hidden_act") in ("gelu_new", "gelu_pytorch_tanh"):
            kwargs["hidden_act"] = "gelu_tanh"
        kwargs.update(overrides)
        return cls(**kwargs)


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


# ----------------------------------------------------------------------------
# Patches (cutting and checking images: patches.py)
# ----------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    """Pixels -> one D-dimensional token per patch, with a stride-P convolution.

    A convolution whose kernel is P x P and whose stride is P looks at each patch
    exactly once, so it is the same as one `nn.Linear(P*P*C, D)` applied to every
    flattened patch (see `conv_to_linear`). The convolution is just faster.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        check_images(pixel_values, self.patch_size, self.num_channels)
        x = self.projection(pixel_values)  # (B, D, h, w): a D-vector at every patch position
        _record(trace, f"patch conv ({self.patch_size}x{self.patch_size}, stride {self.patch_size})", x)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D): row-major sequence of patch tokens
        _record(trace, "flatten grid -> sequence of patch tokens", x)
        return x


# ----------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------


def sincos_2d_position_embedding(
    grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, shape (grid_h * grid_w, dim), row-major.

    The first half of the vector encodes the patch's row, the second half its
    column; each half is the 1-D sin/cos code of the Transformer paper, with
    dim/4 frequencies from 1 down to 1/temperature (as in MAE).
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 (sin and cos, for rows and columns), got {dim}.")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten().float(), cols.flatten().float()  # (N,), same order as patchify
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    angle_r = rows[:, None] * omega[None, :]  # (N, dim/4)
    angle_c = cols[:, None] * omega[None, :]
    return torch.cat([angle_r.sin(), angle_r.cos(), angle_c.sin(), angle_c.cos()], dim=1)


def position_similarity(position_embeddings: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Cosine similarity between every pair of position embeddings.

    `position_embeddings` is (N, D) or (1, N, D). Returns (N, N); with
    `grid_size=(h, w)` returns (h*w, h, w) instead, so `sim[i]` is a heatmap of
    how similar every position is to position i. A leading [CLS] row (N = h*w + 1)
    is dropped.
    """
    pe = position_embeddings.detach().float()
    if pe.dim() == 3:
        if pe.shape[0] != 1:
            raise ValueError(f"Expected (N, D) or (1, N, D), got {tuple(pe.shape)}.")
        pe = pe[0]
    if pe.dim() != 2:
        raise ValueError(f"Expected (N, D) or (1, N, D), got {tuple(position_embeddings.shape)}.")
    if grid_size is not None:
        h, w = grid_size
        if pe.shape[0] == h * w + 1:
            pe = pe[1:]  # drop [CLS]
        if pe.shape[0] != h * w:
            raise ValueError(f"{pe.shape[0]} position embeddings do not fit a {h}x{w} grid.")
    pe = F.normalize(pe, dim=-1)
    sim = pe @ pe.T
    return sim if grid_size is None else sim.reshape(-1, *grid_size)


class ViTEmbeddings(nn.Module):
    """Patch tokens, with a [CLS] token in front and a position embedding added to every token."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_embeddings = PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(1, config.seq_length, D))
        else:  # fixed: not trained, not saved; [CLS] gets the zero vector (as in MAE)
            pe = sincos_2d_position_embedding(*config.grid_size, D)
            pe = torch.cat([torch.zeros(1, D), pe])[None]
            self.register_buffer("position_embeddings", pe, persistent=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        check_images(pixel_values, self.config.patch_size, self.config.num_channels)
        H, W = pixel_values.shape[-2:]
        S = self.config.image_size
        if (H, W) != (S, S):
            raise ValueError(
                f"This ViT was built for {S}x{S} images ({self.config.num_patches} position embeddings), "
                f"got {H}x{W}. Resize the image or build a ViTConfig(image_size={H}) if H == W."
            )
        x = self.patch_embeddings(pixel_values, trace)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # the same learned vector for every image
        x = torch.cat([cls, x], dim=1)  # (B, N+1, D)
        _record(trace, "prepend [CLS] token", x)
        x = x + self.position_embeddings  # broadcast over the batch
        _record(trace, f"add {self.config.position_embedding} position embeddings", x)
        return self.dropout(x)


# ----------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention: every token looks at every token (no mask in a ViT)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(D, D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, D, bias=config.qkv_bias)
        self.out_proj = nn.Linear(D, D)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor, trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.q_proj.in_features:
            raise ValueError(f"Attention expects (B, T, {self.q_proj.in_features}), got {tuple(x.shape)}.")
        B, T, D = x.shape

        def heads(t):  # (B, T, D) -> (B, heads, T, head_dim)
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        _record(trace, "  split q, k, v into heads", q)
        weights = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, T, T)
        weights = weights.softmax(dim=-1)
        _record(trace, "  attention weights (token x token)", weights)
        out = self.dropout(weights) @ v  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, D)  # put the heads back side by side
        _record(trace, "  merge heads", out)
        return self.out_proj(out), weights


class MLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, trace: list | None = None) -> torch.Tensor:
        x = self.act(self.fc1(x))
        _record(trace, "  MLP hidden layer", x)
        return self.fc2(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (as HF's ViTLayer): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attn_out, weights = self.attn(self.norm1(x), trace)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.mlp(self.norm2(x), trace))
        return x, weights


@dataclass
class ViTOutput:
    """What `ViT.forward` returns (attribute names as in Hugging Face)."""

    last_hidden_state: torch.Tensor  # (B, N+1, D); [:, 0] is [CLS], [:, 1:] the patches
    grid_size: tuple[int, int]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each block's output
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, heads, T, T) per block


class ViT(nn.Module):
    """Embeddings, a stack of pre-LN blocks, and a final LayerNorm (HF's `ViTModel` without its pooler)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=config.initializer_range)
        if isinstance(self.embeddings.position_embeddings, nn.Parameter):
            nn.init.trunc_normal_(self.embeddings.position_embeddings, std=config.initializer_range)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        trace: list | None = None,
    ) -> ViTOutput:
        """Images (B, C, S, S) -> tokens (B, N+1, D).

        Pass a list as `trace` to collect (step, shape) pairs: every step of the
        embeddings and of the first block, then one line per later block.
        """
        _record(trace, "pixel_values", pixel_values)
        x = self.embeddings(pixel_values, trace)
        hidden_states, attentions = [x], []
        for i, block in enumerate(self.blocks):
            x, weights = block(x, trace if i == 0 else None)
            _record(trace, f"block {i + 1} output", x)
            hidden_states.append(x)
            attentions.append(weights)
        x = self.norm(x)
        _record(trace, "final LayerNorm", x)
        return ViTOutput(
            last_hidden_state=x,
            grid_size=self.config.grid_size,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def trace_shapes(self, pixel_values: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
        """[(step, shape), ...] for one forward pass, for a table."""
        trace: list = []
        with torch.no_grad():
            self(pixel_values, trace=trace)
        return trace


def _record(trace: list | None, step: str, x: torch.Tensor) -> None:
    if trace is not None:
        trace.append((step, tuple(x.shape)))
