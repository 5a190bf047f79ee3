import os

import pytest
import torch

from vlmcourse import features
from vlmcourse.backbones import load_vision_encoder
from vlmcourse.data import Flickr8k
from vlmcourse.features import cache_features, cache_frozen_outputs, compute_features, feature_key


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


def test_frozen_outputs_are_computed_once_per_weights_and_inputs(cache):
    """Several models trained on one frozen connector (notebook 06) compute its outputs once: a module with the
    same weights, given the same inputs, reads them from disk; other weights or inputs compute again; a damaged
    file is reported, removed and recomputed."""
    calls = []

    def outputs_of(module):
        def fn(x):
            calls.append(len(x))
            with torch.no_grad():
                return module(x)
        return fn

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(5, 2, 4)
    first = cache_frozen_outputs(layer, outputs_of(layer), x, "connector-float32")
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(layer.state_dict())          # another object, the same weights
    assert torch.equal(cache_frozen_outputs(twin, outputs_of(twin), x, "connector-float32"), first)
    assert calls == [5]
    with torch.no_grad():
        twin.bias.add_(1.0)
    moved = cache_frozen_outputs(twin, outputs_of(twin), x, "connector-float32")
    assert calls == [5, 5] and torch.allclose(moved, first + 1.0)
    cache_frozen_outputs(layer, outputs_of(layer), x[:3], "connector-float32")
    assert calls == [5, 5, 3]
    files = sorted((cache / "features").glob("connector-float32_5_*.safetensors"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="damaged output cache.*removed and recomputed"):
        again = cache_frozen_outputs(layer, outputs_of(layer), x, "connector-float32")
    assert torch.equal(again, first) and calls == [5, 5, 3, 5]


def test_frozen_outputs_of_modules_without_weights_do_not_share_a_key(cache):
    """Mean-pooling and LLaVA's linear connector have no weights: each keeps its own outputs (16 pooled tokens, 49
    patches), and two mean-pools of different sizes do too. Once they shared one file, and notebook 06's linear rows
    trained on mean-pooled tokens."""
    from vlmcourse.connectors import LinearConnector, MeanPoolConnector

    x = torch.randn(3, 49, 8, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, module in {"meanpool 4": MeanPoolConnector((7, 7), 4), "meanpool 2": MeanPoolConnector((7, 7), 2),
                         "linear": LinearConnector(49)}.items():
        outputs[name] = cache_frozen_outputs(module, module, x, "connector-float32")
        assert torch.equal(outputs[name], module(x)), name
    assert [o.shape[1] for o in outputs.values()] == [16, 4, 49]
    assert len(list((cache / "features").glob("connector-float32_3_*.safetensors"))) == 3


def test_caption_features_are_each_captions_own_whatever_the_batching():
    """encode_captions batches captions of similar length (less padding): each row is still its own caption's
    mean-pooled features, in the order given."""
    from vlmcourse.backbones import load_text_encoder
    from vlmcourse.features import encode_captions

    text = load_text_encoder("tiny")
    captions = [["a dog", "a black dog runs across the wet grass after a red ball"],
                ["two men play chess in a park on a sunny day", "snow"], ["a cat", "children on a slide"]]
    batched = encode_captions(text, captions, batch_size=4, progress=False)
    alone = torch.stack([encode_captions(text, [[c]], batch_size=1, progress=False)[0, 0]
                         for caps in captions for c in caps]).view(3, 2, -1)
    assert batched.shape == alone.shape and torch.allclose(batched, alone, atol=1e-5)
