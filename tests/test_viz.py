"""Tests for vlmcourse.viz: cross-attention maps (ours and Hugging Face BLIP-2's),
upsampling, entropy, centroids, cross-photo consistency, and the explorer's
static fallback. Tiny random models only; fast."""
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vlmcourse import viz  # noqa: E402
from vlmcourse.qformer import QFormer, QFormerConfig  # noqa: E402

Q, D, GRID = 6, 16, (3, 4)  # queries, image-token width, a non-square patch grid (N = 12)
N = GRID[0] * GRID[1]


def tiny_qformer(seed=0, **overrides):
    values = dict(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=16, num_query_tokens=Q, encoder_hidden_size=D, cross_attention_frequency=2)
    values.update(overrides)
    torch.manual_seed(seed)
    return QFormer(QFormerConfig(**values)).eval()


def photo(size=(48, 36), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- our Q-Former
def test_maps_shape_and_sum_to_one():
    qformer = tiny_qformer()
    image = torch.randn(3, N, D)
    maps = viz.cross_attention_maps(qformer, image, GRID)
    layers = len(qformer.config.cross_attention_layers)
    assert layers == 2
    assert maps.shape == (layers, 3, 4, Q, *GRID)
    assert maps.dtype == torch.float32 and maps.device.type == "cpu"
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(maps.shape[:-2]))
    assert (maps >= 0).all()
    # row-major: the map is the raw (B, heads, Q, N) probabilities, reshaped
    raw = qformer(image_embeds=image, output_attentions=True).cross_attentions
    torch.testing.assert_close(maps[1, 2, 3, 4].flatten(), raw[1][2, 3, 4])


def test_maps_restore_training_mode_and_check_grid():
    qformer = tiny_qformer().train()
    viz.cross_attention_maps(qformer, torch.randn(1, N, D), GRID)
    assert qformer.training
    with pytest.raises(ValueError, match="grid"):
        viz.cross_attention_maps(qformer, torch.randn(1, N, D), (5, 5))


def test_query_input_similarity():
    qformer = tiny_qformer()
    image = torch.randn(2, N, D)
    sim = viz.query_input_similarity(qformer, image)
    assert sim.shape == (2,) and (sim.abs() <= 1 + 1e-5).all()
    assert all(len(layer.cross_attn._forward_pre_hooks) == 0 for layer in qformer.layers if layer.cross_attn)
    with torch.no_grad():
        qformer.query_tokens.copy_(qformer.query_tokens[:, :1].expand_as(qformer.query_tokens))  # all queries equal
    sim = viz.query_input_similarity(qformer, image)
    torch.testing.assert_close(sim, torch.ones(2))  # ... stay equal: same input, same computation
    maps = viz.cross_attention_maps(qformer, image, GRID)
    torch.testing.assert_close(maps[:, :, :, 1:], maps[:, :, :, :1].expand_as(maps[:, :, :, 1:]))  # and attend alike


def test_distinct_queries_and_collapse_table():
    """Query collapse measured: 3 groups of near-identical vectors count as 3; equal queries stay one vector."""
    base = torch.randn(3, 8)
    vectors = torch.stack([base[[0, 0, 1, 2, 2, 2]] + 1e-4 * torch.randn(6, 8), torch.randn(6, 8)])  # (2 photos, Q, H)
    assert viz.distinct_queries(vectors).tolist() == [3, 6]
    assert viz.distinct_queries(vectors, threshold=-1.01).tolist() == [1, 1]
    torch.testing.assert_close(viz.mean_query_cosine(vectors[:, [0, 1]]), torch.tensor([1.0, float(
        torch.nn.functional.cosine_similarity(vectors[1, 0], vectors[1, 1], dim=0))]), atol=1e-4, rtol=0)
    qformer = tiny_qformer()
    image = torch.randn(2, N, D)
    table = viz.query_collapse(qformer, image)
    layers = [i for i, layer in enumerate(qformer.layers) if layer.cross_attn is not None]
    assert list(table.index) == [f"entering layer {i}" for i in layers] + ["output"]
    torch.testing.assert_close(torch.tensor(table["mean cosine of two queries"].values[:-1], dtype=torch.float32),
                               viz.query_input_similarity(qformer, image))
    with torch.no_grad():
        qformer.query_tokens.copy_(qformer.query_tokens[:, :1].expand_as(qformer.query_tokens))  # all queries equal
    collapsed = viz.query_collapse(qformer, image)
    assert (collapsed["distinct queries (cosine < 0.99)"] == 1).all() and (collapsed["distinct queries (cosine < 0.9)"] == 1).all()


