"""Run the frozen encoders over a split once, and keep their outputs on disk: the vision encoder's patch
tokens (``cache_features``) and the text encoder's pooled captions (``cache_caption_features``).

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
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .backbones import load_vision_encoder
from .data import collate, load_flickr8k
from .distributed import is_main_process
from .profiles import Profile
from .utils import cache_dir, in_batches, progress_bar


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
    """The cache file's name; ``stamps`` (``file_stamps``) make it change when a photo file's bytes change."""
    digest = hashlib.sha1("\n".join([encoder_name, *image_ids, *stamps]).encode()).hexdigest()[:12]
    return f"{encoder_name.replace('/', '--')}_{len(image_ids)}_{digest}"


def file_stamps(dataset) -> list[str]:
    """A digest of each photo file's bytes (none for a hub dataset, whose photos have no files). The bytes, not the
    modification time: a copy or a fresh mount of the same photos keeps its cached features (800 photos of 14 MB
    hash in a fraction of a second); a replaced photo changes them."""
    paths = getattr(dataset, "image_paths", None) or []
    stamps = []
    for path in paths:
        try:
            stamps.append(hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest())
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


@torch.no_grad()
def patch_tokens(vision, images: list, batch_size: int = 16) -> torch.Tensor:
    """(N, T, D) patch tokens of a list of RGB PIL images (``compute_features`` does a whole dataset), rounded
    through float16 as the feature cache stores them (so a photo captioned from its file and from the cache gets
    the same caption)."""
    return in_batches(lambda chunk: vision(vision.preprocess(chunk)).last_hidden_state.to("cpu", torch.float16),
                      images, batch_size=batch_size).float()


def save_features(feats: FeatureSet, path) -> None:
    """Write ``feats`` with a checksum of its bytes; features that are not all finite are refused (never cached)."""
    rows = (~torch.isfinite(feats.features.float())).flatten(1).any(1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"the vision encoder {feats.encoder} gave NaN or infinite features for {len(rows)} photos "
                         f"(first: {', '.join(feats.image_ids[i] for i in rows[:3])}); nothing cached")
    meta = {"image_ids": json.dumps(feats.image_ids), "grid_size": json.dumps(list(feats.grid_size)),
            "encoder": feats.encoder, "sha1": checksum(feats.features)}
    _save_atomic({"features": feats.features.contiguous()}, path, metadata=meta)


def _save_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    tmp = f"{path}.partial"
    save_file(tensors, tmp, metadata=metadata)
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


# ---------------------------------------------------------------------------- caption features
@torch.no_grad()
def encode_captions(
    text_encoder: Callable,
    captions: Sequence[Sequence[str]],
    batch_size: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """Run the frozen text tower once: (N_images, captions_per_image, hidden) float32 on CPU.

    `text_encoder` is `load_text_encoder(profile)`: `.tokenize(list_of_str)` -> dict,
    and calling it returns the last hidden state (B, T, H). We mean-pool over
    real tokens (the attention mask), which is how all-MiniLM-L6-v2 was trained.
    """
    per_image = {len(c) for c in captions}
    if len(per_image) != 1:
        raise ValueError(f"every image needs the same number of captions, got counts {sorted(per_image)}")
    (c,) = per_image
    flat = [s for caps in captions for s in caps]

    def mean_pool(texts: list[str]) -> torch.Tensor:
        batch = text_encoder.tokenize(texts)
        hidden = text_encoder(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu()

    # batches of captions of similar length carry little padding (about half of a random batch's tokens)
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    in_order = in_batches(mean_pool, [flat[i] for i in order], batch_size=batch_size, progress=progress,
                          desc="encode captions")
    pooled = torch.empty_like(in_order)
    pooled[torch.tensor(order, dtype=torch.long)] = in_order
    return pooled.view(len(captions), c, -1)


def cache_caption_features(text_encoder, dataset, image_ids: Sequence[str] | None = None,
                           refresh: bool = False) -> torch.Tensor:
    """`encode_captions` for a dataset, saved under $VLMCOURSE_CACHE/features and loaded after that.

    `image_ids` (e.g. `FeatureSet.image_ids`) picks and orders the images, so that
    row i of the caption features and row i of the image features are the same photo
    (cache_features leaves out unreadable photos).
    """
    position = {name: i for i, name in enumerate(dataset.image_ids)}
    image_ids = list(dataset.image_ids if image_ids is None else image_ids)
    missing = [name for name in image_ids if name not in position]
    if missing:
        raise ValueError(f"{len(missing)} image ids are not in the dataset (first: {missing[0]})")
    captions = [dataset.captions[position[name]] for name in image_ids]
    name = getattr(text_encoder, "name", type(text_encoder).__name__)
    digest = hashlib.sha1(repr((name, image_ids, captions)).encode()).hexdigest()[:12]
    path = cache_dir("features") / f"captions_{str(name).replace('/', '--')}_{len(image_ids)}_{digest}.safetensors"
    if path.is_file() and not refresh:
        return load_file(str(path))["captions"]
    features = encode_captions(text_encoder, captions)
    _save_atomic({"captions": features.contiguous()}, path)
    return features


def cache_frozen_outputs(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                         kind: str) -> torch.Tensor:
    """``fn(inputs)`` for a frozen ``module`` (e.g. a frozen connector's outputs for a split), kept on disk as the
    features are, keyed by the module's weights and the inputs' bytes: several models trained on one frozen
    Q-Former compute its outputs once (notebook 06 trains four). The key names the module's kind and settings too
    (``to_config()``, else its class): modules without weights (mean-pooling, LLaVA's linear connector) would
    otherwise share one key. A damaged file is reported, removed, recomputed."""
    digest = hashlib.sha1(checksum(inputs).encode())
    config = module.to_config() if hasattr(module, "to_config") else {"class": type(module).__qualname__}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    path = cache_dir("features") / f"{kind}_{len(inputs)}_{digest.hexdigest()[:12]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                outputs, meta = f.get_tensor("outputs"), f.metadata() or {}
            if meta.get("sha1") == checksum(outputs) and len(outputs) == len(inputs):
                return outputs
            problem = "its checksum or row count does not match"
        except Exception as error:      # whatever the damage, the file is useless
            problem = f"cannot be read: {error}"
        warnings.warn(f"damaged output cache {path} ({problem}): removed and recomputed", stacklevel=2)
        path.unlink(missing_ok=True)
    outputs = fn(inputs)
    if is_main_process():               # several processes compute the same outputs: one writes them
        _save_atomic({"outputs": outputs.contiguous()}, path, metadata={"sha1": checksum(outputs)})
    return outputs


def split_features(profile: Profile, split: str, vision=None, root=None):
    """(FeatureSet, dataset) for a split, with the image features cached on disk; ``root``: the data folder
    (default: data.find_data_root's search)."""
    vision = vision or load_vision_encoder(profile)
    dataset = load_flickr8k(split, profile, transform=vision.transform, root=root)
    return cache_features(vision, dataset), dataset


def captions_for(feats: FeatureSet, dataset) -> list[list[str]]:
    """The captions of each feature row (rows of unreadable photos are absent from feats)."""
    by_id = dict(zip(dataset.image_ids, dataset.captions))
    return [by_id[i] for i in feats.image_ids]
