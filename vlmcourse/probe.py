"""Linear probes: does a frozen encoder's output already hold a property, for one linear layer to read?

A probe is a logistic regression on frozen features, trained on one split and scored on another. If it reads a
property almost perfectly, the information is there and any model on top only has to *find* it; if it fails, no
amount of Q-Former training can recover what the encoder threw away. Notebook 04 asks this of the shapes world:
what the features at an object's patches say about it, against the same features averaged over the whole photo.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .shapes import COLOURS, GRID, SHAPES, SIZES, cells_mask

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


class LinearProbe(torch.nn.Module):
    """Standardise with the training features' mean and spread, then one linear layer to class logits."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = torch.nn.Linear(mean.numel(), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return (self(x.float()).argmax(-1) == y).float().mean().item()


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, steps: int = 300,
                     lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> LinearProbe:
    """Full-batch Adam on the cross-entropy of (N, D) features ``x`` and (N,) class ids ``y``, with an L2 penalty.
    Fixed settings, not tuned: a probe is a measuring instrument, so it must not be fitted to the answer."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"want features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.float()
    with torch.random.fork_rng():           # a seeded start that leaves the caller's random state alone
        torch.manual_seed(seed)
        probe = LinearProbe(x.mean(0), x.std(0) + 1e-6, num_classes or int(y.max()) + 1)
    opt = torch.optim.Adam(probe.linear.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.linear.weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe.eval()


def object_features(features: torch.Tensor, objects: list[list[dict]], pool: str = "cells",
                    grid: int = GRID) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One row per object of the shapes world: its photo's (N, D) patch features averaged over the object's cells
    (``pool="cells"``) or over the whole grid (``"image"``), and its class id for each of ``ATTRIBUTES``."""
    if pool not in ("cells", "image"):
        raise ValueError(f"pool must be 'cells' or 'image', got {pool!r}")
    if features.shape[:2] != (len(objects), grid * grid):
        raise ValueError(f"features {tuple(features.shape)} do not match {len(objects)} photos of {grid}x{grid} patches")
    rows, labels = [], {a: [] for a in ATTRIBUTES}
    for photo, objs in zip(features.float(), objects):
        for cells in cells_mask(objs, grid):
            rows.append(photo[cells].mean(0) if pool == "cells" else photo.mean(0))
        for obj in objs:
            for attribute, names in ATTRIBUTES.items():
                labels[attribute].append(names.index(obj[attribute]))
    return torch.stack(rows), {a: torch.tensor(v) for a, v in labels.items()}


def probe_attributes(train_features, train_objects, test_features, test_objects, pool: str = "cells") -> dict:
    """Test accuracy of a linear probe per attribute, trained on the train split's objects."""
    x, y = object_features(train_features, train_objects, pool)
    x_test, y_test = object_features(test_features, test_objects, pool)
    return {a: fit_linear_probe(x, y[a], len(ATTRIBUTES[a])).accuracy(x_test, y_test[a]) for a in ATTRIBUTES}
