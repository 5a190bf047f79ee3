"""The answer checks of notebook 05 accept right answers, explain wrong ones,
and tell a learner who has not started what to do."""
import pytest
import torch

from vlmcourse.backbones import load_llm
from vlmcourse.stage2 import PrecomputedConnector, SoftPromptCaptioner
from vlmcourse.exercises import nb05
from vlmcourse.exercises.nb05 import (check_cacheable, check_encoder_decoder, check_labels,
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
