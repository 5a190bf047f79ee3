"""Stage 1's learning settings (issue 17): new parameters at a higher lr, a cross-attention that starts able to
move, ITM negatives partly random, and the query-collapse measure. Every option defaults to the first recipe."""
import hashlib
import json
import math
from dataclasses import MISSING, asdict, fields, is_dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from vlmcourse import losses as L
from vlmcourse import pipeline
from vlmcourse.backbones import load_text_encoder
from vlmcourse.qformer import QFormer, QFormerConfig
from vlmcourse.recipes import CaptionerRecipe, Stage1Recipe, Stage2Recipe
from vlmcourse.stage1 import Stage1Config, Stage1Model, init_cross_attention, query_diversity
from vlmcourse.train import make_optimizer
from vlmcourse.viz import attention_entropy, cross_attention_maps

NEW_OPTIONS = {"new_lr_scale": 10.0, "lr_scales": {"image_adapter.": 10.0}}
NEW_MODEL_OPTIONS = {"itm_random_negatives": 0.5, "cross_attention_logit_std": 2.0, "image_positions": "sincos"}


@pytest.fixture(scope="module")
def text():
    return load_text_encoder("tiny")


def tiny_model(text, seed=0, **options):
    torch.manual_seed(seed)
    return Stage1Model.from_text_encoder(text, image_hidden_size=24, num_image_tokens=9,
                                         config=Stage1Config(num_query_tokens=4, **options))


# ----------------------------------------------------------------------------- defaults keep the cache
def old_key(recipe) -> str:
    """The key as the first recipes computed it (sha1 of asdict), over the fields that existed then: every field
    added since is marked ``metadata={"key": "if_changed"}`` (the new options here among them)."""
    marked = set()

    def strip(obj, d):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("key") == "if_changed":
                marked.add(f.name)
                default = f.default_factory() if f.default_factory is not MISSING else f.default
                assert value == default, f"{f.name} is not at its default in a default recipe"
                del d[f.name]
            elif is_dataclass(value):
                strip(value, d[f.name])
        return d

    settings = strip(recipe, asdict(recipe))
    if isinstance(recipe, Stage1Recipe):
        assert {*NEW_OPTIONS, *NEW_MODEL_OPTIONS} <= marked
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


@pytest.mark.parametrize("recipe, cached", [(Stage1Recipe(), "07a2972b21"), (Stage2Recipe(), "3e992ad550"),
                                             (Stage2Recipe(stage1=None), "f9d85448e6"),
                                             (CaptionerRecipe(), "3ea68ec6cf"),
                                             (CaptionerRecipe.cli_default(), "9434af1f75")],
                         ids=["stage1", "stage2", "stage2 fresh", "captioner", "cli captioner"])
def test_recipes_that_keep_the_new_options_at_their_defaults_keep_their_cached_models(recipe, cached):
    # The literal keys are the folder names these recipes have had since the stage-1 temperature became
    # logit_scale (issue 18: Stage1Config.logit_scale_init and max_logit_scale, Stage1Recipe.temperature_lr_scale,
    # which changed every key with a stage-1 recipe in it, on purpose: a model with the old temperature is never
    # loaded). A fresh-Q-Former stage 2 kept its key (commit 8c29851's).
    assert recipe.key() == old_key(recipe) == cached


def test_each_new_option_changes_the_key():
    base = Stage1Recipe()
    keys = {base.key(), *(replace(base, **{k: v}).key() for k, v in NEW_OPTIONS.items()),
            *(replace(base, model=replace(base.model, **{k: v})).key() for k, v in NEW_MODEL_OPTIONS.items())}
    assert len(keys) == 1 + len(NEW_OPTIONS) + len(NEW_MODEL_OPTIONS)
    changed = replace(Stage2Recipe(), stage1=replace(base, new_lr_scale=10.0))
    assert changed.key() != Stage2Recipe().key()


def test_sincos_positions_tell_every_cell_apart_and_start_the_adapter_there(text):
    from vlmcourse.adapter import ImageAdapter, sincos_2d
    codes = sincos_2d(49, 32)
    assert codes.shape == (49, 32) and codes.abs().max() <= 1
    # the first frequency is 1 rad per cell: row and column codes differ for every pair of distinct cells
    assert torch.cdist(codes, codes).add(torch.eye(49) * 9).min() > 0.1
    assert torch.allclose(codes[:, 0], torch.arange(7).repeat_interleave(7).float().sin())   # rows first
    assert torch.allclose(codes[:, 16], torch.arange(7).repeat(7).float().sin())             # then columns
    model = tiny_model(text, image_positions="sincos")
    assert torch.equal(model.image_adapter.position[0], sincos_2d(9, 24))
    assert tiny_model(text).image_adapter.position.abs().max() == 0
    for bad in ((48, 32), (49, 30)):
        with pytest.raises(ValueError, match="square grid"):
            sincos_2d(*bad)
    with pytest.raises(ValueError, match="unknown position_init"):
        ImageAdapter(9, 24, position_init="learned")


