"""Tests for vlmcourse.instructblip: the queries read the instruction (bidirectional mask), the plain Q-Former
connector does not."""
import pytest
import torch

from vlmcourse.adapter import ImageAdapter
from vlmcourse.connectors import QFormerConnector, connector_from_config
from vlmcourse.instructblip import InstructQFormerConnector
from vlmcourse.qformer import QFormer, QFormerConfig

Q, T, N, D = 3, 5, 10, 24      # queries, instruction tokens, patches, image-encoder width


def tiny_qformer(seed=0):
    torch.manual_seed(seed)
    return QFormer(QFormerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32, num_query_tokens=Q,
                                 encoder_hidden_size=D)).eval()


def instructions(seed):
    ids = torch.randint(1, 100, (2, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 3:] = 0
    return ids, mask


def test_query_outputs_follow_the_instruction():
    qformer = tiny_qformer()
    instruct, plain = InstructQFormerConnector(qformer), QFormerConnector(qformer)
    image = torch.randn(2, N, D)
    with torch.no_grad():
        a, b = instruct(image, *instructions(1)), instruct(image, *instructions(2))
        assert a.shape == (2, Q, 32)
        assert not torch.allclose(a, b, atol=1e-4)                   # another question, other queries
        torch.testing.assert_close(instruct(image), plain(image))   # no instruction: BLIP-2's queries
        # the same as the Q-Former under the ITM mask; under ITC (queries never see text) the plain queries
        torch.testing.assert_close(a, qformer(image, *instructions(1), mask_type="itm").query_output)
        torch.testing.assert_close(qformer(image, *instructions(1), mask_type="itc").query_output, plain(image))


def test_the_mask_is_bidirectional():
    connector = InstructQFormerConnector(tiny_qformer())
    ids, mask = instructions(1)
    pattern = connector.attention_pattern(mask)
    assert pattern.shape == (2, Q + T, Q + T)
    assert pattern[0].all()                                         # queries <-> instruction, both ways
    expected = torch.ones(Q + T, Q + T, dtype=torch.bool)
    expected[:, Q + 3:] = False                                     # nobody reads the padding
    assert torch.equal(pattern[1], expected)
    # what the self-attention really did: queries read the instruction, the instruction reads the queries
    out = connector.qformer(torch.randn(2, N, D), ids, mask, mask_type=connector.mask_type, output_attentions=True)
    for probs in out.attentions:
        assert (probs[:, :, :Q, Q:Q + 3] > 0).all() and (probs[:, :, Q:, :Q] > 0).all()
        assert (probs[1, :, :, Q + 3:] == 0).all()


def test_instruction_context_reaches_a_captioner():
    from vlmcourse.backbones import load_llm
    from vlmcourse.stage2 import SoftPromptCaptioner

    torch.manual_seed(0)
    connector = InstructQFormerConnector(tiny_qformer(), ImageAdapter(N, D))
    model = SoftPromptCaptioner(connector, 32, load_llm("tiny")).eval()
    image = torch.randn(2, N, D)
    with torch.no_grad():
        alone = model.soft_prompts(image)
        with connector.instruction(*instructions(1)):
            asked = model.soft_prompts(image)
        assert not torch.allclose(alone, asked, atol=1e-4)
        torch.testing.assert_close(model.soft_prompts(image), alone)     # the instruction is gone afterwards
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        connector(image, instructions(1)[0][:1])


def test_config_round_trip():
    connector = InstructQFormerConnector(tiny_qformer(), ImageAdapter(N, D))
    config = connector.to_config()
    assert config["type"] == "instruct_qformer"
    again = connector_from_config(config)
    assert type(again) is InstructQFormerConnector and isinstance(again.image_norm, ImageAdapter)
    assert again.qformer.config == connector.qformer.config
