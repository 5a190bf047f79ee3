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


def test_instructblip_vqa_reads_the_question_in_the_qformer():
    """InstructBLIPVQA: its loss is the soft-prompt loss with the question's tokens in the Q-Former (the same number
    computed by hand), gradients reach the Q-Former's embeddings of the question's words, the answers come one row
    at a time (no shared image prefix), and a list of questions per photo is refused."""
    from vlmcourse.backbones import load_llm, load_text_encoder
    from vlmcourse.vqa import InstructBLIPVQA, SoftPromptVQA, answer_all

    llm, tokenizer = load_llm("tiny"), load_text_encoder("tiny").tokenizer
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                    num_query_tokens=Q, encoder_hidden_size=D))
    model = InstructBLIPVQA(InstructQFormerConnector(qformer), 32, llm, tokenizer).eval()    # no dropout
    image, questions, answers = torch.randn(2, N, D), ["What colour is the circle?", "Where is it?"], ["red", "top"]
    loss = model(image, questions, answers)
    tok = tokenizer(questions, padding=True, return_tensors="pt")
    plain = SoftPromptVQA(QFormerConnector(qformer), 32, llm)
    plain.proj = model.proj
    with torch.no_grad():
        soft = model.proj(qformer(image, tok.input_ids, tok.attention_mask, mask_type="itm").query_output)
        plain.soft_prompts = lambda x: soft                                     # the queries computed by hand
        torch.testing.assert_close(loss.detach(), plain(image, questions, answers))
    loss.backward()
    grad = qformer.embeddings.word_embeddings.weight.grad
    asked = tok.input_ids[tok.attention_mask.bool()].unique()
    assert grad[asked].abs().sum(1).gt(0).all() and grad.abs().sum() == grad[asked].abs().sum()
    assert not model.shares_image_prefix
    rows = [{"image": i % 2, "instruction": q} for i, q in enumerate(questions * 2)]
    assert answer_all(model, image, rows, max_new_tokens=2) == \
        [model.answer(image[r["image"]:r["image"] + 1], [r["instruction"]], 2)[0] for r in rows]
    with pytest.raises(ValueError, match="one question per image"):
        model(image, [questions, questions], [answers, answers])
