"""Tests for vlmcourse.vit: patches, the conv/linear identity, position
embeddings, shape errors, and parity with Hugging Face's ViTModel."""
import pytest
import torch
import torch.nn.functional as F

from vlmcourse.patches import conv_to_linear, patchify, unpatchify
from vlmcourse.plots import pca_rgb
from vlmcourse.reference import hf_vit_key_mapping, load_hf_vit, trace_module_shapes, vit_from_hf_state_dict
from vlmcourse.vit import PatchEmbedding, ViT, ViTConfig, position_similarity, sincos_2d_position_embedding

SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128)


# ---------------------------------------------------------------- patches

@pytest.mark.parametrize("shape,patch", [((2, 3, 32, 32), 8), ((1, 1, 12, 20), 4), ((3, 4, 16, 8), 16 // 2)])
def test_unpatchify_inverts_patchify(shape, patch):
    x = torch.randn(shape)
    patches = patchify(x, patch)
    B, C, H, W = shape
    assert patches.shape == (B, (H // patch) * (W // patch), patch * patch * C)
    assert torch.equal(unpatchify(patches, patch, grid_size=(H // patch, W // patch)), x)


def test_patches_are_row_major_and_flattened_row_col_channel():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    P = 4
    patches = patchify(x, P)  # grid 2 x 3
    for b in range(2):
        for r in range(2):
            for c in range(3):
                crop = x[b, :, r * P:(r + 1) * P, c * P:(c + 1) * P]  # (C, P, P)
                assert torch.equal(patches[b, r * 3 + c], crop.permute(1, 2, 0).flatten())


def test_patch_order_matches_the_convolution():
    """Each conv output position, flattened, is the token of the same patch."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 24)
    P = 8
    conv = torch.nn.Conv2d(3, 5, P, stride=P)
    tokens = conv(x).flatten(2).transpose(1, 2)  # (B, N, 5)
    patches = patchify(x, P)
    for n in range(patches.shape[1]):
        one = torch.zeros_like(x)  # the image with every patch but n zeroed
        r, c = divmod(n, 3)
        one[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = x[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P]
        assert torch.allclose(conv(one).flatten(2).transpose(1, 2)[:, n], tokens[:, n], atol=1e-6)
    assert unpatchify(patches, P, (2, 3)).shape == x.shape


def test_stride_p_conv_equals_linear_on_flattened_patches():
    torch.manual_seed(0)
    config = ViTConfig(**SMALL)
    embed = PatchEmbedding(config)
    x = torch.randn(3, 3, 32, 32)
    linear = conv_to_linear(embed.projection)
    assert linear.weight.shape == (64, 8 * 8 * 3)
    with torch.no_grad():
        assert torch.allclose(embed(x), linear(patchify(x, 8)), atol=1e-5)
        # the naive reshape (no permute) is wrong for our (row, col, channel) patch order
        naive = patchify(x, 8) @ embed.projection.weight.reshape(64, -1).T + embed.projection.bias
        assert not torch.allclose(embed(x), naive, atol=1e-3)


# ---------------------------------------------------------------- position embeddings

def test_sincos_shape_values_and_distinct_positions():
    pe = sincos_2d_position_embedding(6, 9, 32)
    assert pe.shape == (54, 32)
    assert pe.abs().max() <= 1.0
    assert torch.cdist(pe, pe).add(torch.eye(54) * 1e3).min() > 1e-3  # every position is different
    # row half depends on the row only, column half on the column only (row-major order)
    grid = pe.reshape(6, 9, 32)
    assert torch.allclose(grid[:, :1, :16], grid[:, :, :16].mean(1, keepdim=True), atol=1e-6)
    assert torch.allclose(grid[:1, :, 16:], grid[:, :, 16:].mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0]).repeat_interleave(8).repeat(2))  # position (0, 0)


def test_sincos_nearer_positions_are_more_similar():
    h = w = 8
    sim = position_similarity(sincos_2d_position_embedding(h, w, 64), grid_size=(h, w))
    assert sim.shape == (64, 8, 8)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(h * w):
        r, c = divmod(i, w)
        dist = (rows - r).abs() + (cols - c).abs()
        s = sim[i]
        assert torch.isclose(s[r, c], torch.tensor(1.0), atol=1e-5)
        # every neighbour (distance 1) beats every position at distance >= 2
        assert s[dist == 1].min() > s[dist >= 2].max()
    centre = sim[4 * w + 4, 4]  # along the centre row: similarity falls with distance
    assert centre[4] > centre[3] > centre[2] > centre[1] > centre[0]


def test_position_similarity_matrix_and_cls_row():
    pe = torch.randn(1, 17, 12)
    sim = position_similarity(pe)
    assert sim.shape == (17, 17) and torch.allclose(sim, sim.T, atol=1e-6)
    assert torch.allclose(sim.diagonal(), torch.ones(17), atol=1e-5)
    grid = position_similarity(pe, grid_size=(4, 4))  # [CLS] row dropped
    expected = F.cosine_similarity(pe[0, 1:, None], pe[0, None, 1:], dim=-1)
    assert torch.allclose(grid.reshape(16, 16), expected, atol=1e-5)
    with pytest.raises(ValueError, match="3x4 grid"):
        position_similarity(pe, grid_size=(3, 4))


def test_sincos_vit_uses_fixed_buffer():
    model = ViT(ViTConfig(**SMALL, position_embedding="sincos"))
    pe = model.embeddings.position_embeddings
    assert not isinstance(pe, torch.nn.Parameter) and "embeddings.position_embeddings" not in model.state_dict()
    assert torch.equal(pe[0, 1:], sincos_2d_position_embedding(4, 4, 64))
    assert model(torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 17, 64)


# ---------------------------------------------------------------- shapes and errors

def test_trace_lists_every_step():
    model = ViT(ViTConfig(**SMALL))
    trace = model.trace_shapes(torch.randn(2, 3, 32, 32))
    shapes = dict(trace)
    assert trace[0] == ("pixel_values", (2, 3, 32, 32))
    assert shapes["patch conv (8x8, stride 8)"] == (2, 64, 4, 4)
    assert shapes["flatten grid -> sequence of patch tokens"] == (2, 16, 64)
    assert shapes["prepend [CLS] token"] == (2, 17, 64)
    assert shapes["  attention weights (token x token)"] == (2, 4, 17, 17)
    assert shapes["  MLP hidden layer"] == (2, 17, 128)
    assert [s for s, _ in trace[-3:]] == ["block 1 output", "block 2 output", "final LayerNorm"]


def test_config_derived_sizes():
    c = ViTConfig(image_size=384, patch_size=16)
    assert c.grid_size == (24, 24) and c.num_patches == 576 and c.seq_length == 577 and c.head_dim == 64


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: patchify(torch.zeros(1, 3, 30, 32), 8), r"height 30 is not divisible by patch_size 8.*24 or 32"),
        (lambda: patchify(torch.zeros(1, 3, 32, 36), 8), r"width 36 is not divisible"),
        (lambda: patchify(torch.zeros(3, 32, 32), 8), r"\(B, C, H, W\).*pixel_values\[None\]"),
        (lambda: PatchEmbedding(ViTConfig(**SMALL))(torch.zeros(1, 32, 32, 3)),
         r"Expected 3 channels, got 32.*permute"),
        (lambda: ViT(ViTConfig(**SMALL))(torch.zeros(1, 1, 32, 32)), r"Expected 3 channels, got 1"),
        (lambda: ViT(ViTConfig(**SMALL))(torch.zeros(1, 3, 64, 64)), r"built for 32x32 images.*got 64x64"),
        (lambda: ViTConfig(image_size=225, patch_size=16), r"image_size=225 is not divisible by patch_size=16"),
        (lambda: ViTConfig(hidden_size=100, num_attention_heads=3), r"num_attention_heads=3"),
        (lambda: unpatchify(torch.zeros(1, 12, 48), 4), r"12 patches do not make a square grid"),
        (lambda: sincos_2d_position_embedding(4, 4, 30), r"divisible by 4"),
    ],
)
def test_shape_errors_are_clear(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- Hugging Face parity

def hf_vit(seed=0, **overrides):
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTModel

    torch.manual_seed(seed)
    return ViTModel(HFViTConfig(**{**SMALL, **overrides}), add_pooling_layer=False).eval()


def test_matches_hf_vitmodel():
    hf = hf_vit()
    ours = load_hf_vit(hf).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True, output_attentions=True)
        assert torch.allclose(ours.embeddings(x), hf.embeddings(x), atol=1e-6)
    assert got.last_hidden_state.shape == (2, 17, 64) and got.grid_size == (4, 4)
    assert torch.allclose(got.last_hidden_state, expected.last_hidden_state, atol=1e-5)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert got.attentions[0].shape == (2, 4, 17, 17)
    assert torch.allclose(got.attentions[0].sum(-1), torch.ones(2, 4, 17), atol=1e-5)
    # and not by accident: a freshly initialised ViT gives something else
    fresh = ViT(ViTConfig(**SMALL)).eval()(x).last_hidden_state
    assert not torch.allclose(fresh, expected.last_hidden_state, atol=1e-2)


def test_matches_hf_without_qkv_bias_and_with_pooler_and_legacy_names():
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTModel

    torch.manual_seed(1)
    hf = ViTModel(HFViTConfig(**SMALL, qkv_bias=False, hidden_act="gelu_new")).eval()  # with its pooler
    config = ViTConfig.from_hf(hf.config)
    assert config.qkv_bias is False and config.hidden_act == "gelu_tanh"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        assert torch.allclose(load_hf_vit(hf)(x).last_hidden_state, expected, atol=1e-5)
        # checkpoints on the Hub use the pre-transformers-5 names, with a "vit." prefix in classifiers
        current = hf_vit_key_mapping(config)
        legacy = hf_vit_key_mapping(config, legacy=True)
        old_sd = {"vit." + legacy[ours]: hf.state_dict()[theirs] for ours, theirs in current.items()}
        old_sd["classifier.weight"] = torch.zeros(10, 64)
        assert torch.allclose(vit_from_hf_state_dict(old_sd, config)(x).last_hidden_state, expected, atol=1e-5)
    assert "blocks.0.attn.q_proj.bias" not in current
    assert legacy["blocks.1.attn.out_proj.weight"] == "encoder.layer.1.attention.output.dense.weight"


def test_hf_state_dict_mismatch_is_reported():
    hf = hf_vit()
    with pytest.raises(ValueError, match="missing.*layers.2"):
        vit_from_hf_state_dict(hf.state_dict(), ViTConfig(**{**SMALL, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="Shape mismatch"):
        vit_from_hf_state_dict(hf.state_dict(), ViTConfig(**{**SMALL, "intermediate_size": 96}))


# ---------------------------------------------------------------- notebook helpers

def test_trace_module_shapes_on_meta_device():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    trace = trace_module_shapes(model, ["embeddings.patch_embedding", "embeddings", "encoder.layers.1"],
                                pixel_values=torch.empty(2, 3, 32, 32, device="meta"))
    assert trace == [("embeddings.patch_embedding", (2, 64, 4, 4)), ("embeddings", (2, 17, 64)),
                     ("encoder.layers.1", (2, 17, 64))]
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        trace_module_shapes(model, ["nope"])


def test_pca_rgb_separates_two_kinds_of_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(12, 32) * 0.01
    tokens[:6] += torch.randn(32)  # two clusters: the first two rows of a 4 x 3 grid, and the rest
    rgb = pca_rgb(tokens, (4, 3))
    assert rgb.shape == (4, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].reshape(-1)
    assert abs(first[:6].mean() - first[6:].mean()) > 0.9  # the top component splits the clusters
