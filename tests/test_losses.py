import math

import pytest
import torch
import torch.nn.functional as F

from vlmcourse import losses as L
from vlmcourse import qformer as qformer_module
from vlmcourse.backbones import load_text_encoder
from vlmcourse.stage1 import Stage1Config, Stage1Model
from vlmcourse.train import TrainConfig, train


def test_itc_equals_a_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 5), dim=-1)      # 3 images, 4 queries
    txt = F.normalize(torch.randn(3, 5), dim=-1)
    temp = torch.tensor(0.1)
    loss, sim = L.itc_loss(img, txt, temp)
    s = [[max(float(img[i, q] @ txt[t]) for q in range(4)) / 0.1 for t in range(3)] for i in range(3)]
    i2t = -sum(s[i][i] - math.log(sum(math.exp(v) for v in s[i])) for i in range(3)) / 3
    t2i = -sum(s[t][t] - math.log(sum(math.exp(s[i][t]) for i in range(3))) for t in range(3)) / 3
    assert torch.allclose(sim, torch.tensor(s), atol=1e-5)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_itc_with_duplicate_photos_spreads_the_target():
    img = F.normalize(torch.randn(3, 2, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    loss, sim = L.itc_loss(img, txt, torch.tensor(0.07), image_ids=["a", "a", "b"])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    assert loss.item() == pytest.approx(expected.item())


def test_hard_negative_sampler_never_returns_a_positive_and_prefers_hard_ones():
    ids = ["a", "a", "b", "c", "d", "e"]
    pos = L.positives(ids)
    sim = torch.randn(6, 6) * 5
    sim[:, 3] += 20             # text 3 looks like every image: the hard negative for all but image 3
    g = torch.Generator().manual_seed(0)
    neg_text, neg_image = zip(*(L.sample_hard_negatives(sim, pos, g) for _ in range(300)))
    neg_text, neg_image = torch.stack(neg_text), torch.stack(neg_image)
    assert not pos[torch.arange(6), neg_text].any()
    assert not pos[neg_image, torch.arange(6)].any()
    assert (neg_text[:, 0] == 3).float().mean() > 0.95
    with pytest.raises(ValueError, match="no negative"):
        L.sample_hard_negatives(torch.zeros(2, 2), L.positives(["a", "a"]))


def test_itg_inputs_replace_cls_and_ignore_padding():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    decoder_ids, labels = L.itg_inputs(ids, mask, bos_token_id=1)
    assert decoder_ids[:, 0].tolist() == [1, 1] and decoder_ids[:, 1:].equal(ids[:, 1:])
    assert labels.tolist() == [[1, 7, 8, 102, -100], [1, 9, 102, -100, -100]]


@pytest.fixture(scope="module")
def text():
    return load_text_encoder("tiny")


def tiny_model(text, losses=("itc", "itm", "itg")):
    torch.manual_seed(0)
    return Stage1Model.from_text_encoder(text, image_hidden_size=24, num_image_tokens=9,
                                         config=Stage1Config(num_query_tokens=4, losses=losses))


def test_each_loss_uses_the_qformer_mask(text, monkeypatch):
    seen = []
    real = qformer_module.self_attention_mask

    def spy(mask_type, num_query_tokens, attention_mask):
        seen.append(mask_type)
        return real(mask_type, num_query_tokens, attention_mask)

    monkeypatch.setattr(qformer_module, "self_attention_mask", spy)
    model = tiny_model(text)
    model(torch.randn(4, 9, 24), ["a dog", "a cat runs", "two men", "snow"])
    assert seen == ["itc", "itm", "itg"]
    assert not any(name.endswith("mask") and callable(getattr(L, name)) for name in dir(L))  # no private copies


@pytest.mark.parametrize("loss_name", ["itc", "itm", "itg"])
def test_each_loss_falls_when_overfitting_a_batch_of_8(text, loss_name):
    model = tiny_model(text, losses=(loss_name,))
    x = torch.randn(8, 9, 24, generator=torch.Generator().manual_seed(1))
    captions = ["a black dog", "a white cat", "two red cars", "a boy on a bike", "snow on a hill",
                "a girl in a pool", "men playing football", "a bird in a tree"]
    result = train(model, lambda step, g: (x, captions, None, g), lambda m, b: m(*b),
                   TrainConfig(steps=60, lr=1e-2, warmup_steps=3, bf16=False, desc=loss_name))
    first, last = result.column(loss_name)[:3], result.column(loss_name)[-3:]
    if loss_name == "itm":
        # 1 match per 2 non-matches: a model blind to the pairs can do no better than their entropy
        blind = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
        assert sum(last) / 3 < 0.9 * blind, (first, last)
    else:
        assert sum(last) < 0.7 * sum(first), (first, last)


def test_generate_and_itm_scores_shapes(text):
    model = tiny_model(text)
    x = torch.randn(3, 9, 24)
    assert len(model.generate(x, max_new_tokens=3)) == 3
    scores = model.itm_scores(x, ["a", "b", "c"])
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.raises(ValueError, match=r"\(B, 9, 24\)"):
        model.image_features(torch.randn(3, 8, 24))
