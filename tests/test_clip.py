"""Tests for vlmcourse.clip: the loss against Hugging Face, the metrics on
hand-built matrices, and the LiT model on random features (no real towers)."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlmcourse import backbones, clip, features
from vlmcourse.backbones import clip_embeddings
from vlmcourse.clip import LiTConfig, LiTModel, LiTTrainConfig, clip_loss, evaluate_lit, info_nce, lit_batches, train_lit
from vlmcourse.metrics import caption_image_index, chance_recall, recall_at_k, retrieval_recall


def tiny_hf_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, projection_dim=16),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


class FakeProcessor:
    """Processor-like callable: images are already (3, 32, 32) tensors; text -> char codes."""

    def __call__(self, images=None, text=None, padding=True, truncation=True, return_tensors="pt"):
        if images is not None:
            return {"pixel_values": torch.stack(list(images))}
        length = max(len(t) for t in text)
        ids = torch.zeros(len(text), length, dtype=torch.long)
        mask = torch.zeros(len(text), length, dtype=torch.long)
        for i, t in enumerate(text):
            ids[i, : len(t)] = torch.tensor([ord(ch) % 100 for ch in t])
            mask[i, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- loss


def test_loss_equals_hugging_face_clip_loss():
    model = tiny_hf_clip()
    pixel_values = torch.randn(4, 3, 32, 32)
    input_ids = torch.randint(1, 100, (4, 7))
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    ours = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    torch.testing.assert_close(ours, out.loss)
    # and the logits match too
    torch.testing.assert_close(clip.clip_logits(out.image_embeds, out.text_embeds, model.logit_scale),
                               out.logits_per_image)


def test_loss_is_symmetric_and_minimal_when_aligned():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(clip.LOGIT_SCALE_INIT)
    # swapping the roles of images and texts changes nothing
    torch.testing.assert_close(clip_loss(a, b, scale), clip_loss(b, a, scale))
    aligned = clip_loss(a, a, scale)
    assert aligned < clip_loss(a, b, scale)
    assert aligned < clip_loss(a, a[torch.randperm(6)], scale)  # shuffled pairs are worse
    # orthogonal, perfectly aligned pairs at scale 100: loss ~ 0
    eye = torch.eye(5)
    assert clip_loss(eye, eye, math.log(100)) < 1e-6
    # all-equal similarities: a uniform guess over N, loss = log N
    torch.testing.assert_close(info_nce(torch.zeros(7, 7)), torch.tensor(math.log(7)))


def test_info_nce_by_hand_and_scale_is_clamped():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = -(torch.log_softmax(logits, 1).diagonal()).mean()
    cols = -(torch.log_softmax(logits, 0).diagonal()).mean()
    torch.testing.assert_close(info_nce(logits), (rows + cols) / 2)
    x = F.normalize(torch.randn(3, 4), dim=-1)
    torch.testing.assert_close(clip.clip_logits(x, x, 10.0), 100 * x @ x.T)  # exp(10) capped at 100


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="square"):
        info_nce(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one text per image"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 0.0)
    with pytest.raises(ValueError, match="same width"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 5), 0.0)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(torch.randn(3), torch.randn(3), 0.0)
    model = LiTModel(LiTConfig(image_dim=8, text_dim=6, embed_dim=4, hidden_dim=None))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 8\)"):
        model.encode_image(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        model.encode_text(torch.randn(2, 7))
    with pytest.raises(ValueError, match="number of images"):
        train_lit(model, torch.randn(4, 3, 8), torch.randn(5, 2, 6))
    with pytest.raises(ValueError, match="one image index per column"):
        recall_at_k(torch.zeros(2, 4), torch.tensor([0, 1, 1]))


# ----------------------------------------------------------------------------- metrics


def test_recall_at_k_on_a_constructed_matrix():
    # 3 images, 2 captions each: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    sim = torch.tensor([
        #  c0   c1   c2   c3   c4   c5
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption c0 is top-1
        [0.5, 0.0, 0.1, 0.6, 0.2, 0.0],  # image 1: c3 is top-1 (c2 alone would be rank 4)
        [0.3, 0.7, 0.9, 0.8, 0.1, 0.2],  # image 2: its best caption, c5, is rank 5
    ])
    index = caption_image_index(2, 3)
    assert index.tolist() == [0, 0, 1, 1, 2, 2]
    r = recall_at_k(sim, index, ks=(1, 2, 3, 4, 5))
    # image->text: any own caption counts, so images 0 and 1 are found at rank 1, image 2 at rank 5
    assert r["image->text"] == pytest.approx({1: 2 / 3, 2: 2 / 3, 3: 2 / 3, 4: 2 / 3, 5: 1.0})
    # text->image, rank of each caption's own image down its column:
    # c0 1, c1 2, c2 3, c3 2, c4 2, c5 1
    assert r["text->image"] == pytest.approx({1: 2 / 6, 2: 5 / 6, 3: 1.0, 4: 1.0, 5: 1.0})


def test_recall_perfect_and_retrieval_recall():
    emb = F.normalize(torch.randn(10, 16), dim=-1)
    captions = emb.repeat_interleave(5, dim=0) + 0.01 * torch.randn(50, 16)
    r = retrieval_recall(emb, captions, captions_per_image=5)
    assert r["image->text"][1] == 1.0 and r["text->image"][1] == 1.0


def test_chance_recall_is_exact():
    c = chance_recall(76, 5, ks=(1, 5, 10))
    assert c["text->image"] == pytest.approx({1: 1 / 76, 5: 5 / 76, 10: 10 / 76})
    assert c["image->text"][1] == pytest.approx(5 / 380)
    assert c["image->text"][5] == pytest.approx(1 - math.comb(375, 5) / math.comb(380, 5))
    # Monte-Carlo agreement: random similarity matrices score chance on average
    torch.manual_seed(0)
    index = caption_image_index(5, 20)
    runs = [recall_at_k(torch.rand(20, 100), index, ks=(5,)) for _ in range(300)]
    mc = {d: sum(r[d][5] for r in runs) / len(runs) for d in ("image->text", "text->image")}
    exact = chance_recall(20, 5, ks=(5,))
    assert mc["text->image"] == pytest.approx(exact["text->image"][5], abs=0.02)
    assert mc["image->text"] == pytest.approx(exact["image->text"][5], abs=0.03)


# ----------------------------------------------------------------------------- LiT model


def random_features(n=32, tokens=4, image_dim=24, captions=3, text_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, tokens, image_dim, generator=g).half(),
            torch.randn(n, captions, text_dim, generator=g))


def tiny_lit(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return LiTModel(LiTConfig(image_dim=24, text_dim=12, embed_dim=16, hidden_dim=32, dropout=dropout))


def test_lit_overfits_a_few_batches():
    images, texts = random_features()
    model = tiny_lit()
    before = evaluate_lit(model, images, texts, ks=(1,))
    config = LiTTrainConfig(epochs=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=10, bf16=False)
    result = train_lit(model, images, texts, config, dev=(images, texts))
    loss = result.column("loss")
    assert len(loss) == 60 * (32 // 16)  # epochs are converted to steps
    assert sum(loss[-10:]) < 0.5 * sum(loss[:10])
    dev_loss = result.column("dev_loss", "evals")
    assert dev_loss[-1] < 0.5 * dev_loss[0]
    assert result.column("step", "evals") == list(range(9, 120, 10))  # every 10 steps, the last one included
    after = evaluate_lit(model, images, texts, ks=(1,))
    assert after["text->image"][1] > before["text->image"][1] + 0.3
    assert after["image->text"][1] > before["image->text"][1] + 0.3
    assert not model.training  # left in eval mode


def test_seeded_training_is_deterministic():
    images, texts = random_features()

    def run(seed):
        config = LiTTrainConfig(epochs=5, batch_size=8, seed=seed, warmup_steps=2, bf16=False)
        return train_lit(tiny_lit(seed=1, dropout=0.1), images, texts, config)

    a, b, c = run(3), run(3), run(4)
    assert a.column("loss") == b.column("loss")
    assert a.column("inverse_temperature") == b.column("inverse_temperature")
    assert a.column("loss") != c.column("loss")  # the seed picks the batches and the dropout masks


def test_batches_hold_distinct_images_with_one_of_their_own_captions():
    n, c = 10, 3
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    # caption j of image i carries the value 100 * i + j
    texts = (100 * torch.arange(n)[:, None] + torch.arange(c)[None, :]).float().view(n, c, 1)
    batch_fn = lit_batches(images, texts, batch_size=8)
    seen = set()
    for step in range(20):
        batch = batch_fn(step, torch.Generator().manual_seed(step))
        image_ids = batch["image_features"].view(-1).long()
        caption_values = batch["text_features"].view(-1).long()
        assert len(set(image_ids.tolist())) == 8  # no image twice: its copy would be a false negative
        assert torch.equal(caption_values // 100, image_ids)
        seen.update(caption_values.tolist())
    assert len(seen) > 0.8 * n * c  # over many steps, most captions are used
    again = batch_fn(0, torch.Generator().manual_seed(0))
    assert torch.equal(again["text_features"], batch_fn(0, torch.Generator().manual_seed(0))["text_features"])
    assert lit_batches(images, texts, batch_size=64)(0, torch.Generator())["image_features"].shape[0] == n


def test_training_checkpoints_and_resumes(tmp_path):
    images, texts = random_features()
    config = LiTTrainConfig(epochs=3, batch_size=8, warmup_steps=2, bf16=False,
                            checkpoint_dir=str(tmp_path / "lit"), checkpoint_every=4)
    trained = tiny_lit()
    first = train_lit(trained, images, texts, config)
    assert (tmp_path / "lit" / "model.safetensors").is_file()
    fresh = tiny_lit(seed=5)
    resumed = train_lit(fresh, images, texts, config)  # finds the finished run: trains no more steps
    assert resumed.column("loss") == first.column("loss")
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_temperature_is_learnable_and_frozen_on_request():
    model = LiTModel(LiTConfig(image_dim=8, text_dim=6))
    assert model.logit_scale.requires_grad
    assert model.temperature == pytest.approx(0.07)
    frozen = LiTModel(LiTConfig(image_dim=8, text_dim=6, learn_logit_scale=False))
    assert not frozen.logit_scale.requires_grad


# ----------------------------------------------------------------------------- caption features


class FakeTextEncoder:
    """`load_text_encoder`-like: tokenize -> dict, call -> (B, T, H); token k has hidden value k."""

    name = "fake-text"

    def __init__(self):
        self.calls = 0

    def tokenize(self, texts):
        length = max(len(t.split()) for t in texts)
        mask = torch.tensor([[1] * len(t.split()) + [0] * (length - len(t.split())) for t in texts])
        return {"input_ids": mask.cumsum(1) * mask, "attention_mask": mask}

    def __call__(self, input_ids, attention_mask):
        self.calls += 1
        return input_ids.float()[..., None].expand(-1, -1, 3)


def test_caption_features_are_mask_pooled_aligned_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path))

    class Data:
        image_ids = ["a.jpg", "b.jpg", "c.jpg"]
        captions = [["one", "one two"], ["one two three", "x"], ["p q", "p q r s"]]

    encoder = FakeTextEncoder()
    feats = features.cache_caption_features(encoder, Data, image_ids=["c.jpg", "a.jpg"])
    assert feats.shape == (2, 2, 3)
    # mean over real tokens of 1..n = (n + 1) / 2; padding is ignored
    torch.testing.assert_close(feats[:, :, 0], torch.tensor([[1.5, 2.5], [1.0, 1.5]]))
    calls = encoder.calls
    again = features.cache_caption_features(encoder, Data, image_ids=["c.jpg", "a.jpg"])
    assert encoder.calls == calls and torch.equal(again, feats)  # read from disk
    with pytest.raises(ValueError, match="not in the dataset"):
        features.cache_caption_features(encoder, Data, image_ids=["zzz.jpg"])


# ----------------------------------------------------------------------------- zero-shot path


def test_clip_embeddings_with_a_tiny_hf_model_matches_forward():
    model = tiny_hf_clip()
    images = [torch.randn(3, 32, 32) for _ in range(3)]
    captions = [f"caption {i}{j}" for i in range(3) for j in range(2)]
    image_embeds, text_embeds = clip_embeddings(model, FakeProcessor(), images, captions, batch_size=4,
                                                progress=False)
    assert image_embeds.shape == (3, 16) and text_embeds.shape == (6, 16)
    proc = FakeProcessor()
    with torch.no_grad():
        out = model(pixel_values=proc(images=images)["pixel_values"], **proc(text=captions))
    torch.testing.assert_close(image_embeds, out.image_embeds)
    torch.testing.assert_close(text_embeds, out.text_embeds)
    r = retrieval_recall(image_embeds, text_embeds, captions_per_image=2)
    assert set(r) == {"image->text", "text->image"}


def test_load_hub_clip_refuses_the_cpu_profile():
    from vlmcourse.profiles import HubUnavailableError, get_profile

    with pytest.raises(HubUnavailableError, match="cpu"):
        backbones.load_hub_clip(get_profile("cpu"))


def test_load_hub_clip_fails_fast_offline(monkeypatch):
    from vlmcourse.profiles import HubUnavailableError, get_profile

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no network
    with pytest.raises(HubUnavailableError, match="cpu"):  # a name no local cache holds
        backbones.load_hub_clip(get_profile("hub", device="cpu"), name="vlmcourse-tests/no-such-clip")


def test_recall_ties_count_against_the_model():
    """A model that scores every pair the same must not look perfect."""

    flat = recall_at_k(torch.zeros(4, 8), caption_image_index(2, 4), ks=(1,))
    assert flat == {"image->text": {1: 0.0}, "text->image": {1: 0.0}}
