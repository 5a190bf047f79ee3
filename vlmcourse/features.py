"""Run the frozen vision encoder over a split once, and keep its patch tokens on disk.

The vision encoder is frozen in every stage of BLIP-2, so its output for a
photo never changes: computing it once turns minutes per epoch into seconds.
Files are safetensors, keyed by the encoder, the exact list of images and each
photo file's size and modification time (a replaced or repaired photo is
encoded again). A file that fails its checks on load (unreadable, checksum,
shape, ids, non-finite values) is reported, removed and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from .data import collate
from .utils import cache_dir, progress_bar


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


class DamagedCacheError(ValueError):
    """A feature file that cannot be trusted (the message names it and says why)."""


def feature_key(encoder_name: str, image_ids: list[str], stamps: list[str] = ()) -> str:
    """The cache file's name; ``stamps`` (``file_stamps``) make it change when a photo file is replaced."""
    digest = hashlib.sha1("\n".join([encoder_name, *image_ids, *stamps]).encode()).hexdigest()[:12]
    return f"{encoder_name.replace('/', '--')}_{len(image_ids)}_{digest}"


def file_stamps(dataset) -> list[str]:
    """"size:mtime_ns" of each photo file of ``dataset`` (none for a hub dataset, whose photos have no files)."""
    paths = getattr(dataset, "image_paths", None) or []
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
            stamps.append(f"{info.st_size}:{info.st_mtime_ns}")
        except OSError:
            stamps.append("missing")
    return stamps


def checksum(features: torch.Tensor) -> str:
    return hashlib.sha1(features.contiguous().view(torch.uint8).numpy()).hexdigest()


@torch.no_grad()
def compute_features(vision, dataset, batch_size: int = 32, desc: str | None = None) -> FeatureSet:
    """Encode every readable image of ``dataset`` (which must use ``vision.transform``)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    chunks, ids = [], []
    for batch in progress_bar(loader, desc=desc or f"encoding {getattr(dataset, 'split', '')} images"):
        if not batch["image_id"]:
            continue
        out = vision(batch["pixel_values"].to(vision.device))
        chunks.append(out.last_hidden_state.to("cpu", torch.float16))
        ids.extend(batch["image_id"])
    if not chunks:
        raise ValueError(f"no image of {dataset!r} could be read")
    return FeatureSet(torch.cat(chunks), ids, tuple(vision.grid_size), vision.name)


def cache_features(vision, dataset, batch_size: int = 32, refresh: bool = False) -> FeatureSet:
    """``compute_features``, saved once under ``$VLMCOURSE_CACHE/features`` and loaded after that. A cached file
    that fails ``load_features``'s checks is reported by path (a warning), removed and recomputed."""
    key = feature_key(vision.name, list(dataset.image_ids), file_stamps(dataset))
    path = cache_dir("features") / f"{key}.safetensors"
    if path.is_file() and not refresh:
        try:
            return load_features(path, dataset.image_ids, vision.name)
        except DamagedCacheError as error:
            warnings.warn(f"{error}: removed and recomputed", stacklevel=2)
            path.unlink(missing_ok=True)
    feats = compute_features(vision, dataset, batch_size)
    save_features(feats, path)
    return feats


def save_features(feats: FeatureSet, path) -> None:
    """Write ``feats`` with a checksum of its bytes; features that are not all finite are refused (never cached)."""
    rows = (~torch.isfinite(feats.features.float())).flatten(1).any(1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"the vision encoder {feats.encoder} gave NaN or infinite features for {len(rows)} photos "
                         f"(first: {', '.join(feats.image_ids[i] for i in rows[:3])}); nothing cached")
    meta = {"image_ids": json.dumps(feats.image_ids), "grid_size": json.dumps(list(feats.grid_size)),
            "encoder": feats.encoder, "sha1": checksum(feats.features)}
    tmp = f"{path}.partial"
    save_file({"features": feats.features.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)   # never leave a half-written cache behind


def load_features(path, image_ids: list[str] | None = None, encoder: str | None = None) -> FeatureSet:
    """The FeatureSet saved at ``path``, checked: readable, its checksum (so the values are the finite ones
    ``save_features`` checked), one (grid) row per id, and, when given, ``encoder`` and ids drawn in order from
    ``image_ids`` (unreadable photos are left out). DamagedCacheError (naming the file) otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            features = f.get_tensor("features")
        ids, grid = json.loads(meta["image_ids"]), tuple(json.loads(meta["grid_size"]))
    except Exception as error:      # safetensors, JSON or a missing key: whatever the damage, the file is useless
        raise DamagedCacheError(f"damaged feature cache {path} (cannot be read: {error})") from None
    expected = iter(image_ids if image_ids is not None else ids)
    problem = ("no checksum: written by an older vlmcourse" if "sha1" not in meta
               else "its checksum does not match: bytes changed on disk" if meta["sha1"] != checksum(features)
               else f"shape {tuple(features.shape)} is not ({len(ids)} ids, {grid[0]}x{grid[1]} patches, D)"
               if features.ndim != 3 or features.shape[0] != len(ids) or features.shape[1] != grid[0] * grid[1]
               else f"encoder {meta.get('encoder')!r}, not {encoder!r}" if encoder and meta.get("encoder") != encoder
               else "its image ids are not this split's" if not all(i in expected for i in ids) else None)
    if problem:
        raise DamagedCacheError(f"{'outdated' if 'sha1' not in meta else 'damaged'} feature cache {path} ({problem})")
    return FeatureSet(features, ids, grid, meta["encoder"])
