"""Images into patches and back: what a ViT does before it learns anything.

``patchify`` cuts (B, C, H, W) images into an h x w grid of P x P patches, numbered row by row (row-major), each
flattened as (row, column, channel) like MAE's; ``unpatchify`` puts them back. ``conv_to_linear`` shows that the
ViT's stride-P patch convolution is one linear layer applied to every flattened patch. ``check_images`` is the
input check the ViT runs once, at its entry point.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["check_images", "patchify", "unpatchify", "conv_to_linear"]


def check_images(pixel_values: torch.Tensor, patch_size: int, num_channels: int | None = None) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a tensor of shape (B, C, H, W), got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        hint = " Add a batch dimension with pixel_values[None]." if pixel_values.dim() == 3 else ""
        raise ValueError(f"pixel_values must have shape (B, C, H, W), got {tuple(pixel_values.shape)}.{hint}")
    _, c, h, w = pixel_values.shape
    if num_channels is not None and c != num_channels:
        hint = " Is the image channels-last (B, H, W, C)? Use .permute(0, 3, 1, 2)." if w == num_channels else ""
        raise ValueError(f"Expected {num_channels} channels, got {c} (pixel_values {tuple(pixel_values.shape)}).{hint}")
    for name, size in (("height", h), ("width", w)):
        if size % patch_size:
            lo = size // patch_size * patch_size
            raise ValueError(
                f"Image {name} {size} is not divisible by patch_size {patch_size}: "
                f"crop or resize to {lo or patch_size} or {lo + patch_size} px."
            )


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut images into non-overlapping P x P patches and flatten each one.

    (B, C, H, W) -> (B, N, P*P*C) with N = (H/P) * (W/P). Patches go row by row
    (left to right, then top to bottom), the order a stride-P convolution
    produces; each patch is flattened as (row, column, channel).
    """
    check_images(pixel_values, patch_size)
    B, C, H, W = pixel_values.shape
    P = patch_size
    h, w = H // P, W // P
    x = pixel_values.reshape(B, C, h, P, w, P)  # split each axis into (which patch, where inside it)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, P, P, C): patch grid first, then pixels inside a patch
    return x.reshape(B, h * w, P * P * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, P*P*C) -> (B, C, H, W).

    `grid_size` is (rows, columns) of patches; if omitted the grid is assumed square.
    """
    if patches.dim() != 3:
        raise ValueError(f"patches must have shape (B, N, P*P*C), got {tuple(patches.shape)}.")
    B, N, D = patches.shape
    P = patch_size
    if D % (P * P):
        raise ValueError(f"Patch length {D} is not P*P*C for patch_size {P} (P*P = {P * P}).")
    C = D // (P * P)
    if grid_size is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"{N} patches do not make a square grid: pass grid_size=(rows, columns).")
        grid_size = (side, side)
    h, w = grid_size
    if h * w != N:
        raise ValueError(f"grid_size {grid_size} holds {h * w} patches, but got {N}.")
    x = patches.reshape(B, h, w, P, P, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, P, w, P)
    return x.reshape(B, C, h * P, w * P)


def conv_to_linear(conv: nn.Conv2d) -> nn.Linear:
    """The `nn.Linear` on `patchify` output that computes exactly what a stride-P conv does.

    The conv weight is (D, C, P, P); our patches are flattened as (P, P, C), so the
    weight is permuted to (D, P, P, C) before being reshaped to (D, P*P*C).
    """
    D, C, P, P2 = conv.weight.shape
    if P != P2 or conv.stride != (P, P) or conv.padding not in ((0, 0), "valid"):
        raise ValueError(f"Only a square, stride-P, unpadded conv is a per-patch linear layer; got {conv}.")
    linear = nn.Linear(P * P * C, D, bias=conv.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(D, P * P * C))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear

