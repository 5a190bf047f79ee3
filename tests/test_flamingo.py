"""Tests for vlmcourse.flamingo: the closed gates leave the frozen LLM unchanged, an open one lets the image in,
the resampler's shapes and its attention against torch's, and a few training steps. Tiny random configs only."""
import pytest
import torch
from torch import nn

from vlmcourse.backbones import load_llm
from vlmcourse.connectors import connector_from_config
from vlmcourse.flamingo import FlamingoLM, GatedCrossAttentionBlock, PerceiverResampler, ResamplerConfig
from vlmcourse.stage2 import IGNORE_INDEX, SoftPromptCaptioner

N, D = 16, 24       # patches, image-encoder width


@pytest.fixture(scope="module")
def llm():
    return load_llm("tiny")


def flamingo(llm, seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(every=1, num_latents=4, resampler_layers=1, resampler_size=16, num_heads=2, head_size=8, ff_mult=2)
    return FlamingoLM(llm, visual_dim=D, **{**options, **overrides})


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0                  # right padding
    mask[2, :3] = 0                  # left padding
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels


def images(seed, batch=3):
    return torch.randn(batch, N, D, generator=torch.Generator().manual_seed(seed))


def test_closed_gates_leave_the_llm_unchanged_with_padding(llm):
    model = flamingo(llm)
    ids, mask, labels = padded_batch()
    plain = llm.model(input_ids=ids, attention_mask=mask, labels=labels)
    wrapped = model(ids, mask, image_embeds=images(2), labels=labels)
    torch.testing.assert_close(wrapped.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.loss, plain.loss, rtol=0, atol=0)
    assert model.gates() == {0: {"attn": 0.0, "ff": 0.0}, 1: {"attn": 0.0, "ff": 0.0}}


def test_an_open_attention_gate_lets_the_image_in(llm):
    model = flamingo(llm)
    ids, mask, _ = padded_batch()
    plain = llm.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        model.blocks["1"].attn_gate.fill_(0.5)
    a, b = (model(ids, mask, image_embeds=images(s)).logits for s in (2, 3))
    assert not torch.allclose(a, plain, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)                      # the answer depends on the image
    torch.testing.assert_close(model(ids, mask, image_embeds=images(2)).logits, a)
    # the hooks act only inside the model's calls: the LLM alone still computes what it did
    torch.testing.assert_close(llm.model(input_ids=ids, attention_mask=mask).logits, plain, rtol=0, atol=0)
    assert model.gates()[1]["attn"] == pytest.approx(torch.tanh(torch.tensor(0.5)).item())


def test_the_image_enters_only_through_cross_attention(llm):
    model = flamingo(llm)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        model.blocks["0"].ff_gate.fill_(1.0)                           # feed-forward open, attention closed
    a, b = (model(ids, mask, image_embeds=images(s)).logits for s in (2, 3))
    assert not torch.allclose(a, llm.model(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    torch.testing.assert_close(a, b)


def test_blocks_sit_before_every_kth_layer_and_detach(llm):
    assert list(flamingo(llm, every=2).gates()) == [0]
    model = flamingo(llm)
    with torch.no_grad():
        model.blocks["0"].attn_gate.fill_(1.0)
    ids, mask, _ = padded_batch()
    model.remove_hooks()
    torch.testing.assert_close(model(ids, mask, image_embeds=images(2)).logits,
                               llm.model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("batch, patches", [(1, 16), (3, 49), (2, 1)])
def test_resampler_output_shapes(batch, patches):
    resampler = PerceiverResampler(ResamplerConfig(input_size=D, hidden_size=16, num_latents=5, num_layers=2))
    assert resampler(torch.randn(batch, patches, D)).shape == (batch, 5, 16)
    assert resampler.num_tokens == 5


def test_resampler_shape_errors():
    resampler = PerceiverResampler(ResamplerConfig(input_size=D, hidden_size=16, num_positions=N))
    with pytest.raises(ValueError, match=r"image_embeds must be \(B, N, 24\) \(input_size=24\), got \(2, 16, 32\)"):
        resampler(torch.randn(2, N, 32))
    with pytest.raises(ValueError, match="must be"):
        resampler(torch.randn(N, D))
    with pytest.raises(ValueError, match="position embedding for 16 patches, got 9"):
        resampler(torch.randn(2, 9, D))
    with pytest.raises(ValueError, match="divisible"):
        ResamplerConfig(hidden_size=10, num_heads=4)


def test_one_layer_resampler_matches_multihead_attention():
    torch.manual_seed(0)
    resampler = PerceiverResampler(ResamplerConfig(input_size=D, hidden_size=16, num_latents=3, num_layers=1,
                                                   num_heads=4)).eval()
    layer = resampler.layers[0]
    mha = nn.MultiheadAttention(16, 4, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([layer.attn.to_q.weight, layer.attn.to_k.weight, layer.attn.to_v.weight]))
        mha.out_proj.weight.copy_(layer.attn.to_out.weight)
        x = images(4, batch=2)
        # by hand: the latents query [patches; latents], then a feed-forward, then the final norm
        media, latents = resampler.input_proj(x), resampler.latents.expand(2, -1, -1)
        queries = layer.norm_latents(latents)
        context = torch.cat([layer.norm_media(media), queries], dim=1)
        attended, _ = mha(queries, context, context, need_weights=False)
        torch.testing.assert_close(layer.attn(queries, context), attended)
        latents = latents + attended
        expected = resampler.norm(latents + layer.ff(latents))
        torch.testing.assert_close(resampler(x), expected)


def test_training_reads_the_image_and_opens_the_gates():
    """Four photos, one prompt, a different answer token per photo: text alone can do no better than ln 4 nats.
    A 64-token Llama with larger weights than the tiny profile's, whose logits a random 49k-token head keeps
    within about +-0.7 (its loss cannot fall far below ln 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=1,
                                      pad_token_id=0, initializer_range=0.2)).eval()
    model = flamingo(lm).train()
    x = images(5, batch=4)
    ids = torch.tensor([[5, 6, 7, 10 + i] for i in range(4)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(ids, image_embeds=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * torch.log(torch.tensor(4.0)).item() < losses[0]
    with torch.no_grad():                                               # the photos swapped: the answers go wrong
        assert model(ids, image_embeds=x.roll(1, dims=0), labels=labels).loss > 3 * losses[-1]
    gates = model.gates()
    assert all(abs(g) > 0.01 for block in gates.values() for g in block.values())
    assert max(abs(block["attn"]) for block in gates.values()) > 0.1
    assert not lm.training and all(p.grad is None for p in lm.parameters())


def test_only_the_resampler_and_the_blocks_train(llm):
    model = flamingo(llm)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"resampler", "blocks"}
    expected = sum(p.numel() for part in (model.resampler, model.blocks) for p in part.parameters())
    assert model.num_trainable_parameters() == expected
    block = GatedCrossAttentionBlock(32, 16, num_heads=2, head_size=8, ff_mult=2)
    # cross-attention 32*16 + 2 * 16*16 + 16*32, feed-forward 2 * 32*64 plus its LayerNorm, 2 LayerNorms, 2 gates
    assert sum(p.numel() for p in block.parameters()) == 32 * 16 * 2 + 2 * 16 * 16 + 2 * 32 * 64 + 4 * 32 + 2


def test_greedy_left_padding_matches_each_prompt_alone(llm):
    model = flamingo(llm)
    with torch.no_grad():
        model.blocks["0"].attn_gate.fill_(1.0)
    prompts = [torch.tensor([5, 80, 900, 41, 7]), torch.tensor([300, 12])]
    ids = torch.stack([prompts[0], torch.cat([torch.full((3,), 2), prompts[1]])])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    x = images(6, batch=2)
    both = model.greedy(x, ids, mask, max_new_tokens=4, eos_token_id=-1)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(model.greedy(x[i:i + 1], p[None], max_new_tokens=4, eos_token_id=-1)[0], both[i])
    closed = flamingo(llm)             # gates at 0: greedy decoding is the LLM's own
    reference = llm.model.generate(prompts[0][None], max_new_tokens=4, do_sample=False, eos_token_id=-1,
                                   pad_token_id=2)
    torch.testing.assert_close(closed.greedy(x[:1], prompts[0][None], max_new_tokens=4, eos_token_id=-1)[0],
                               reference[0, 5:])
    answers = closed.generate(x, ["<|im_start|>user\nHi<|im_end|>\n", "Hello"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_resampler_is_a_soft_prompt_connector(llm, tmp_path):
    torch.manual_seed(0)
    resampler = PerceiverResampler(ResamplerConfig(input_size=D, hidden_size=16, num_latents=4, num_layers=1))
    model = SoftPromptCaptioner(resampler, 16, llm)
    loss = model(images(7, batch=2), ["a red circle", "a blue square at the top"])
    loss.backward()
    assert resampler.latents.grad is not None and model.soft_prompts(images(7, batch=2)).shape == (2, 4, 32)
    assert isinstance(connector_from_config(resampler.to_config()), PerceiverResampler)
    model.save_pretrained(tmp_path / "m")
    again = SoftPromptCaptioner.from_pretrained(tmp_path / "m", llm)
    torch.testing.assert_close(again.soft_prompts(images(8, batch=2)), model.eval().soft_prompts(images(8, batch=2)))
