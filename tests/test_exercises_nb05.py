"""The answer checks of notebook 05 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.stage2 import PrecomputedConnector, SoftPromptCaptioner
from vlmcourse.exercises import nb05
from vlmcourse.exercises.nb05 import (check_build_inputs, check_cacheable, check_encoder_decoder, check_labels,
                                      check_projection_params, expected_labels)


def out(capsys):
    return capsys.readouterr().out


def test_the_exercise_answer_is_what_the_bridge_builds():
    """Exercise 1's answer, checked against SoftPromptCaptioner.build_inputs on the tiny LLM."""
    llm = load_llm("tiny")
    model = SoftPromptCaptioner(PrecomputedConnector(nb05.EXERCISE_NUM_SOFT, 8), 8, llm)
    captions = ["a dog runs", "two dogs run on the wet sand"]
    _, _, labels = model.build_inputs(torch.zeros(2, nb05.EXERCISE_NUM_SOFT, 8), captions)
    ids = model.caption_ids(captions)
    text_len, prompt_len = max(len(i) for i in ids), len(model.prompt_ids)
    row = labels[0].tolist()
    # the same layout: prefix all -100, caption ids, one EOS, padding -100
    assert row[:nb05.EXERCISE_NUM_SOFT + prompt_len] == [-100] * (nb05.EXERCISE_NUM_SOFT + prompt_len)
    assert row[nb05.EXERCISE_NUM_SOFT + prompt_len:] == ids[0].tolist() + [-100] * (text_len - len(ids[0]))
    assert model.eos_id == model.tokenizer.pad_token_id
    assert expected_labels() == [-100] * 4 + [7, 8, 9, 2, -100, -100]