def test_rigged_heads_are_localised_on_their_patch():
    """Rig layer 0: every query's query vector is all ones, and head m's key reads only image feature m.
    Patch targets[m] is the only one with feature m, so head m must put (nearly) all its attention there."""
    qformer = tiny_qformer()
    attn = qformer.layers[0].cross_attn
    heads, size = attn.num_heads, attn.head_size
    targets = [0, 5, 7, 11]  # one patch per head, anywhere on the 3 x 4 grid
    with torch.no_grad():
        attn.query.weight.zero_()
        attn.query.bias.fill_(1.0)
        attn.key.weight.zero_()
        attn.key.bias.zero_()
        for m in range(heads):
            attn.key.weight[m * size:(m + 1) * size, m] = 20.0
    image = torch.zeros(2, N, D)
    for m, patch in enumerate(targets):
        image[:, patch, m] = 1.0
    maps = viz.cross_attention_maps(qformer, image, GRID)[0]  # (B, heads, Q, h, w)
    for m, patch in enumerate(targets):
        row, col = divmod(patch, GRID[1])
        assert (maps[:, m, :, row, col] > 0.99).all()
        # and the drawing keeps it there: the upsampled map peaks inside that patch
        up = viz.upsample_map(maps[0, m, 0], (30, 40))
        r, c = divmod(int(up.argmax()), 40)
        assert (r // 10, c // 10) == (row, col)
    # averaging the heads spreads it over the four patches, 1/heads each
    mean = maps.mean(1)
    for patch in targets:
        torch.testing.assert_close(mean[:, :, patch // GRID[1], patch % GRID[1]],
                                   torch.full((2, Q), 1 / heads), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- numbers
def test_upsample_keeps_the_argmax_region():
    for patch in range(N):
        onehot = torch.zeros(GRID)
        onehot[divmod(patch, GRID[1])] = 1.0
        up = viz.upsample_map(onehot, (30, 40))
        assert up.shape == (30, 40)
        r, c = divmod(int(up.argmax()), 40)
        assert (r // 10, c // 10) == divmod(patch, GRID[1])
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 2, *GRID, generator=g) * 0.3  # batches of maps with one clear peak each
    maps[..., 2, 1] += 1.0
    up = viz.upsample_map(maps, 60)
    assert up.shape == (5, 2, 60, 60)
    flat = up.flatten(-2).argmax(-1)
    assert ((flat // 60) // 20 == 2).all() and ((flat % 60) // 15 == 1).all()


def test_entropy_uniform_and_one_hot():
    uniform = torch.full((2, 5, *GRID), 1 / N)
    torch.testing.assert_close(viz.attention_entropy(uniform), torch.full((2, 5), math.log(N)))
    onehot = torch.zeros(3, *GRID)
    onehot[0, 0, 0] = onehot[1, 2, 3] = onehot[2, 1, 2] = 1.0
    torch.testing.assert_close(viz.attention_entropy(onehot), torch.zeros(3))
    half = torch.zeros(GRID)
    half[0, 0] = half[2, 3] = 0.5
    assert math.isclose(float(viz.attention_entropy(half)), math.log(2), rel_tol=1e-6)


def test_centroid():
    onehot = torch.zeros(GRID)
    onehot[2, 1] = 1.0
    torch.testing.assert_close(viz.attention_centroid(onehot), torch.tensor([2.0, 1.0]))
    uniform = torch.full((4, *GRID), 1 / N)
    torch.testing.assert_close(viz.attention_centroid(uniform), torch.tensor([[1.0, 1.5]] * 4))


def test_map_correlation_and_query_similarity():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, *GRID, generator=g)
    torch.testing.assert_close(viz.map_correlation(a, 3 * a + 1), torch.ones(4))
    torch.testing.assert_close(viz.map_correlation(a, -a), -torch.ones(4))
    assert abs(viz.map_correlation(a[0], torch.full(GRID, 1 / N)).item()) < 1e-4  # a flat map correlates with nothing
    maps = torch.rand(5, 3, *GRID, generator=g)
    maps[:, 2] = maps[:, 0]  # queries 0 and 2 read the same places in every photo
    sim = viz.query_similarity(maps)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim.diagonal(), torch.ones(3))
    torch.testing.assert_close(sim, sim.T)
    assert sim[0, 2] > 0.999 and abs(sim[0, 1]) < 0.5
    x = maps[:, 0].flatten(1), maps[:, 1].flatten(1)
    expected = np.mean([np.corrcoef(x[0][p], x[1][p])[0, 1] for p in range(5)])
    assert math.isclose(sim[0, 1].item(), expected, abs_tol=1e-5)


def test_query_region_consistency():
    g = torch.Generator().manual_seed(0)
    P = 8
    maps = torch.rand(P, 3, *GRID, generator=g)
    maps[:, 0] = maps[0, 0]  # query 0: the very same map in every photo
    maps[:, 0, 1, 3] += 5.0  # ... peaking at (1, 3)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    table = viz.query_region_consistency(maps)
    assert list(table.index) == [0, 1, 2]
    assert math.isclose(table.loc[0, "consistency"], 1.0, abs_tol=1e-5)
    assert (table.loc[0, "peak row"], table.loc[0, "peak col"]) == (1, 3)
    assert math.isclose(table.loc[0, "centroid spread"], 0.0, abs_tol=1e-5)
    assert abs(table.loc[1, "consistency"]) < 0.3 and abs(table.loc[2, "consistency"]) < 0.3  # independent noise
    # the formula (all pairs at once) agrees with a plain loop over pairs
    x = maps[:, 1].flatten(1)
    pairs = [np.corrcoef(x[i], x[j])[0, 1] for i in range(P) for j in range(P) if i != j]
    assert math.isclose(table.loc[1, "consistency"], float(np.mean(pairs)), abs_tol=1e-5)
    fig = viz.plot_region_consistency(table, maps.mean(0), top=2)
    assert len(fig.axes) == 1 + 2 + 1  # bars, two maps, colour bar
    with pytest.raises(ValueError):
        viz.query_region_consistency(maps[:1])


# --------------------------------------------------------------------------- drawing
def test_overlay_and_query_grid_draw():
    maps = torch.softmax(torch.randn(Q, *GRID), dim=-1)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    fig, ax = plt.subplots()
    mappable = viz.overlay(ax, photo(), maps[0], grid=True, title="q0")
    top = float(viz.upsample_map(maps[0] * N, (36, 48)).max())
    assert mappable.norm.vmax == pytest.approx(max(top, viz.MIN_VMAX))
    assert viz.overlay(ax, photo(), torch.full(GRID, 1 / N)).norm.vmax == viz.MIN_VMAX  # flat map: not saturated
    assert viz.overlay(ax, photo(), maps[0], vmax=50.0).norm.vmax == 50.0
    assert len(ax.images) == 6
    grid = viz.query_grid(photo(), maps, cols=3, title="all queries")
    assert len([a for a in grid.axes if a.images]) == Q


# --------------------------------------------------------------------------- Hugging Face BLIP-2
def tiny_blip2_config(num_query_tokens=8):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=32, cross_attention_frequency=2)
    text = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=32)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=num_query_tokens, image_token_index=99)


