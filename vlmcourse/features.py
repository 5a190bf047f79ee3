"""Run the frozen vision encoder over a split once, and keep its patch tokens on disk.

The vision encoder is frozen in every stage of BLIP-2, so its output for a
photo never changes: computing it once turns minutes per epoch into seconds.
Files are safetensors, keyed by the encoder and the exact list of images.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import collate
from .utils import cache_dir


@dataclass
class FeatureSet:
    """Patch tokens of one split: ``features[i]`` (T, D) belongs to ``image_ids[i]``."""

    features: torch.Tensor            # (N, T, D) float16 on the CPU
    image_ids: list[str]
    grid_size: tuple[int, int]
    encoder: str

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self):
        return (f"FeatureSet(encoder={self.encoder!r}, images={len(self)}, "
                f"features={tuple(self.features.shape)}, grid={self.grid_size})")


def feature_key(encoder_name: str, image_ids: list[str]) -> str:
    digest = hashlib.sha1("\n".join([encoder_name, *image_ids]).encode()).hexdigest()[:12]
    return f"{encoder_name.replace('/', '--')}_{len(image_ids)}_{digest}"


@torch.no_grad()
def compute_features(vision, dataset, batch_size: int = 32, desc: str | None = None) -> FeatureSet:
    """Encode every readable image of ``dataset`` (which must use ``vision.transform``)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    chunks, ids = [], []
    for batch in tqdm(loader, desc=desc or f"encoding {getattr(dataset, 'split', '')} images"):
        if not batch["image_id"]:
            continue
        out = vision(batch["pixel_values"].to(vision.device))
        chunks.append(out.last_hidden_state.to("cpu", torch.float16))
        ids.extend(batch["image_id"])
    if not chunks:
        raise ValueError(f"no image of {dataset!r} could be read")
    return FeatureSet(torch.cat(chunks), ids, tuple(vision.grid_size), vision.name)


def cache_features(vision, dataset, batch_size: int = 32, refresh: bool = False) -> FeatureSet:
    """``compute_features``, saved once under ``$VLMCOURSE_CACHE/features`` and loaded after that."""
    path = cache_dir("features") / f"{feature_key(vision.name, list(dataset.image_ids))}.safetensors"
    if path.is_file() and not refresh:
        return load_features(path)
    feats = compute_features(vision, dataset, batch_size)
    save_features(feats, path)
    return feats


def save_features(feats: FeatureSet, path) -> None:
    meta = {"image_ids": json.dumps(feats.image_ids), "grid_size": json.dumps(list(feats.grid_size)),
            "encoder": feats.encoder}
    tmp = f"{path}.partial"
    save_file({"features": feats.features.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)   # never leave a half-written cache behind


def load_features(path) -> FeatureSet:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        features = f.get_tensor("features")
    ids = json.loads(meta["image_ids"])
    if features.shape[0] != len(ids):
        raise ValueError(f"{path}: {features.shape[0]} feature rows for {len(ids)} image ids; delete the file")
    return FeatureSet(features, ids, tuple(json.loads(meta["grid_size"])), meta["encoder"])