def test_labels_check(capsys):
    assert check_labels(None) is None
    assert "Not attempted" in out(capsys)
    check_labels(expected_labels())
    assert out(capsys).startswith("✓")
    check_labels(torch.tensor(expected_labels()))
    assert out(capsys).startswith("✓")
    for wrong, phrase in (([41] * 4 + [7, 8, 9, 2, -100, -100], "inputs, not targets"),
                          ([-100] * 4 + [7, 8, 9, -100, -100, -100], "masked the EOS"),
                          ([-100] * 4 + [7, 8, 9, 2, 2, 2], "padding positions"),
                          ([-100] * 4 + [7, 7, 7, 2, -100, -100], "caption tokens"),
                          ([-100] * 3 + [7, 8, 9, 2, -100, -100, -100], "shifted the labels yourself")):
        check_labels(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, (wrong, text)
    check_labels([1, 2])
    assert "Expected 10 labels" in out(capsys)
    check_labels("abc")
    assert out(capsys).startswith("✗")


def test_projection_params_check(capsys):
    check_projection_params(None)
    assert "Not attempted" in out(capsys)
    check_projection_params(384 * 576 + 576)
    assert out(capsys).startswith("✓")
    check_projection_params(384 * 576)
    assert "bias" in out(capsys)
    check_projection_params(32 * (384 * 576 + 576))
    assert "shared" in out(capsys)
    check_projection_params(384 * 576 + 384)
    assert "per *output*" in out(capsys)
    check_projection_params(12)
    assert out(capsys).startswith("✗")
    check_projection_params("many")
    assert "number" in out(capsys)
    check_projection_params(768 * 2560 + 2560, connector_size=768, llm_size=2560)
    assert out(capsys).startswith("✓")


def test_encoder_decoder_check(capsys):
    check_encoder_decoder(None)
    text = out(capsys)
    assert "Not attempted" in text and "d)" in text
    check_encoder_decoder(" A) ")
    assert out(capsys).startswith("✓")
    for wrong, phrase in (("b", "given text goes to the encoder"), ("c", "decoder-only"), ("d", "cross-attends")):
        check_encoder_decoder(wrong)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text
    check_encoder_decoder("z")
    assert "one of the letters" in out(capsys)


@pytest.mark.parametrize("frozen", [True, False])
def test_cacheable_check(capsys, frozen):
    check_cacheable(None, qformer_frozen=frozen)
    assert "Not attempted" in out(capsys)
    right = {"image features", "query outputs"} if frozen else {"image features"}
    check_cacheable({r.upper() for r in right}, qformer_frozen=frozen)
    assert out(capsys).startswith("✓")
    check_cacheable(right | {"soft prompts"}, qformer_frozen=frozen)
    assert "projection is trained" in out(capsys)
    check_cacheable({"query outputs"} if not frozen else {"image features"}, qformer_frozen=frozen)
    assert out(capsys).startswith("✗")
    check_cacheable({"pixels"}, qformer_frozen=frozen)
    assert "Unknown" in out(capsys)
    check_cacheable(3, qformer_frozen=frozen)
    assert "set of names" in out(capsys)


def right_inputs(num_soft, prompt_ids, caption_ids, eos_id):
    """A learner's correct my_inputs: right padding, masked by position."""
    width = num_soft + len(prompt_ids) + max(len(c) for c in caption_ids) + 1
    mask = torch.zeros(len(caption_ids), width, dtype=torch.long)
    labels = torch.full((len(caption_ids), width), -100)
    for i, c in enumerate(caption_ids):
        end = num_soft + len(prompt_ids) + len(c) + 1
        mask[i, :end] = 1
        labels[i, num_soft + len(prompt_ids):end] = torch.tensor(list(c) + [eos_id])
    return mask, labels


def make_inputs(mistake):
    """right_inputs with one classic mistake."""
    def my_inputs(num_soft, prompt_ids, caption_ids, eos_id):
        mask, labels = right_inputs(num_soft, prompt_ids, caption_ids, eos_id)
        if mistake == "mask_by_pad_id":            # the usual recipe: -100 wherever the id is the pad id (= EOS id)
            n = num_soft + len(prompt_ids)
            ids = labels[:, n:].masked_fill(mask[:, n:] == 0, eos_id)    # the caption block, padded with the pad id
            labels[:, n:] = ids.masked_fill(ids == eos_id, -100)
            mask[:, n:] = (ids != eos_id).long()
        elif mistake == "pads_labelled":
            labels = labels.masked_fill(mask == 0, eos_id)
        elif mistake == "prefix_labelled":
            labels[:, :num_soft + len(prompt_ids)] = 0
        elif mistake == "no_eos":
            labels, mask = labels[:, :-1], mask[:, :-1]
        elif mistake == "left":
            labels, mask = right_inputs_left(num_soft, prompt_ids, caption_ids, eos_id, labels, mask)
        elif mistake == "prefix_unattended":
            mask[:, :num_soft] = 0
        elif mistake == "pads_attended":
            mask = torch.ones_like(mask)
        return mask, labels
    return my_inputs


def right_inputs_left(num_soft, prompt_ids, caption_ids, eos_id, labels, mask):
    n = num_soft + len(prompt_ids)
    for i in range(labels.shape[0]):
        text, pads = labels[i, n:], int((mask[i, n:] == 0).sum())
        labels[i, n:] = torch.cat([text[text.shape[0] - pads:], text[:text.shape[0] - pads]])
    return labels, torch.ones_like(mask)


@pytest.fixture(scope="module")
def tiny_captioner():
    llm = load_llm("tiny")
    return SoftPromptCaptioner(PrecomputedConnector(3, 8), 8, llm)


def test_build_inputs_reference_is_the_bridge(tiny_captioner):
    """The made-up case's reference is what build_inputs lays out (the real-caption case calls build_inputs itself)."""
    captions = ["a dog runs", "two dogs run on the wet sand"]
    ids = [c[:-1].tolist() for c in tiny_captioner.caption_ids(captions)]
    _, mask, labels = tiny_captioner.build_inputs(torch.zeros(2, 3, 8), captions)
    want = nb05.reference_inputs(3, tiny_captioner.prompt_ids.tolist(), ids, tiny_captioner.eos_id)
    assert torch.equal(want[0], mask) and torch.equal(want[1], labels)
    assert torch.equal(right_inputs(3, tiny_captioner.prompt_ids.tolist(), ids, tiny_captioner.eos_id)[1], labels)
    assert nb05.reference_inputs(2, [41, 42], [[7, 8, 9]], 2)[1][0].tolist() == expected_labels()[:8]


def test_build_inputs_check(capsys, tiny_captioner):
    assert check_build_inputs(None) is None
    assert out(capsys).startswith("✎")
    for captioner in (None, tiny_captioner):
        assert check_build_inputs(right_inputs, captioner) is None
        text = out(capsys)
        assert text.startswith("✓") and text.count("✓") == 1, text
    assert "real captions" in text
    for mistake, phrase in (("mask_by_pad_id", "you masked it"), ("pads_labelled", "padding positions are labelled"),
                            ("prefix_labelled", "inputs, not targets"), ("no_eos", "exactly one EOS"),
                            ("left", "padded on the left"), ("prefix_unattended", "must be attended"),
                            ("pads_attended", "padding must not be attended")):
        check_build_inputs(make_inputs(mistake), tiny_captioner)
        text = out(capsys)
        assert text.startswith("✗") and phrase in text, (mistake, text)


def test_build_inputs_check_on_unfinished_code(capsys):
    def not_started(num_soft, prompt_ids, caption_ids, eos_id):
        return None

    def raises(num_soft, prompt_ids, caption_ids, eos_id):
        raise NotImplementedError("todo")

    check_build_inputs(not_started)
    assert out(capsys).startswith("✎")
    check_build_inputs(raises)
    assert "NotImplementedError" in out(capsys)
    check_build_inputs(lambda *args: torch.zeros(3))
    assert out(capsys).startswith("✗")
    check_build_inputs(lambda *args: "abc")
    assert out(capsys).startswith("✗")
