import os

import pytest
import torch

from vlmcourse import features
from vlmcourse.backbones import load_vision_encoder
from vlmcourse.data import Flickr8k
from vlmcourse.features import cache_features, compute_features, feature_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_is_computed_once_and_reloaded(flickr_dir, cache, monkeypatch):
    vision = load_vision_encoder("tiny")
    ds = Flickr8k("train", root=flickr_dir, transform=vision.transform)
    first = cache_features(vision, ds, batch_size=3)
    assert first.features.shape == (8, 16, vision.hidden_size) and first.features.dtype == torch.float16
    assert first.image_ids == ds.image_ids and first.grid_size == (4, 4)
    files = list((cache / "features").glob("*.safetensors"))
    assert len(files) == 1 and not list((cache / "features").glob("*.partial"))
    monkeypatch.setattr(features, "compute_features", lambda *a, **k: pytest.fail("recomputed"))
    again = cache_features(vision, ds)
    assert torch.equal(again.features, first.features) and again.image_ids == first.image_ids
    # the rows are the encoder's output for each photo, in order
    with torch.no_grad():
        direct = vision(ds[5]["pixel_values"][None]).last_hidden_state[0].half().cpu()
    assert torch.allclose(first.features[5], direct, atol=1e-3)


def test_cache_follows_the_photos_bytes_not_their_dates(flickr_dir, cache, monkeypatch):
    """A fresh mount or copy of the same photos (new modification times) loads the cached features; a photo whose
    bytes changed makes them computed again."""
    vision = load_vision_encoder("tiny")
    ds = Flickr8k("train", root=flickr_dir, transform=vision.transform)
    first = cache_features(vision, ds, batch_size=4)
    photo = flickr_dir / "Images" / ds.image_ids[0]
    os.utime(photo, ns=(1, 1))                                      # same bytes, another date
    calls = []
    real = features.compute_features
    monkeypatch.setattr(features, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(cache_features(vision, ds).features, first.features) and not calls
    photo.write_bytes(photo.read_bytes() + b"\0")                  # other bytes (a JPEG reader ignores the tail)
    cache_features(vision, ds)
    assert calls == [1]


def test_key_depends_on_encoder_and_images():
    assert feature_key("a", ["1.jpg", "2.jpg"]) != feature_key("a", ["1.jpg"])
    assert feature_key("a", ["1.jpg"]) != feature_key("b", ["1.jpg"])
    assert feature_key("org/model", ["1.jpg"]).startswith("org--model_1_")


def test_corrupt_image_is_skipped_and_ids_stay_aligned(flickr_dir, cache):
    (flickr_dir / "Images" / "1002_abc.jpg").write_bytes(b"\xff\xd8\xff garbage")
    vision = load_vision_encoder("tiny")
    ds = Flickr8k("train", root=flickr_dir, transform=vision.transform)
    with pytest.warns(UserWarning, match="1002_abc.jpg"):
        feats = compute_features(vision, ds, batch_size=4)
    assert len(feats) == 7 and "1002_abc.jpg" not in feats.image_ids
    with torch.no_grad():
        direct = vision(ds[3]["pixel_values"][None]).last_hidden_state[0].half().cpu()
    assert torch.allclose(feats.features[feats.image_ids.index("1003_abc.jpg")], direct, atol=1e-3)