def tiny_processor():
    from transformers import BlipImageProcessorPil  # the PIL one: no torchvision here

    return BlipImageProcessorPil(size={"height": 32, "width": 32})


def test_blip2_tiny_config_maps():
    from transformers import Blip2ForConditionalGeneration, Blip2Model

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration._from_config(tiny_blip2_config(), attn_implementation="eager").eval()
    processor = tiny_processor()
    image = photo((60, 40))
    maps = viz.blip2_cross_attention(model, processor, image)  # last layer, heads averaged
    assert maps.shape == (8, 4, 4)  # (Q, h, w): 32 px / 8 px patches
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(8))
    per_head = viz.blip2_cross_attention(model, processor, image, layer=0, average_heads=False)
    assert per_head.shape == (4, 8, 4, 4)
    assert viz.blip2_display_image(processor, image).size == (32, 32)

    # The same maps as Blip2Model's own outputs (qformer_outputs.cross_attentions) with the same weights.
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    all_maps, cls_share = viz.blip2_cross_attention_maps(model, pixel_values)
    assert all_maps.shape == (2, 1, 4, 8, 4, 4) and cls_share.shape == (2, 1, 4, 8)
    assert ((cls_share > 0) & (cls_share < 1)).all()
    torch.testing.assert_close(all_maps[-1, 0].mean(0), maps)
    base = Blip2Model._from_config(tiny_blip2_config(), attn_implementation="eager").eval()
    base.vision_model.load_state_dict(model.vision_model.state_dict())
    base.qformer.load_state_dict(model.qformer.state_dict())
    with torch.no_grad():
        base.query_tokens.copy_(model.query_tokens)
        out = base(pixel_values=pixel_values, input_ids=torch.tensor([[99] * 8 + [5, 6]]), output_attentions=True)
    theirs, their_cls = viz.hf_cross_attention_maps(out.qformer_outputs.cross_attentions, (4, 4))
    torch.testing.assert_close(theirs, all_maps)
    torch.testing.assert_close(their_cls, cls_share)