# ----------------------------------------------------------------------------- (a) new parameters learn faster
def test_the_new_parameters_are_exactly_those_bert_did_not_initialise(text):
    a, b = tiny_model(text, seed=0), tiny_model(text, seed=1)
    prefixes = a.new_parameter_prefixes()
    is_new = {n: any(n.startswith(k) for k in prefixes) for n, _ in a.named_parameters()}
    other = dict(b.named_parameters())
    random_init = {n for n, p in a.named_parameters() if not torch.equal(p, other[n])}
    assert random_init and all(is_new[n] for n in random_init)          # every randomly drawn tensor is new
    # and every new matrix (not a zero-initialised one) is drawn at random: nothing BERT gave is in the list
    assert all(n in random_init for n, p in a.named_parameters() if is_new[n] and p.ndim >= 2 and p.any())
    assert not any(is_new[n] for n in ("qformer.embeddings.word_embeddings.weight",
                                       "qformer.layers.0.self_attn.query.weight", "qformer.layers.1.ffn_query.fc1.weight"))


def test_train_stage1_gives_the_new_parameters_their_lr_scale(flickr_dir, tmp_path, monkeypatch, text):
    monkeypatch.setenv("VLMCOURSE_DATA", str(flickr_dir))
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))
    seen = {}
    real_train = pipeline.train

    def spy(model, batches, loss_fn, config, **kwargs):
        seen["optimizer"] = make_optimizer(model, config)
        seen["names"] = {id(p): n for n, p in model.named_parameters()}
        seen["prefixes"] = model.new_parameter_prefixes()
        return real_train(model, batches, loss_fn, config, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    recipe = Stage1Recipe(steps=2, batch_size=4, eval_every=0, new_lr_scale=10.0,
                          model=Stage1Config(num_query_tokens=4))
    pipeline.train_stage1("tiny", recipe)
    lr_of = {seen["names"][id(p)]: g["lr_scale"] * recipe.lr for g in seen["optimizer"].param_groups
             for p in g["params"]}
    for name, lr in lr_of.items():
        new = any(name.startswith(k) for k in seen["prefixes"])
        # the temperature has its own multiple (1/0.07: logit_scale = log(1/τ) moves τ as BLIP-2's τ moved)
        scale = recipe.temperature_lr_scale if name == "logit_scale" else 10.0 if new else 1.0
        assert lr == pytest.approx(recipe.lr * scale), name
    assert sorted({round(lr, 8) for lr in lr_of.values()}) == [3e-4, 3e-3, round(3e-4 / 0.07, 8)]   # all three kinds


# ----------------------------------------------------------------------------- (b) cross-attention that can move
def real_size_qformer(seed=0):
    """The cpu profile's sizes (MiniLM 384-d, 12 heads; 1280-d EfficientNet patches), two layers, random weights."""
    torch.manual_seed(seed)
    config = QFormerConfig(vocab_size=100, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                           intermediate_size=64, num_query_tokens=32, encoder_hidden_size=1280)
    return QFormer(config).eval()


def first_layer_maps(qformer):
    # the image adapter hands the Q-Former layer-normalised patches: unit variance
    patches = F.layer_norm(torch.randn(4, 49, 1280, generator=torch.Generator().manual_seed(1)), (1280,))
    return cross_attention_maps(qformer, patches, (7, 7))[0]            # (B, heads, Q, 7, 7)


def test_bert_init_starts_the_cross_attention_flat_and_the_logit_std_option_does_not():
    uniform = math.log(49)
    flat = attention_entropy(first_layer_maps(real_size_qformer())).mean().item()
    assert flat > uniform - 0.1                                         # BERT's 0.02: logits std ~0.3, ~uniform
    qformer = real_size_qformer()
    init_cross_attention(qformer, logit_std=2.0)
    maps = first_layer_maps(qformer)
    assert attention_entropy(maps).mean().item() < uniform - 1.0
    # softmax is shift-invariant: the log-probabilities of a row are its logits minus a constant
    logit_std = maps.flatten(-2).log().std(-1).mean().item()
    assert logit_std == pytest.approx(2.0, rel=0.25)
    assert torch.equal(qformer.layers[1].self_attn.query.weight, real_size_qformer().layers[1].self_attn.query.weight)


def test_the_logit_std_option_reaches_the_stage1_model_and_leaves_the_rest_alone(text):
    default, scaled = tiny_model(text), tiny_model(text, cross_attention_logit_std=2.0)
    hidden, width = 32, 24
    changed = {n for n, p in scaled.named_parameters() if not torch.equal(p, dict(default.named_parameters())[n])}
    assert changed == {f"qformer.layers.{i}.cross_attn.{w}.weight" for i in (0,) for w in ("query", "key")}
    std = scaled.qformer.layers[0].cross_attn.key.weight.std().item()
    assert std == pytest.approx(math.sqrt(2.0 / math.sqrt(hidden * width)), rel=0.2)


# ----------------------------------------------------------------------------- (c) ITM on random negatives too
def draws(sim, pos, fraction, n=3000):
    g = torch.Generator().manual_seed(0)
    return torch.stack([L.sample_hard_negatives(sim, pos, g, random_fraction=fraction)[0] for _ in range(n)])


def test_random_negatives_mix_uniform_draws_into_the_hard_ones():
    ids = ["a", "a", "b", "c", "d", "e"]
    pos = L.positives(ids)
    sim = torch.zeros(6, 6)
    sim[:, 3] += 30                     # text 3 is the hard negative of every image but its own
    for fraction, expected in ((0.0, 1.0), (0.5, 0.5 + 0.5 / 4), (1.0, 1 / 4)):   # image 0 has 4 negatives
        picks = draws(sim, pos, fraction)[:, 0]
        assert (picks == 3).float().mean().item() == pytest.approx(expected, abs=0.03), fraction
        assert not pos[0, picks].any()
    uniform = draws(sim, pos, 1.0)[:, 0]
    assert set(uniform.tolist()) == {2, 3, 4, 5}
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noisy = torch.randn(6, 6)
    assert all(torch.equal(a, b) for a, b in zip(L.sample_hard_negatives(noisy, pos, g1),
                                                 L.sample_hard_negatives(noisy, pos, g2, random_fraction=0.0)))
    with pytest.raises(ValueError, match="random_fraction"):
        L.sample_hard_negatives(noisy, pos, random_fraction=1.5)


def test_stage1_draws_its_itm_negatives_with_the_configured_fraction(text, monkeypatch):
    seen = []
    real = L.sample_hard_negatives

    def spy(sim, pos, generator=None, random_fraction=0.0):
        seen.append(random_fraction)
        return real(sim, pos, generator, random_fraction)

    monkeypatch.setattr(L, "sample_hard_negatives", spy)
    captions = ["a dog", "a cat runs", "two men", "snow"]
    for fraction in (0.0, 0.5):
        tiny_model(text, itm_random_negatives=fraction)(torch.randn(4, 9, 24), captions)
    assert seen == [0.0, 0.5]


# ----------------------------------------------------------------------------- (d) query collapse, measured
def test_query_use_on_constructed_queries():
    """Two photos, two captions each. Query 0 of photo 0 leans towards photo 1's captions, query 1 points at its own:
    the max over queries and their mean retrieve photo 0's captions, query 0 alone does not."""
    from vlmcourse.metrics import caption_image_index
    from vlmcourse.stage1 import query_use

    e = torch.eye(4)
    text_f = e[[0, 0, 1, 1]]                                   # captions 0, 1 of photo 0; 2, 3 of photo 1
    image_q = torch.stack([torch.stack([0.6 * e[1] + 0.8 * e[2], e[0]]), e[[1, 1]]])
    owner = caption_image_index([2, 2])
    use = query_use(image_q, text_f, owner, k=1)
    assert use["image→text R@1, max over queries (%)"] == 100.0
    assert use["image→text R@1, mean over queries (%)"] == 100.0 and use["image→text R@1, query 0 alone (%)"] == 50.0
    assert use["cosine of two queries of one photo"] == pytest.approx(0.5)   # photo 0 orthogonal, photo 1 identical
    collapsed = query_use(e[[0, 1]][:, None].repeat(1, 3, 1), text_f, owner, k=1)
    assert collapsed["cosine of two queries of one photo"] == pytest.approx(1.0)
    assert len({v for k, v in collapsed.items() if k.startswith("image")}) == 1    # max = mean = one query


def test_query_diversity_on_constructed_queries():
    eye = torch.eye(6)
    collapsed = query_diversity(torch.ones(2, 6, 6) + 0.001 * eye)
    assert collapsed["distinct queries"] == 1 and collapsed["mean pairwise cosine"] > 0.99
    assert collapsed["effective rank"] < 1.1
    orthogonal = query_diversity(3 * eye[None].repeat(2, 1, 1))
    assert orthogonal["distinct queries"] == 6 and orthogonal["mean pairwise cosine"] == pytest.approx(0.0)
    assert orthogonal["effective rank"] == pytest.approx(6.0)
    two = query_diversity(eye[[0, 0, 0, 1, 1, 1]][None])                 # two groups of three identical queries
    assert two["distinct queries"] == 2 and two["effective rank"] == pytest.approx(2.0)
    assert two["mean pairwise cosine"] == pytest.approx(12 / 30)         # 2 x 3 x 2 same-group pairs of 30
    mixed = query_diversity(torch.stack([torch.ones(6, 6), eye]))        # per image, then averaged
    assert mixed["distinct queries"] == pytest.approx(3.5)
    with pytest.raises(ValueError, match=r"\(B, Q, D\)"):
        query_diversity(torch.randn(6, 4))
