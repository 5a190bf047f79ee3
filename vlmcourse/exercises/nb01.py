"""Answer checks for notebook 01 (ViT: from pixels to patch tokens).

Each check prints ✓ or ✗ with a hint and returns None (so no stray output in
the notebook). An answer left as ``None`` prints how to attempt it instead.
"""
from __future__ import annotations

import torch

from vlmcourse.patches import patchify
from vlmcourse.exercises import _not_attempted, _run_learner

__all__ = ["check_sequence_length", "check_patchify", "check_patch_embedding_params"]


def check_sequence_length(num_patches, seq_length, image_size: int = 384, patch_size: int = 16) -> None:
    """Exercise 1: patches and transformer sequence length for a ViT at another resolution."""
    if num_patches is None or seq_length is None:
        _not_attempted(
            f"Set num_patches to the number of {patch_size}x{patch_size} patches in a {image_size}x{image_size} "
            f"image, and seq_length to the number of tokens the transformer sees (patches plus [CLS])."
        )
        return
    side = image_size // patch_size
    expected_patches, expected_length = side * side, side * side + 1
    ok = True
    if num_patches == expected_patches:
        print(f"✓ num_patches = {num_patches}: a {side} x {side} grid of patches.")
    else:
        ok = False
        if num_patches == side:
            hint = f"{side} is the patches along one side; the grid is {side} x {side}."
        elif num_patches == image_size * image_size // patch_size:
            hint = "divide each side by the patch size, not the area by the side."
        else:
            hint = f"how many patches fit along one side ({image_size} / {patch_size}), and how many rows of them?"
        print(f"✗ num_patches = {num_patches} is not right. Hint: {hint}")
    if seq_length == expected_length:
        print(f"✓ seq_length = {seq_length}: {expected_patches} patch tokens + 1 [CLS] token.")
    else:
        ok = False
        hint = ("the [CLS] token is one extra token in front of the patches."
                if seq_length == expected_patches else "sequence length = patch tokens + the [CLS] token.")
        print(f"✗ seq_length = {seq_length} is not right. Hint: {hint}")
    base = (224 // patch_size) ** 2 + 1
    if ok and image_size != 224:
        print(f"  Attention compares every token with every token: {expected_length}² = "
              f"{expected_length ** 2:,} pairs, {(expected_length / base) ** 2:.1f}x the {base}² pairs at 224 px.")


def check_patchify(fn) -> None:
    """Exercise 2: the learner's patchify(pixel_values, patch_size) against ours on random images."""
    how = ("Fill in my_patchify(pixel_values, patch_size) so that it returns (B, N, P*P*C) in the same order "
           "as vlmcourse.patches.patchify, with only reshape and permute. Start by splitting H into (H/P, P) "
           "and W into (W/P, P).")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 12)  # a 2 x 3 grid of 4 x 4 patches, not square on purpose
    expected = patchify(x, 4)
    got = _run_learner(fn, "my_patchify", how, x, 4)
    if got is None:
        return
    if not isinstance(got, torch.Tensor):
        print(f"✗ my_patchify returned a {type(got).__name__}, not a tensor.")
        return
    if tuple(got.shape) != tuple(expected.shape):
        print(f"✗ Wrong shape: for (2, 3, 8, 12) images and 4 px patches expected {tuple(expected.shape)}, "
              f"got {tuple(got.shape)}.\n  Hint: N = (H/P) * (W/P) patches, each of P*P*C = 48 numbers.")
        return
    if torch.equal(got, expected):
        print("✓ my_patchify matches vlmcourse.patches.patchify "
              "(row-major patches, each flattened as row, column, channel).")
        return
    same_pixels = torch.equal(got.sort(-1).values, expected.sort(-1).values)
    same_patches_somewhere = torch.equal(
        got.reshape(-1, 48).sort(-1).values.sort(0).values, expected.reshape(-1, 48).sort(-1).values.sort(0).values
    )
    if same_pixels:
        print("✗ Each patch holds the right pixels, but in a different order inside the patch.\n"
              "  Hint: flatten each patch as (row, column, channel), channel last: permute to (B, h, w, P, P, C).")
    elif same_patches_somewhere:
        print("✗ Your patches are right but come out in a different order.\n"
              "  Hint: go row by row (left to right, then top to bottom): the patch-row index h before the column w.")
    else:
        print("✗ The numbers in your patches do not match whole P x P squares of the image.\n"
              "  Hint: reshape (B, C, H, W) to (B, C, H/P, P, W/P, P) first, so that no patch mixes pixels "
              "from different squares, then permute and reshape.")


def check_patch_embedding_params(num_params, patch_size: int = 16, num_channels: int = 3,
                                 hidden_size: int = 768) -> None:
    """Exercise 3: parameters of a stride-P patch embedding (weights + bias)."""
    if num_params is None:
        _not_attempted(
            f"Set num_params to the number of parameters in nn.Conv2d({num_channels}, {hidden_size}, "
            f"kernel_size={patch_size}, stride={patch_size}): it is a "
            f"Linear({patch_size}*{patch_size}*{num_channels}, {hidden_size}) in disguise."
        )
        return
    weights = patch_size * patch_size * num_channels * hidden_size
    expected = weights + hidden_size
    if num_params == expected:
        print(f"✓ {num_params:,} = {patch_size}·{patch_size}·{num_channels}·{hidden_size} weights "
              f"+ {hidden_size} biases. The stride does not change it: the same kernel is reused at every patch.")
    elif num_params == weights:
        print(f"✗ {num_params:,} counts the weights only. Hint: each of the {hidden_size} outputs also has a bias.")
    elif num_params == weights // num_channels + hidden_size or num_params == weights // num_channels:
        print(f"✗ {num_params:,} leaves out the channels. Hint: a patch has P·P·C = "
              f"{patch_size * patch_size * num_channels} numbers, not P·P.")
    else:
        print(f"✗ {num_params:,} is not right. Hint: a Linear(in, out) has in·out weights + out biases, "
              f"with in = P·P·C.")