def test_blip2_without_eager_attention_says_so():
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration._from_config(tiny_blip2_config(), attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="eager"):
        viz.blip2_cross_attention(model, tiny_processor(), photo())


# --------------------------------------------------------------------------- explorer
def test_explorer_falls_back_to_static_without_widgets(monkeypatch):
    maps = torch.softmax(torch.randn(2, 3, 4, Q, N), dim=-1).reshape(2, 3, 4, Q, *GRID)
    images = [photo(seed=s) for s in range(3)]
    assert not viz.widgets_available()  # plain pytest: no Jupyter kernel
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # and now not even installed
    assert not viz.widgets_available()
    before = len(plt.get_fignums())
    assert viz.explorer(images, maps, layer_names=["layer 0", "layer 2"], query=2) is None
    figures = [plt.figure(n) for n in plt.get_fignums()[before:]]
    assert len(figures) == 1
    assert len([a for a in figures[0].axes if a.images]) == 3 * 2  # photos x layers
    # asked for widgets anyway, without ipywidgets: a note, still no crash
    assert viz.explorer(images, maps, interactive=True) is None


def test_explorer_widget_and_view():
    pytest.importorskip("ipywidgets")
    maps = torch.softmax(torch.randn(2, 2, 4, Q, N), dim=-1).reshape(2, 2, 4, Q, *GRID)
    images = [photo(seed=s) for s in range(2)]
    ui = viz.explorer(images, maps, interactive=True)
    assert ui is not None and "Jupyter" in repr(ui)
    picture = ui.children[-1]
    before = picture.value
    assert before[:4] == b"\x89PNG"
    ui.children[1].children[0].value = 4  # move the query slider: the view is redrawn
    assert picture.value != before
    fig = viz.plot_view(images, maps, photo=1, layer=0, query=3, head=2)
    assert len(fig.axes) == 3  # overlay, numbers, colour bar
