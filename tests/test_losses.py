import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlmcourse import losses as L
from vlmcourse import qformer as qformer_module
from vlmcourse.backbones import load_text_encoder
from vlmcourse.clip import clip_loss
from vlmcourse.stage1 import Stage1Config, Stage1Model
from vlmcourse.train import TrainConfig, train


def test_itc_equals_a_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 5), dim=-1)      # 3 images, 4 queries
    txt = F.normalize(torch.randn(3, 5), dim=-1)
    loss, sim = L.itc_loss(img, txt, torch.tensor(math.log(1 / 0.1)))      # logit_scale = log(1/τ), τ = 0.1
    s = [[max(float(img[i, q] @ txt[t]) for q in range(4)) / 0.1 for t in range(3)] for i in range(3)]
    i2t = -sum(s[i][i] - math.log(sum(math.exp(v) for v in s[i])) for i in range(3)) / 3
    t2i = -sum(s[t][t] - math.log(sum(math.exp(s[i][t]) for i in range(3))) for t in range(3)) / 3
    assert torch.allclose(sim, torch.tensor(s), atol=1e-5)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-5)


def test_itc_with_duplicate_photos_spreads_the_target():
    img = F.normalize(torch.randn(3, 2, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    loss, sim = L.itc_loss(img, txt, torch.tensor(L.LOGIT_SCALE_INIT), image_ids=["a", "a", "b"])
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    assert loss.item() == pytest.approx(expected.item())


def test_itc_with_one_query_is_clips_loss_with_the_same_temperature():
    """One temperature convention across the course: stage 1's ITC, given one query per photo and one caption
    each, is notebook 02's CLIP loss for the same logit_scale, capped the same way."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 1, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    for logit_scale in (L.LOGIT_SCALE_INIT, math.log(250.0)):           # under CLIP's cap of 100, and over it
        scale = torch.tensor(logit_scale, requires_grad=True)
        itc, _ = L.itc_loss(img, txt, scale)
        clip = clip_loss(img[:, 0], txt, scale)
        torch.testing.assert_close(itc, clip)
        # the same gradient for the temperature too (0 over the cap: the cap holds it there, in both)
        (g_itc,), (g_clip,) = torch.autograd.grad(itc, scale), torch.autograd.grad(clip, scale)
        torch.testing.assert_close(g_itc, g_clip)
        assert (g_itc == 0) == (logit_scale > math.log(L.MAX_LOGIT_SCALE))


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



def test_itg_loss_through_the_head_on_labelled_positions_only_is_the_same_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[1, 7, 8, 3, -100], [1, 9, -100, -100, -100]])
    full = L.itg_loss(head(hidden), labels, label_smoothing=0.1)
    assert torch.allclose(L.itg_loss(hidden, labels, label_smoothing=0.1, lm_head=head), full, atol=1e-6)
    kept = []
    head.register_forward_hook(lambda m, i, o: kept.append(i[0].shape[0]))
    L.itg_loss(hidden, labels, lm_head=head)
    assert kept == [4]       # 3 + 1 positions predict a label; padding never reaches the head

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


def test_itg_loss_reusing_the_itc_queries_equals_a_full_itg_pass(text):
    model, image = tiny_model(text, losses=("itc", "itg")).eval(), torch.randn(4, 9, 24)
    captions = ["a dog", "a cat runs", "two men", "snow"]
    with torch.no_grad():
        got = model(image, captions)["itg"]
        ids, mask = model.tokenize(captions)
        decoder_ids, labels = L.itg_inputs(ids, mask, model.bos_id)
        full = model.qformer(image_embeds=model.image_adapter(image), input_ids=decoder_ids, attention_mask=mask,
                             mask_type="itg")
        expected = L.itg_loss(full.text_output, labels, model.config.itg_label_smoothing, lm_head=model.qformer.lm_head)
    assert torch.allclose(got, expected, atol=1e-5)


def test_generate_reading_cached_queries_writes_what_full_itg_passes_write(text):
    model, image = tiny_model(text).eval(), torch.randn(3, 9, 24)
    with torch.no_grad():
        adapted, ids = model.image_adapter(image), torch.full((3, 1), model.bos_id)
        for _ in range(4):      # greedy decoding, queries recomputed at every step
            out = model.qformer(image_embeds=adapted, input_ids=ids, mask_type="itg")
            ids = torch.cat([ids, model.qformer.lm_head(out.text_output[:, -1]).argmax(-1)[:, None]], dim=1)
    sep = model.tokenizer.sep_token_id
    expected = [model.tokenizer.decode(row[1:row.tolist().index(sep) + 1 if sep in row else None],
                                       skip_special_tokens=True) for row in ids]
    assert model.generate(image, max_new_tokens=4) == expected


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


def test_stage1_learns_the_temperature_as_logit_scale_from_0_07(text):
    model = tiny_model(text)
    assert model.temperature == pytest.approx(0.07) and model.logit_scale.requires_grad
    with torch.no_grad():
        model.logit_scale.fill_(math.log(2000.0))       # over BLIP-2's cap: τ stays at 0.001
    assert model.temperature == pytest.approx(0.001)


def test_stage1_saves_and_loads_its_temperature_and_refuses_the_old_one(text, tmp_path):
    model = tiny_model(text).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.05))
    model.save_pretrained(tmp_path / "m")
    loaded = Stage1Model.from_pretrained(tmp_path / "m")
    assert loaded.temperature == pytest.approx(0.05)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["stage1"]["temp"] = config["stage1"].pop("logit_scale_init")       # as saved before issue 18
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="before its temperature became logit_scale"):
        Stage1Model.from_pretrained(tmp_path / "m")


def test_generate_and_itm_scores_shapes(text):
    model = tiny_model(text)
    x = torch.randn(3, 9, 24)
    assert len(model.generate(x, max_new_tokens=3)) == 3
    scores = model.itm_scores(x, ["a", "b", "c"])
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 1)).all()
    with pytest.raises(ValueError, match=r"\(B, 9, 24\)"):
        model.image_features(torch.randn(3, 8, 24))


def test_recording_masks_sees_each_loss_mask_and_changes_nothing(text):
    from vlmcourse.stage1 import recording_masks

    model = tiny_model(text).eval()
    x, captions = torch.randn(4, 9, 24), ["a dog", "a cat runs", "two men", "snow"]
    torch.manual_seed(0)
    plain = model(x, captions)
    with recording_masks() as calls:
        torch.manual_seed(0)
        recorded = model(x, captions)
    assert [name for name, _ in calls] == ["itc", "itm", "itg"]
    q, t = 4, model.tokenize(captions)[0].shape[1]
    m = model.config.itm_batch_size or 4
    assert [tuple(mask.shape) for _, mask in calls] == [(4, q + t, q + t), (3 * m, q + t, q + t), (4, q + t, q + t)]
    assert all(torch.equal(plain[k], recorded[k]) for k in plain)
    assert qformer_module.self_attention_mask.__name__ == "self_attention_mask"   # put back afterwards


def test_itm_score_groups_pairs_and_ranges(text):
    from vlmcourse.stage1 import itc_features, itm_score_groups, retrieval

    model = tiny_model(text)
    x = torch.randn(5, 9, 24)
    captions = [[f"photo {i} caption {k}" for k in range(3)] for i in range(5)]
    image_feats, text_feats = itc_features(model, x, captions, batch_size=2)
    assert image_feats.shape == (5, 4, 256) and text_feats.shape == (15, 256)
    recall = retrieval(model, x, captions, ks=(1, 15))
    assert recall["image->text"][15] == 1.0 and recall["text->image"][15] == 1.0
    groups = itm_score_groups(model, x, captions, torch.Generator().manual_seed(0), batch_size=2)
    assert set(groups) == {"matched", "random", "hard negative"}
    for scores in groups.values():
        assert scores.shape == (5,) and ((0 <= scores) & (scores <= 1)).all()
    # the matched score is the head's score of a real own caption
    model.eval()
    own = torch.stack([model.itm_scores(x[i:i + 1], [c])[0] for i in range(5) for c in captions[i]]).view(5, 3)
    assert all(any(abs(float(s) - float(o)) < 1e-5 for o in own[i]) for i, s in enumerate(groups["matched"]))


def test_stage1_plots_draw(text):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from vlmcourse.plots import plot_captions, plot_itm_histograms, plot_stage1_history
    from vlmcourse.train import TrainResult

    full = TrainResult(history=[{"step": s, "itc": 3 - s / 10, "itm": 0.64, "itg": 9 - s / 5, "loss": 1.0}
                                for s in range(15)],
                       evals=[{"step": 9, "dev_i2t_r5": 0.3, "dev_t2i_r5": 0.2}])
    itc_only = TrainResult(history=[{"step": s, "itc": 3 - s / 8, "loss": 1.0} for s in range(15)])
    fig = plot_stage1_history({"all three": full, "ITC only": itc_only}, batch_size=32, n_eval_images=78)
    assert len(fig.axes) == 4 and len(fig.axes[3].lines) >= 2
    ax = plot_itm_histograms({"matched": torch.rand(10), "random": torch.rand(10), "hard negative": torch.rand(10)})
    assert len(ax.get_legend().get_texts()) == 4          # three kinds + the blind line at 1/3
    zoomed = plot_itm_histograms({"matched": torch.full((5,), 0.3), "random": torch.full((5,), 0.31)}, value_range=None)
    assert 0.25 < zoomed.get_xlim()[0] < 0.3 < 0.31 < zoomed.get_xlim()[1] < 0.36
    photo = Image.new("RGB", (32, 32))
    fig = plot_captions([photo] * 4, ["a dog"] * 4, ["a dog runs on the grass"] * 4, ncols=3)
    assert sum(t.get_text().startswith("ITG:") for a in fig.axes for t in a.texts) == 4
    plt.close("all")


def backward_ops(loss) -> set[str]:
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_itm_gathers_hard_negative_photos_without_racing_gradient_adds(text, monkeypatch):
    # Two texts may pick the same hard-negative photo. The backward of x[index] adds their gradients into one
    # row with atomic adds from several threads on a CPU, in an order that changes from run to run (in a full
    # stage-1 run, from step 15 on); index_select's backward adds them in order.
    def same_photo(sim_i2t, is_positive, generator=None, random_fraction=0.0):
        neg = torch.ones(sim_i2t.shape[0], dtype=torch.long)
        neg[1] = 0
        return neg, neg.clone()

    monkeypatch.setattr(L, "sample_hard_negatives", same_photo)
    model = tiny_model(text, losses=("itm",))
    ops = backward_ops(model(torch.randn(4, 9, 24), ["a dog", "a cat runs", "two men", "snow"])["loss"])
    assert "IndexSelectBackward0" in ops
    assert "IndexBackward0" not in ops


def test_itm_reading_the_itc_pass_photos_equals_projecting_them_again(text, monkeypatch):
    """The ITM pass takes its photos' cross-attention keys and values from the ITC pass (Stage1Model.forward):
    the loss and every gradient equal an ITM pass that projects the picked photos again (``itm_logits``)."""
    def fixed(sim_i2t, is_positive, generator=None, random_fraction=0.0):
        return torch.tensor([2, 3, 0, 0]), torch.tensor([1, 1, 3, 0])      # texts, photos

    monkeypatch.setattr(L, "sample_hard_negatives", fixed)
    photos, captions = torch.randn(4, 9, 24), ["a dog", "a cat runs on the grass", "two men", "snow"]

    def grads(loss_fn):
        model = tiny_model(text, losses=("itm",))
        loss_fn(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def projected_again(model):
        embeds = model.image_adapter(photos)
        ids, att = model.tokenize(captions)
        idx, neg_text, neg_image = torch.arange(4), torch.tensor([2, 3, 0, 0]), torch.tensor([1, 1, 3, 0])
        logits = model.itm_logits(embeds.index_select(0, torch.cat([idx, idx, neg_image])),
                                  torch.cat([ids, ids[neg_text], ids]), torch.cat([att, att[neg_text], att]))
        return L.itm_loss(logits, 4)[0]

    got, expected = grads(lambda m: m(photos, captions)["loss"]), grads(projected_again)
    assert got.keys() == expected.keys() and "image_adapter.position" in got
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
